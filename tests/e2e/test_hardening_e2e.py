"""Hardening, end to end (the scripts): pre-emption by real signals (one process and two), one run per folder,
--resume's checks of its data, a full disk while saving or sampling, clear errors for damaged run folders, and
advice that works when followed. Unit-level cases: tests/core/test_hardening.py; the table: docs/reliability.md."""

import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import maskgit
import maskgit.sample_cli
import maskgit.train
import vqvae
import vqvae.train
from core.checkpoints import verify_checkpoint
from core.lock import LOCK_NAME, FolderLock
from core.runs import RunFolderError

from conftest import REPO, launch_args, run_script, script_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

LONG = ["--steps", "100000", "--save-every", "100000", "--eval-every", "100000"]  # stopped by a signal long before
TINY_MASKGIT = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "16", "--num-eval-images", "16",
                "--steps", "12", "--save-every", "4", "--eval-every", "6", "--sample-every", "6",
                "--num-sample-images", "10"]


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def metrics_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, tiny_args):
    """A finished 12-step tokenizer run (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("hardening") / "vq"
    assert_ok(run_script(["train_vq.py", *tiny_args, "--out", out]))
    return out


@pytest.fixture(scope="module")
def mg_args(vq_run, tiny_labelled_images):
    return ["--vq", vq_run, "--data", tiny_labelled_images, *TINY_MASKGIT]


@pytest.fixture(scope="module")
def mg_run(tmp_path_factory, mg_args):
    """A finished 12-step class-conditional stage-2 run with an EMA (read-only: tests copy it)."""
    out = tmp_path_factory.mktemp("hardening") / "mg"
    assert_ok(run_script(["train_maskgit.py", *mg_args, "--out", out]))
    return out


def error_line(stderr: str) -> str:
    """The script's `error: ...` message (a progress bar may share its line, or be flushed after it at exit)."""
    lines = [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("token_cache"))
    return dest


def main_error(main, capsys, *argv, code=2) -> str:
    """Run a script's main in-process where it must stop with a clear error; return the message."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == code
    message = capsys.readouterr().err
    assert message.startswith("error: "), message
    return message


class Background:
    """A script running in its own process group, its output in files."""

    def __init__(self, args, folder: Path, name: str):
        self.out, self.err_path = folder / f"{name}.stdout", folder / f"{name}.stderr"
        with open(self.out, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=script_env(), stdout=out,
                                         stderr=err, start_new_session=True)

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_for_step(self, total: int, at_least: int, timeout: float = 300) -> int:
        """Wait until the progress bar shows `at_least` of `total` steps done; return the step shown."""
        deadline = time.monotonic() + timeout
        while True:
            shown = re.findall(rf"(\d+)/{total}\b", self.err())
            if shown and int(shown[-1]) >= at_least:
                return int(shown[-1])
            assert self.proc.poll() is None, f"exited {self.proc.returncode}\n{self.err()[-3000:]}"
            assert time.monotonic() < deadline, f"no progress\n{self.err()[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s after the signal (hung?)\n{self.err()[-3000:]}")

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def background(tmp_path):
    started = []

    def start(args, name="run"):
        started.append(Background(args, tmp_path, name))
        return started[-1]

    yield start
    for bg in started:
        bg.kill()


def stopped_at(err: str, signame: str) -> int:
    match = re.search(rf"stopped by {signame} after step (\d+); checkpoint (\S+) written: continue with --resume "
                      rf"\(exit status (\d+)\)", err)
    assert match, err[-3000:]
    return int(match.group(1))


def assert_clean_stop(out: Path, step: int, processes: int = 1):
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    assert verify_checkpoint(checkpoint) is None
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == step
    assert {f"random_states_{r}.pkl" for r in range(processes)} <= {p.name for p in checkpoint.iterdir()}
    assert not list((out / "checkpoints").glob(".tmp_step_*"))
    assert not (out / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------- pre-emption


@pytest.mark.parametrize("stage,signum", [("vq", signal.SIGTERM), ("maskgit", signal.SIGINT)])
def test_a_signal_stops_after_a_checkpoint_and_resume_finishes(stage, signum, tiny_args, mg_args, background,
                                                              tmp_path):
    out = tmp_path / "run"
    script, args = ("train_vq.py", tiny_args) if stage == "vq" else \
        ("train_maskgit.py", [*mg_args, "--sample-every", "100000"])
    run = background([script, *args, *LONG, "--out", out])
    run.wait_for_step(100000, at_least=3)

    if stage == "vq":  # meanwhile: one run per folder, whatever the second one asks for
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == run.proc.pid and "train_vq.py" in holder["command"]
        for argv in (["--out", out, "--resume"], [*tiny_args, "--out", out]):
            second = run_script([script, *argv])
            assert second.returncode == 2, second.stderr[-3000:]
            assert f"is in use by another run (pid {run.proc.pid} on host" in error_line(second.stderr)

    run.proc.send_signal(signum)
    assert run.finish() == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    err = run.err()
    step = stopped_at(err, signal.Signals(signum).name)
    assert "Traceback" not in err
    assert_clean_stop(out, step)

    resumed = run_script([script, "--out", out, "--resume", "--steps", step + 2])
    assert_ok(resumed)
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'} at step {step}" in resumed.stdout
    assert metrics_steps(out)[-1] == step + 2


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes `accelerate launch` started (its children with RANK in their environment)."""
    found = {}
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            found[rank] = int(child)
    return found


@pytest.mark.parametrize("who", ["one process", "every process"])
def test_two_processes_stop_at_the_same_step_and_resume(who, tiny_args, background, tmp_path):
    """`one process`: only rank 1 gets SIGTERM, rank 0 (which writes the checkpoint) must stop with it.
    `every process`: the whole group, as SLURM does; the launcher forwards its own copy to each process too."""
    out = tmp_path / "ddp"
    run = background([*launch_args(2), "train_vq.py", *tiny_args, *LONG, "--out", out])
    run.wait_for_step(100000, at_least=3)
    if who == "one process":
        workers = worker_pids(run.proc.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGTERM)
    else:
        os.killpg(run.proc.pid, signal.SIGTERM)
    assert run.finish() != 0  # accelerate launch reports the workers' status 143 (or its own signal) as a failure
    err = run.err()
    step = stopped_at(err, "SIGTERM")
    assert "received again" not in err  # the forwarded duplicate counted as the same request
    assert_clean_stop(out, step, processes=2)

    resumed = run_script([*launch_args(2), "train_vq.py", "--out", out, "--resume", "--steps", step + 2])
    assert_ok(resumed)
    assert f"at step {step}" in resumed.stdout
    assert metrics_steps(out)[-1] == step + 2


def test_a_killed_run_leaves_a_stale_lock_that_resume_takes_over(tiny_args, background, tmp_path):
    out = tmp_path / "killed"
    run = background(["train_vq.py", *tiny_args, *LONG, "--save-every", "2", "--out", out])
    run.wait_for_step(100000, at_least=5)
    run.kill()  # SIGKILL: no handler runs, the lock stays behind
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == run.proc.pid
    last = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    resumed = run_script(["train_vq.py", "--out", out, "--resume", "--steps", last + 2])
    assert_ok(resumed)
    assert "taking over the stale lock" in resumed.stderr and f"pid {run.proc.pid}" in resumed.stderr
    assert not (out / LOCK_NAME).exists() and not list((out / "checkpoints").glob(".tmp_step_*"))


def test_sampling_into_a_folder_in_use_fails_at_once(mg_run, tmp_path, capsys):
    out = tmp_path / "samples"
    with FolderLock(out, command=["sample.py", "--out", str(out)]):
        message = main_error(maskgit.sample_cli.main, capsys, "--checkpoint", mg_run, "--out", out, "--num", 4)
    assert "is in use by another run" in message and "sample.py --out" in message
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- --resume checks


def test_resume_refuses_other_data_for_stage_2(mg_run, tiny_images, tmp_path, capsys):
    run = copy_run(mg_run, tmp_path / "mg")
    message = main_error(maskgit.train.main, capsys, "--out", run, "--resume", "--data", tiny_images)
    assert "cannot change mid-run" in message and "--data (the run's" in message


def test_resume_warns_when_the_data_folder_gained_files(tiny_args, tiny_images, tmp_path):
    data = tmp_path / "images"
    shutil.copytree(tiny_images, data)
    out = tmp_path / "vq"
    assert_ok(run_script(["train_vq.py", *tiny_args, "--data", data, "--steps", "8", "--out", out]))
    for name in ("extra_1.png", "extra_2.png"):
        shutil.copy(data / "0000.png", data / name)
    resumed = run_script(["train_vq.py", "--out", out, "--resume", "--steps", "10"])
    assert_ok(resumed)
    assert "changed since this run started (files were added or removed: 240 image files when the run started, " \
           "242 now)" in resumed.stderr
    assert metrics_steps(out)[-1] == 10


def test_resume_names_a_changed_number_of_classes(vq_run, tiny_labelled_images, tmp_path):
    data = tmp_path / "labelled"
    shutil.copytree(tiny_labelled_images, data)
    out = tmp_path / "mg"
    assert_ok(run_script(["train_maskgit.py", "--vq", vq_run, "--data", data, *TINY_MASKGIT, "--steps", "4",
                          "--cache-dir", tmp_path / "cache", "--out", out]))
    (data / "zebra").mkdir()
    for i in range(3):
        shutil.copy(next((data / "circle").glob("*.png")), data / "zebra" / f"{i}.png")
    resumed = run_script(["train_maskgit.py", "--out", out, "--resume", "--steps", "6", "--cache-dir",
                          tmp_path / "cache"])
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    message = error_line(resumed.stderr)
    assert "class embedding is built for 10 classes" in message and "now gives 11 (added: ['zebra'])" in message
    assert "damaged" not in resumed.stderr
    shutil.rmtree(data / "zebra")  # the advice: restore the class folders as they were
    assert_ok(run_script(["train_maskgit.py", "--out", out, "--resume", "--steps", "6", "--cache-dir",
                          tmp_path / "cache"]))


def test_a_torn_metrics_line_is_dropped_on_resume(vq_run, tmp_path):
    run = copy_run(vq_run, tmp_path / "vq")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 13, "loss": 0.2, "ps')  # the run died mid-write
    resumed = run_script(["train_vq.py", "--out", run, "--resume", "--steps", "14"])
    assert_ok(resumed)
    assert "dropping 1 unreadable line(s) (line 3)" in resumed.stderr
    assert metrics_steps(run) == [6, 12, 14]


def test_nan_in_a_run_config_is_a_clear_error_on_resume(vq_run, tmp_path, capsys):
    run = copy_run(vq_run, tmp_path / "vq")
    config = json.loads((run / "config.json").read_text())
    config["train"]["lr"] = float("nan")
    (run / "config.json").write_text(json.dumps(config))
    message = main_error(vqvae.train.main, capsys, "--out", run, "--resume")
    assert "train.lr is not a finite number" in message


# ---------------------------------------------------------------------------------------------- a full disk


def run_with_file_limit(args, max_bytes: int) -> subprocess.CompletedProcess:
    """`python ARGS` where no file may grow past `max_bytes`: writes beyond fail as on a full disk (EFBIG)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=script_env(), capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones_and_resume_finishes(vq_run, tmp_path):
    run = copy_run(vq_run, tmp_path / "vq")
    assert (run / "checkpoints" / "step_00000012" / "optimizer.bin").stat().st_size > 1_000_000  # will not fit
    full = run_with_file_limit(["train_vq.py", "--out", run, "--resume", "--steps", "16"], 1_000_000)
    assert full.returncode == 1, full.stderr[-3000:]
    message = error_line(full.stderr)
    assert message.startswith("error: no space left on device while writing checkpoint") and "step_00000016" in message
    assert f"earlier checkpoints are kept (newest: {run / 'checkpoints' / 'step_00000012'})" in message
    assert "Traceback" not in full.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000008",
                                                                       "step_00000012"]
    assert all(verify_checkpoint(p) is None for p in (run / "checkpoints").iterdir())
    resumed = run_script(["train_vq.py", "--out", run, "--resume", "--steps", "16"])  # space freed
    assert_ok(resumed)
    assert metrics_steps(run)[-1] == 16


def test_a_full_disk_while_sampling_is_a_clear_error_and_the_output_is_marked(mg_run, tmp_path):
    out = tmp_path / "samples"
    num, size = 24, 16
    npy_bytes = 128 + num * size * size * 3  # .samples.tmp.npy fits; samples.npz (a zip around it) does not
    args = ["sample.py", "--checkpoint", mg_run, "--out", out, "--num", num, "--batch-size", 8, "--steps", 4]
    full = run_with_file_limit(args, npy_bytes + 16)
    assert full.returncode == 1, full.stderr[-3000:]
    message = error_line(full.stderr)
    assert message.startswith(f"error: no space left on device while writing samples to {out}")
    assert f"{out / 'INCOMPLETE'}" in message and "Traceback" not in full.stderr
    assert (out / "INCOMPLETE").exists() and not (out / "meta.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary .npy / .npz left

    again = run_script([*args, "--overwrite"])
    assert_ok(again)
    assert not (out / "INCOMPLETE").exists() and (out / "meta.json").exists()
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (num, size, size, 3)


# ---------------------------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(grid="abc"), "grid = 'abc' is not a list"),
    (lambda c: c.update(num_classes=-1), "num_classes = -1 must be >= 0"),
    (lambda c: c["model"].update(dim="x"), "MaskGITConfig.dim = 'x' is not an integer"),
    (lambda c: c.update(codebook_size=None), "codebook_size = None is not an integer"),
    (lambda c: c["data"].update(image_size=0), "image_size = 0 must be >= 1"),
])
def test_malformed_run_config_values_are_clear_errors_in_sample_py(mg_run, tmp_path, capsys, edit, message):
    run = copy_run(mg_run, tmp_path / "mg")
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    error = main_error(maskgit.sample_cli.main, capsys, "--checkpoint", run, "--out", out, "--num", 4)
    assert error.startswith("error: --checkpoint") and message in error, error
    assert not out.exists()


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels (PIL checks the size on opening, before any pixel is read)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_by_sample_py(mg_run, tmp_path, capsys):
    png_header_only(tmp_path / "bomb.png", 40_000, 40_000)
    out = tmp_path / "out"
    error = main_error(maskgit.sample_cli.main, capsys, "--checkpoint", mg_run, "--out", out, "--init-image",
                       tmp_path / "bomb.png", "--mask-box", "0,0,4,4")
    assert "--init-image" in error and "too large to be safe" in error
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- advice, followed


def follow_copy_advice(message: str) -> tuple[Path, Path]:
    """Do what the message says: `copy SOURCE to TARGET`."""
    match = re.search(r"copy (\S+) to (\S+?)[;.]?$", message.strip().splitlines()[-1])
    assert match, message
    source, target = Path(match.group(1)), Path(match.group(2))
    shutil.copyfile(source, target)
    return source, target


def test_advice_for_a_damaged_config_json_works(vq_run, tmp_path, capsys):
    run = copy_run(vq_run, tmp_path / "vq")
    (run / "config.json").write_text('{"stage": "vqvae", "mod')  # torn
    message = main_error(vqvae.train.main, capsys, "--out", run, "--resume")
    source, target = follow_copy_advice(message)
    assert source == run / "checkpoints" / "step_00000012" / "config.json" and target == run / "config.json"
    assert json.loads(target.read_text()) == json.loads((vq_run / "config.json").read_text())
    vqvae.train.main(["--out", str(run), "--resume"])  # the run is whole again (nothing left to train)
    vqvae.load_tokenizer(run)


def test_advice_for_damaged_weights_works(vq_run, tmp_path):
    run = copy_run(vq_run, tmp_path / "vq")
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(RunFolderError, match="truncated or corrupt") as error:
        vqvae.load_tokenizer(run)
    source, target = follow_copy_advice(str(error.value))
    assert source == run / "checkpoints" / "step_00000012" / "model.safetensors" and target == weights
    vqvae.load_tokenizer(run)
    original, restored = load_file(vq_run / "model.safetensors"), load_file(weights)
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)


@pytest.mark.parametrize("name", ["ema.safetensors", "model.safetensors"])
def test_advice_for_damaged_stage_2_weights_works(mg_run, tmp_path, name):
    run = copy_run(mg_run, tmp_path / "mg")
    (run / name).write_bytes(b"\x00" * 64)
    with pytest.raises(RunFolderError, match="truncated or corrupt") as error:
        maskgit.load_maskgit(run, ema=name == "ema.safetensors")
    source, target = follow_copy_advice(str(error.value))
    assert source == run / "checkpoints" / "step_00000012" / name and target == run / name
    model, _, _ = maskgit.load_maskgit(run, ema=name == "ema.safetensors")
    original = load_file(mg_run / name)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
