"""Hardening (unit level): nothing in a checkpoint runs code, one run per folder, clear errors instead of tracebacks,
non-finite numbers refused, a full disk reported as such, pre-emption signals. docs/reliability.md lists the cases;
tests/e2e/test_hardening_e2e.py runs the scripts."""

import errno
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from core.checkpoints import MANIFEST_NAME, Checkpoints, TrainState, sha256_file, verify_checkpoint
from core.cli import ConfigError, config_from_dict
from core.lock import LOCK_NAME, FolderLock, FolderLockedError, locked_folder
from core.metrics_log import MetricsLog
from core.preempt import Preempted, Preemption
from core.runs import (CONFIG_NAME, METRICS_NAME, DiskFullError, Run, RunFolderError, atomic_write_text,
                       changed_sources, is_disk_full, load_weights, note_dataset, read_run_config, save_weights,
                       write_run_config)
from core.train import make_ema

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def accelerator():
    """A real single-process CPU Accelerator; accelerate's singletons are reset afterwards."""
    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ----------------------------------------------------------------------------- checkpoints run no code


class Payload:
    """A pickle that touches `marker` when unpickled (what a crafted checkpoint file would do, less harmlessly)."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rewrite_manifest(folder: Path) -> None:
    """What an attacker who can write the checkpoint does: make the manifest match the files again."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    (folder / MANIFEST_NAME).write_text(json.dumps({"step": 0, "files": files}))


@pytest.fixture
def run(tmp_path, accelerator):
    """Two checkpoints (steps 1, 2) of a model + AdamW + LR schedule + EMA + counters, with a config.json."""
    folder = tmp_path / "run"
    folder.mkdir()
    write_run_config(folder, "maskgit", model={"dim": 8}, step=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = make_ema(model, 0.9)
    state = TrainState()
    checkpoints = Checkpoints(folder, accelerator, keep_last=5, extra_state={"train_state": state, "ema": ema})
    saved = {}
    for _ in range(2):
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        ema.update_parameters(model)
        state.advance(4, skipped=False)
        saved[state.step] = SimpleNamespace(model=snapshot(model), ema=snapshot(ema), counters=state.state_dict(),
                                            optimizer=optimizer.state_dict()["state"][0]["exp_avg"].clone(),
                                            lr=scheduler.get_last_lr(), rng=torch.get_rng_state())
        checkpoints.save(state.step)
    return SimpleNamespace(folder=folder, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                           state=state, checkpoints=checkpoints, saved=saved)


def scramble(run):
    """Change everything a resume must restore."""
    with torch.no_grad():
        for module in (run.model, run.ema):
            for p in module.parameters():
                p.add_(1.0)
        run.ema.n_averaged.fill_(99)
    run.state.step, run.state.images_seen = 77, 5
    torch.rand(100)


def assert_restored(run, step):
    expected = run.saved[step]
    assert same(snapshot(run.model), expected.model)
    assert same(snapshot(run.ema), expected.ema)  # n_averaged included
    assert run.state.state_dict() == expected.counters
    assert torch.equal(run.optimizer.state_dict()["state"][0]["exp_avg"], expected.optimizer)
    assert run.scheduler.get_last_lr() == expected.lr
    assert torch.equal(torch.get_rng_state(), expected.rng)


def test_checkpoints_hold_only_json_safetensors_and_weights_only_pickles(run):
    folder = run.checkpoints.all()[-1]
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl",  # accelerate's save_state
        "train_state.json", "ema.safetensors", CONFIG_NAME, MANIFEST_NAME])  # ours
    assert json.loads((folder / "train_state.json").read_text()) == {"step": 2, "images_seen": 8, "skipped_steps": 0}
    assert json.loads((folder / CONFIG_NAME).read_text())["step"] == 2  # the config as of this checkpoint
    copy = make_ema(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)), 0.9).module
    load_weights(copy, folder / "ema.safetensors")  # the run folder's own format: it can replace ema.safetensors
    assert same(snapshot(copy), {k.removeprefix("module."): v for k, v in run.saved[2].ema.items()
                                 if k.startswith("module.")})
    assert verify_checkpoint(folder) is None


def test_resume_restores_everything_and_loads_every_pickle_weights_only(run, monkeypatch):
    scramble(run)
    calls = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((Path(f).name, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert run.checkpoints.resume("latest").name == "step_00000002"
    assert_restored(run, 2)
    loaded = {name for name, _ in calls}
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= loaded
    assert all(weights_only is True for _, weights_only in calls), calls


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """The control: the payload the next test plants is live, so its silence there means something."""
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), tmp_path / "payload.bin")
    torch.load(tmp_path / "payload.bin", weights_only=False)
    assert marker.exists()


CHECKPOINT_FILES = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "train_state.json",
                    "ema.safetensors", CONFIG_NAME, MANIFEST_NAME]


@pytest.mark.parametrize("name", CHECKPOINT_FILES + ["custom_checkpoint_0.pkl (old format)",
                                                     "custom_checkpoint_1.pkl (added)", "pytorch_model.bin (added)"])
def test_a_pickle_payload_in_any_checkpoint_file_cannot_run(run, tmp_path, name):
    folder = run.checkpoints.all()[-1]
    name = name.split(" ")[0]
    if name == "custom_checkpoint_0.pkl":  # a checkpoint of an earlier release: our state in accelerate's pickles
        (folder / "train_state.json").unlink()
        (folder / "ema.safetensors").unlink()
        torch.save(run.ema.state_dict(), folder / "custom_checkpoint_1.pkl")
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), folder / name)
    if name != MANIFEST_NAME:
        rewrite_manifest(folder)
    scramble(run)
    with pytest.warns(UserWarning) as caught:
        used = run.checkpoints.resume("latest")
    assert not marker.exists(), f"unpickling {name} ran code"
    assert used.name == "step_00000001"  # fell back to the previous checkpoint, and says why
    assert_restored(run, 1)
    messages = " ".join(str(w.message) for w in caught)
    assert "step_00000002 is unusable" in messages and name in messages, messages


def test_a_pickle_payload_fails_clearly_when_no_checkpoint_is_left(run, tmp_path):
    marker = tmp_path / "PWNED"
    for folder in run.checkpoints.all():
        torch.save(Payload(marker), folder / "optimizer.bin")
        rewrite_manifest(folder)
    with pytest.warns(UserWarning, match="optimizer.bin cannot be loaded safely.*could run code"), \
            pytest.raises(RunFolderError, match="no usable checkpoint"):
        run.checkpoints.resume("latest")
    assert not marker.exists()


def test_an_old_checkpoint_with_accelerate_pickled_state_still_resumes(run):
    """Earlier releases registered the counters and the EMA with accelerate (custom_checkpoint_N.pkl): plain data,
    which torch.load(weights_only=True) reads."""
    folder = run.checkpoints.all()[-1]
    counters = json.loads((folder / "train_state.json").read_text())
    (folder / "train_state.json").unlink()
    (folder / "ema.safetensors").unlink()
    torch.save(counters, folder / "custom_checkpoint_0.pkl")  # as accelerate's save_custom_state wrote them
    torch.save(run.saved[2].ema, folder / "custom_checkpoint_1.pkl")
    rewrite_manifest(folder)
    scramble(run)
    assert run.checkpoints.resume("latest").name == "step_00000002"
    assert_restored(run, 2)


def test_state_registered_with_accelerate_is_refused(tmp_path, accelerator):
    accelerator.register_for_checkpointing(TrainState())
    with pytest.raises(RuntimeError, match="weights_only=False"):
        Checkpoints(tmp_path, accelerator, keep_last=1)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_load_weights_accepts_the_names_wrappers_give(tmp_path, prefix):
    """A checkpoint's model.safetensors holds the prepared module's names (DDP, torch.compile): it loads as a
    run's weights file, which is what the advice for a damaged model.safetensors relies on."""
    torch.manual_seed(0)
    source, target = nn.Linear(3, 4), nn.Linear(3, 4)
    save_file({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    load_weights(target, tmp_path / "w.safetensors")
    assert same(snapshot(target), snapshot(source))


# ----------------------------------------------------------------------------- one run per folder


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    folder = tmp_path / "run"
    with FolderLock(folder, command=["train_vq.py", "--out", str(folder)]):
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert holder["command"] == f"train_vq.py --out {folder}" and holder["started"]
        with pytest.raises(FolderLockedError, match=rf"in use by another run \(pid {os.getpid()}.*train_vq.py"):
            FolderLock(folder).acquire()
    assert not (folder / LOCK_NAME).exists()
    with pytest.raises(ZeroDivisionError):
        with FolderLock(folder):
            1 / 0
    assert not (folder / LOCK_NAME).exists()  # released on an exception too


def test_only_one_of_many_simultaneous_takers_gets_the_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    outcomes, start = [], threading.Barrier(8)

    def take():
        start.wait()
        try:
            FolderLock(folder).acquire()
            outcomes.append("locked")
        except FolderLockedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["locked"] + ["refused"] * 7


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    stale = {"host": socket.gethostname(), "pid": dead_pid(), "started": "yesterday", "command": "train_vq.py",
             "token": "old"}
    (folder / LOCK_NAME).write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match="stale lock.*no longer running"):
        lock = FolderLock(folder).acquire()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing left aside


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    other = {"host": "gpu-node-7", "pid": dead_pid(), "started": "yesterday", "command": "train_vq.py", "token": "x"}
    (folder / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(FolderLockedError, match=f"gpu-node-7.*host is dead.*delete {folder / LOCK_NAME} and start "
                                                "again") as error:
        FolderLock(folder).acquire()
    assert json.loads((folder / LOCK_NAME).read_text()) == other
    Path(re.search(r"delete (\S+) and start again", str(error.value)).group(1)).unlink()  # the advice, followed
    FolderLock(folder).acquire().release()


def test_locked_folder_fails_clearly_and_only_the_main_process_locks(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "run"
    with locked_folder(folder):
        with pytest.raises(SystemExit) as exit_info:
            with locked_folder(folder):
                pass
        assert exit_info.value.code == 2 and "in use by another run" in capsys.readouterr().err
        monkeypatch.setenv("RANK", "1")  # another process of a launch: the main one holds the lock
        with locked_folder(folder) as lock:
            assert lock is None
        monkeypatch.delenv("RANK")
    assert not folder.exists()  # created for the lock, left empty: removed again
    with locked_folder(tmp_path / "missing", create=False) as lock:  # --resume of a folder that is not there
        assert lock is None and not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------- non-finite numbers, malformed configs


def script_mains():
    import maskgit.sample_cli
    import maskgit.train
    import vqvae.train
    from core import export_cli

    return {"train_vq.py": vqvae.train.main, "train_maskgit.py": maskgit.train.main,
            "sample.py": maskgit.sample_cli.main, "export_dataset.py": export_cli.main}


NON_FINITE = [
    ("train_vq.py", ["--out", "x", "--lr", "nan"]),
    ("train_vq.py", ["--out", "x", "--grad-clip", "inf"]),
    ("train_maskgit.py", ["--out", "x", "--lr", "inf"]),
    ("train_maskgit.py", ["--out", "x", "--label-smoothing", "nan"]),
    ("train_maskgit.py", ["--out", "x", "--betas", "0.9", "nan"]),
    ("sample.py", ["--checkpoint", "c", "--out", "x", "--temperature", "nan"]),
    ("sample.py", ["--checkpoint", "c", "--out", "x", "--cfg", "inf"]),
    ("sample.py", ["--checkpoint", "c", "--out", "x", "--top-p", "NaN"]),
    ("sample.py", ["--checkpoint", "c", "--out", "x", "--temperature-end=-inf"]),
    ("sample.py", ["--checkpoint", "c", "--out", "x", "--choice-temperature", "nan"]),
    ("sample.py", ["--checkpoint", "c", "--out", "x", "--critic-noise", "infinity"]),
]


@pytest.mark.parametrize("script,argv", NON_FINITE, ids=[f"{s} {' '.join(a[a.index('x') + 1:])}" for s, a in NON_FINITE])
def test_non_finite_numbers_are_refused_where_they_are_typed(script, argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script_mains()[script](argv)
    assert exit_info.value.code == 2
    assert "expected a finite number" in capsys.readouterr().err
    assert not Path("x").exists()


def test_a_config_with_nan_is_a_clear_error(tmp_path):
    write_run_config(tmp_path, "vqvae", train={"lr": float("nan"), "betas": [0.9, float("inf")]})
    assert "NaN" in (tmp_path / CONFIG_NAME).read_text()  # what Python's json writes, and reads back as a float
    with pytest.raises(RunFolderError, match=r"train\.lr is not a finite number"):
        read_run_config(tmp_path, "vqvae")


@pytest.mark.parametrize("field,value,message", [
    ("dim", "x", "MaskGITConfig.dim = 'x' is not an integer"),
    ("dim", 32.5, "is not an integer"),
    ("dropout", float("nan"), "is not a finite number"),
    ("class_cond", "yes", "is not true or false"),
    ("schedule", 3, "is not a string"),
])
def test_malformed_config_values_are_named(field, value, message):
    from maskgit.config import MaskGITConfig

    with pytest.raises(ConfigError, match=message):
        config_from_dict(MaskGITConfig, {"dim": 32, "heads": 2, field: value})


@pytest.mark.parametrize("key,value,message", [
    ("grid", "abc", "grid = 'abc' is not a list"),
    ("grid", [4], r"grid = \[4\] is not \[height, width\]"),
    ("grid", [4, 0], r"is not \[height, width\]"),
    ("num_classes", -1, "num_classes = -1 must be >= 0"),
    ("num_classes", 3, "num_classes = 3 but 2 class names"),
    ("num_classes", True, "num_classes = True is not an integer"),
    ("codebook_size", "many", "codebook_size = 'many' is not an integer"),
    ("classes", [1, 2], "is not a list of class names"),
])
def test_malformed_run_values_are_clear_errors(tmp_path, key, value, message):
    config = {"stage": "maskgit", "grid": [4, 4], "num_classes": 2, "classes": ["a", "b"], "codebook_size": 64}
    run = Run(tmp_path, {**config, key: value})
    with pytest.raises(RunFolderError, match=message):
        run.grid, run.num_classes, run.codebook_size, run.classes


# ----------------------------------------------------------------------------- --resume and its data


@pytest.fixture
def small_folder(tmp_path, tiny_images) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(tiny_images.glob("*.png"))[:20]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_a_resumed_run_refuses_other_data_or_preset(tmp_path, small_folder):
    from vqvae.train import parse_args

    run = Run(tmp_path, {"data": {"data": str(small_folder), "data_root": str(tmp_path), "preset": "tiny"}})
    assert changed_sources(parse_args(["--out", "r", "--resume"]), run) == []  # defaults: nothing typed
    relative = os.path.relpath(small_folder)
    assert changed_sources(parse_args(["--out", "r", "--resume", "--data", relative, "--preset", "tiny"]), run) == []
    changed = changed_sources(parse_args(["--out", "r", "--resume", "--data", "shapes", "--preset", "cifar10"]), run)
    assert [c.split(" ")[0] for c in changed] == ["--data", "--preset"]


def test_resume_with_other_data_fails_before_any_work(tmp_path, small_folder, capsys):
    from vqvae.config import VQConfig, VQTrainConfig
    from vqvae.train import main

    write_run_config(tmp_path, "vqvae", model=VQConfig(), train=VQTrainConfig(),
                     data={"data": str(small_folder), "data_root": str(tmp_path), "preset": "tiny"})
    for extra, shown in ((["--data", "shapes"], "--data (the run's"), (["--preset", "cifar10"], "--preset")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path), "--resume", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "cannot change mid-run" in err and shown in err, err


def test_data_fingerprint_is_recorded_and_a_change_warned_about(small_folder, recwarn):
    data = {"data": str(small_folder), "data_root": "unused", "preset": "tiny"}
    started = note_dataset(data, 16, resumed=False)
    assert started["num_files"] == 20 and len(started["fingerprint"]) == 16
    assert note_dataset(started, 16, resumed=True) == started
    assert not recwarn.list
    (small_folder / "extra.png").write_bytes((small_folder / "0000.png").read_bytes())
    with pytest.warns(UserWarning, match="changed since this run started.*added or removed: 20 image files when the "
                                         "run started, 21 now"):
        assert note_dataset(started, 16, resumed=True) == started  # the fingerprint of the start is kept
    assert note_dataset({"data": "shapes"}, 16, resumed=True) == {"data": "shapes"}  # a run from before fingerprints


# ----------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("script", ["train_vq.py", "train_maskgit.py", "sample.py", "export_dataset.py"])
@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_pointing_at_a_file_is_a_clear_error(script, where, tmp_path, capsys):
    existing = tmp_path / "taken.txt"
    existing.write_text("keep me")
    out = existing if where == "file" else existing / "sub"
    argv = {"train_vq.py": ["--data", "shapes"], "train_maskgit.py": ["--vq", str(tmp_path / "vq")],
            "sample.py": ["--checkpoint", str(tmp_path / "mg")],
            "export_dataset.py": ["--data", "shapes", "--image-size", "16"]}[script]
    with pytest.raises(SystemExit) as exit_info:
        script_mains()[script]([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and f"{existing} is a file" in err, err
    assert existing.read_text() == "keep me"


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels (PIL checks the size on opening, before any pixel is read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [10_000, 30_000])  # above PIL's warning limit; above its error limit
def test_a_decompression_bomb_init_image_is_a_clear_error(tmp_path, side, capsys):
    from maskgit.sample_cli import read_picture

    png_header_only(tmp_path / "bomb.png", side, side)
    with pytest.raises(SystemExit) as exit_info:
        read_picture(tmp_path / "bomb.png", 16, "--init-image")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to decode it, its size is too large" in err and "16x16" in err, err


def test_torn_lines_in_metrics_are_dropped_with_a_warning(tmp_path, accelerator):
    (tmp_path / METRICS_NAME).write_text('{"step": 1, "loss": 0.5}\n\x00\x00garbage\n{"step": 2, "loss": 0.4}\n'
                                         '{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"dropping 2 unreadable line\(s\) \(line 2, 5\)"):
        MetricsLog(tmp_path, accelerator).drop_after(3)
    lines = (tmp_path / METRICS_NAME).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


# ----------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("err,full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EFBIG, "File too large"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 74944 vs 74832"), True),  # torch.save
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), True),
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("size mismatch for weight"), False),
])
def test_full_disk_errors_are_recognised(err, full):
    assert is_disk_full(err) is full
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = err
    assert is_disk_full(wrapped) is full


@pytest.mark.parametrize("writer", ["accelerate's torch.save", "our files"])
def test_a_full_disk_during_a_checkpoint_save_says_so_and_keeps_the_earlier_ones(run, monkeypatch, writer):
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):  # what torch's zip writer raises when the disk fills
        if str(f).endswith("optimizer.bin"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 74944 vs 74832")
        return real_save(obj, f, *args, **kwargs)

    def no_space(fd):  # our JSON and safetensors files are fsynced before the manifest is written
        raise OSError(errno.ENOSPC, "No space left on device")

    if writer == "our files":
        monkeypatch.setattr(os, "fsync", no_space)
    else:
        monkeypatch.setattr(torch, "save", full_disk_save)
    detail = "No space left on device" if writer == "our files" else "unexpected pos"
    with pytest.raises(DiskFullError, match=rf"^no space left on device while writing checkpoint .*step_00000003 "
                                            rf".*{detail}.*earlier checkpoints are kept \(newest: .*step_00000002\)"):
        run.checkpoints.save(3)
    monkeypatch.undo()
    assert sorted(p.name for p in run.checkpoints.root.iterdir()) == ["step_00000001", "step_00000002"]
    assert all(verify_checkpoint(p) is None for p in run.checkpoints.all())
    scramble(run)
    assert run.checkpoints.resume("latest").name == "step_00000002"
    assert_restored(run, 2)


def test_a_full_disk_during_a_small_write_says_so_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, "old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFullError, match="no space left on device while writing .*config.json.*previous version "
                                            "of the file is kept"):
        atomic_write_text(path, "new")
    with pytest.raises(DiskFullError, match="no space left on device while writing .*w.safetensors"):
        save_weights(nn.Linear(2, 2), tmp_path / "w.safetensors")
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ----------------------------------------------------------------------------- pre-emption


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_to_stop_a_repeat_is_the_same_request_a_later_one_stops_at_once(signum, capfd):
    before = signal.getsignal(signum)
    with Preemption(repeat_s=0.5) as preemption:
        assert not preemption.agreed()
        os.kill(os.getpid(), signum)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert preemption.requested == signum and preemption.agreed()
        os.kill(os.getpid(), signum)  # delivered twice (a launcher forwards what it got): still one request
        time.sleep(0.01)
        time.sleep(0.6)
        with pytest.raises(Preempted) as exit_info:
            os.kill(os.getpid(), signum)
            time.sleep(0.5)
        assert exit_info.value.code == 128 + signum
    assert signal.getsignal(signum) is before
    err = capfd.readouterr().err
    assert "finishing the current step, then writing a checkpoint" in err and "received again: stopping at once" in err


def test_a_save_stopped_at_once_leaves_no_temporary_folder(run, monkeypatch):
    """A second signal raises Preempted wherever the main thread is: here, inside accelerate's save_state."""
    def interrupted(*args, **kwargs):
        raise Preempted(143)

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(Preempted):
        run.checkpoints.save(3)
    assert sorted(p.name for p in run.checkpoints.root.iterdir()) == ["step_00000001", "step_00000002"]


def test_preemption_exit_says_how_to_continue(capsys):
    with Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        with pytest.raises(Preempted) as exit_info:
            preemption.exit(7, Path("runs/x/checkpoints/step_00000007"))
    assert exit_info.value.code == 143
    assert "stopped by SIGTERM after step 7; checkpoint runs/x/checkpoints/step_00000007 written: continue with " \
           "--resume (exit status 143)" in capsys.readouterr().err
