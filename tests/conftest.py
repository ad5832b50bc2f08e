"""Shared fixtures: running the command-line scripts, a tiny image folder, tiny training settings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a 12-step run takes seconds on 2 cores: 16px images, 4x4 codes.
TINY_MODEL = ["--image-size", "16", "--channels", "16", "--max-channels", "32", "--norm-groups", "8",
              "--num-res-blocks", "1", "--latent-dim", "8", "--codebook-size", "64", "--kmeans-iters", "2"]
TINY_TRAIN = ["--batch-size", "8", "--num-eval-images", "16", "--steps", "12", "--save-every", "4",
              "--eval-every", "6", "--num-workers", "0", "--warmup-steps", "2"]


def script_env(env: dict | None = None) -> dict:
    """The test process's environment, with the repo importable and `env` on top."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), out.get("PYTHONPATH")) if p)
    out.setdefault("OMP_NUM_THREADS", "1")  # two processes on two cores: no thread oversubscription
    out.update(env or {})
    return out


def run_script(args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repo root; return the finished process with text stdout/stderr."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=script_env(env), capture_output=True,
                          text=True, timeout=timeout)


def launch_args(num_processes: int) -> list[str]:
    """`accelerate launch` for N CPU processes on this machine (gloo), as arguments to `python`."""
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`).

    The test models are tiny: a second thread only adds synchronisation, and on a shared 2-core machine its
    spin-waits made some tests 10-100x slower. The scripts run with OMP_NUM_THREADS=1 (script_env), so
    in-process results also compare bit for bit with theirs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """A flat folder of 240 shapes images at 16px: 216 train / 24 held-out (loads in well under a second)."""
    from PIL import Image

    from core.data import make_shapes

    folder = tmp_path_factory.mktemp("tiny_images")
    images, _ = make_shapes(240, 16)  # uint8 (n, 3, 16, 16)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="session")
def tiny_args(tiny_images) -> list[str]:
    """train_vq.py arguments for a tiny 12-step run (add --out)."""
    return ["--data", str(tiny_images), *TINY_MODEL, *TINY_TRAIN]


@pytest.fixture(scope="session")
def train_vq_module():
    """train_vq.py's code (`vqvae.train`), to call `main(argv)` in-process where no training happens."""
    import vqvae.train

    return vqvae.train


@pytest.fixture(scope="session")
def tiny_labelled_images(tmp_path_factory) -> Path:
    """The same 240 shapes images as `tiny_images`, in one subfolder per class (10 classes, sorted names)."""
    from PIL import Image

    from core.data import SHAPES_CLASSES, make_shapes

    folder = tmp_path_factory.mktemp("tiny_labelled_images")
    images, labels = make_shapes(240, 16)  # uint8 (n, 3, 16, 16), int64 (n,)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        class_dir = folder / SHAPES_CLASSES[label]
        class_dir.mkdir(exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(class_dir / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="session")
def train_maskgit_module():
    """train_maskgit.py's code (`maskgit.train`), to call `main(argv)` in-process where no training happens."""
    import maskgit.train

    return maskgit.train
