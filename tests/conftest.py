"""Shared fixtures: running the command-line scripts, a tiny image folder, tiny training settings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A model small enough that a 12-step run takes seconds on 2 cores: 16px images, 4x4 codes.
TINY_MODEL = ["--image-size", "16", "--channels", "16", "--max-channels", "32", "--norm-groups", "8",
              "--num-res-blocks", "1", "--latent-dim", "8", "--codebook-size", "64", "--fsq-levels", "4", "4", "4",
              "--kmeans-iters", "2"]
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


HF_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit hash fill_hf_cache files repositories under


def fill_hf_cache(cache: Path, repo_id: str, files: dict) -> None:
    """Lay out `files` ({path in repo: bytes}) as huggingface_hub's cache does: snapshots/<commit>/, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        path = repo / "snapshots" / HF_COMMIT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(HF_COMMIT)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache (HF_HUB_CACHE) for this test, with the working directory inside it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub reads it at import
    monkeypatch.chdir(cache)  # no local folder named like the repos
    return cache


@pytest.fixture
def hf_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test (also where huggingface_hub read it at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def tiny_diffusers_vqmodel(seed: int, **extra):
    """A small random diffusers VQModel (f=2: 16 px -> 8x8 codes, 64 codes of dimension 4), in eval mode."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(seed)
    model = diffusers.VQModel(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, num_vq_embeddings=64,
        norm_num_groups=8, sample_size=16, **extra)
    with torch.no_grad():  # upstream's init is a tiny uniform codebook; spread it so many codes are used
        model.quantize.embedding.weight.normal_()
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def private_image_cache(tmp_path_factory):
    """Image caches (core.image_cache, `--image-cache auto`) go to a temporary folder, never to ~/.cache, for the
    tests in this process and the scripts they start (script_env copies os.environ)."""
    folder = tmp_path_factory.mktemp("image_cache")
    previous = os.environ.get("MASKGIT_IMAGE_CACHE_DIR")
    os.environ["MASKGIT_IMAGE_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MASKGIT_IMAGE_CACHE_DIR", None)
    else:
        os.environ["MASKGIT_IMAGE_CACHE_DIR"] = previous


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with `header_start` (the separator row dropped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


OLD_RUNS = REPO / "tests" / "fixtures" / "runs_format_v1"  # a tiny stage-1 + stage-2 pair from an earlier release


@pytest.fixture
def old_runs(tmp_path) -> Path:
    """tests/fixtures/runs_format_v1 copied to tmp_path, the stage-2 run pointed at its tokenizer's new place
    (the folders moved: what the error message tells users to do)."""
    import json
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(OLD_RUNS, root)
    config_path = root / "maskgit" / "config.json"
    config = json.loads(config_path.read_text())
    config["data"]["vq_run"] = str(root / "vq")
    config_path.write_text(json.dumps(config, indent=2))
    return root
