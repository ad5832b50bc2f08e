"""train_vq.py end to end: run folder contents, clear errors, exact resume, non-finite losses, two processes."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vqvae
from core.data import load_dataset
from vqvae.metrics import psnr
from core.checkpoints import verify_checkpoint
from core.runs import RunFolderError

from conftest import REPO, launch_args, run_script, script_env

pytestmark = pytest.mark.slow

STEPS, BATCH, EVAL_IMAGES, KEEP_LAST = 12, 8, 16, 3  # as in conftest.TINY_TRAIN (keep_last: the default)


def train(out, tiny_args, *extra):
    return run_script(["train_vq.py", *tiny_args, "--out", out, *extra])


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def metrics_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights_of(run):
    return load_file(run / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_args):
    """One uninterrupted 12-step run (read-only for the tests that use it)."""
    out = tmp_path_factory.mktemp("train_vq") / "reference"
    proc = train(out, tiny_args)
    assert_ok(proc)
    return out, proc


def test_run_folder_is_complete(reference_run, tiny_images):
    run, proc = reference_run
    config = json.loads((run / "config.json").read_text())
    assert config["stage"] == "vqvae" and config["num_processes"] == 1
    assert config["model"]["codebook_size"] == 64 and config["train"]["steps"] == STEPS
    assert "global batch 8 = 1 processes" in proc.stdout

    records = metrics_of(run)
    assert [r["step"] for r in records] == [6, 12]
    for r in records:
        assert {"step", "psnr", "codebook_usage", "perplexity", "images_per_s", "global_batch"} <= r.keys()
        assert r["global_batch"] == BATCH and r["images_seen"] == r["step"] * BATCH and r["skipped_steps"] == 0
        assert r["num_images"] == EVAL_IMAGES and 0 < r["codebook_usage"] <= 1 and 1 <= r["perplexity"] <= 64
        assert r["images_per_s"] > 0 and 0 < r["psnr"] < 60

    with Image.open(run / "reconstructions.png") as im:
        assert im.width > 8 * 16 and im.height > 2 * 16  # 8 originals above their 8 reconstructions

    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_00000004", "step_00000008", "step_00000012"]
    assert len(checkpoints) <= KEEP_LAST and all(verify_checkpoint(p) is None for p in checkpoints)
    # the exported weights are the final ones: the same tensors as the last checkpoint's model
    assert_same_weights(weights_of(run), load_file(checkpoints[-1] / "model.safetensors"))

    # the folder alone rebuilds the tokenizer, and it reproduces the logged held-out PSNR
    tokenizer = vqvae.load_tokenizer(run)
    held_out = load_dataset(str(tiny_images), 16, "test")
    images = torch.stack([held_out[i][0] for i in range(EVAL_IMAGES)])
    codes = tokenizer.encode(images)
    assert codes.shape == (EVAL_IMAGES, 4, 4) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    with torch.no_grad():
        recon = tokenizer.decode(codes)
        assert recon.shape == images.shape
        assert torch.allclose(recon, tokenizer(images).recon, atol=1e-5)
    assert float(psnr(recon.clamp(-1, 1), images)) == pytest.approx(records[-1]["psnr"], abs=1e-3)


def main_error(module, capsys, *argv) -> str:
    """Run train_vq.main in-process where it must stop before any work; return its error message."""
    with pytest.raises(SystemExit) as exit_info:
        module.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ")
    return message


def test_existing_run_needs_resume(reference_run, tiny_args, train_vq_module, capsys):
    run, _ = reference_run
    before = (run / "metrics.jsonl").read_text()
    message = main_error(train_vq_module, capsys, *tiny_args, "--out", run)
    assert "already holds a run" in message and "--resume" in message
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_rejects_a_changed_frozen_setting(reference_run, train_vq_module, capsys):
    run, _ = reference_run
    message = main_error(train_vq_module, capsys, "--out", run, "--resume", "--codebook-size", "32")
    assert "codebook_size" in message and "cannot change" in message


def test_wrong_stage_and_damaged_folders_are_clear_errors(reference_run, tmp_path, train_vq_module, capsys):
    run, _ = reference_run
    other = tmp_path / "stage2"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "stage": "maskgit"}))
    with pytest.raises(RunFolderError, match="'maskgit' run, expected a 'vqvae' run"):
        vqvae.load_tokenizer(other)
    assert "'maskgit' run" in main_error(train_vq_module, capsys, "--out", other, "--resume")
    assert "not a folder" in main_error(train_vq_module, capsys, "--out", tmp_path / "nothing", "--resume")

    truncated = tmp_path / "truncated"
    shutil.copytree(run, truncated, ignore=shutil.ignore_patterns("checkpoints"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(RunFolderError, match="truncated or corrupt"):
        vqvae.load_tokenizer(truncated)


def test_killed_run_resumes_to_identical_weights(reference_run, tiny_args, tmp_path):
    run, _ = reference_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "train_vq.py", *tiny_args, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not (out / "checkpoints" / "step_00000004").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "step_00000012").exists()  # killed mid-run

    resumed = run_script(["train_vq.py", "--out", out, "--resume"])  # settings come from the run folder
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout
    assert_same_weights(weights_of(out), weights_of(run))
    final, expected = metrics_of(out)[-1], metrics_of(run)[-1]
    for key in ("step", "loss", "psnr", "codebook_usage", "perplexity", "images_seen", "lr"):
        assert final[key] == expected[key], key


def test_resume_from_an_explicit_checkpoint(reference_run, tmp_path):
    run, _ = reference_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    proc = run_script(["train_vq.py", "--out", copy, "--resume", copy / "checkpoints" / "step_00000008"])
    assert_ok(proc)
    assert "step_00000008 at step 8" in proc.stdout  # not the newer step_00000012
    assert_same_weights(weights_of(copy), weights_of(run))  # steps 9..12 replayed exactly


def test_nonfinite_loss_stops_the_run_and_keeps_checkpoints(tiny_args, tmp_path):
    out = tmp_path / "nan"
    proc = train(out, tiny_args, "--lr", "1e6", "--save-every", "1")
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert "loss is nan at step" in message and "--skip-nonfinite" in message, proc.stderr[-3000:]
    kept = sorted((out / "checkpoints").iterdir())
    assert kept and all(verify_checkpoint(p) is None for p in kept)
    assert kept[-1].name in message


def test_skip_nonfinite_finishes_with_finite_weights(tiny_args, tmp_path):
    out = tmp_path / "skip"
    proc = train(out, tiny_args, "--lr", "1e6", "--skip-nonfinite", "--steps", "6", "--eval-every", "3",
                 "--save-every", "3")
    assert_ok(proc)
    at_3, at_6 = metrics_of(out)
    assert at_6["step"] == 6 and 0 < at_3["skipped_steps"]
    assert at_6["skipped_steps"] - at_3["skipped_steps"] == 3, "expected steps 4-6 all to be skipped"
    # skipped updates touch neither the weights nor the EMA codebook: step 6 holds exactly step 3's tensors
    final = weights_of(out)
    assert all(torch.isfinite(t.float()).all() for t in final.values())
    assert_same_weights(final, load_file(out / "checkpoints" / "step_00000003" / "model.safetensors"))
    vqvae.load_tokenizer(out)


def test_two_processes(tiny_args, tmp_path):
    out = tmp_path / "ddp"
    proc = run_script([*launch_args(2), "train_vq.py", *tiny_args, "--out", out])
    assert_ok(proc)
    assert "global batch 8 = 2 processes x 1 accumulation x 4" in proc.stdout
    assert json.loads((out / "config.json").read_text())["num_processes"] == 2
    for checkpoint in (out / "checkpoints").iterdir():
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
        assert verify_checkpoint(checkpoint) is None
    for r in metrics_of(out):  # evaluation covers both processes' shares, gathered
        assert r["num_images"] == EVAL_IMAGES and r["global_batch"] == BATCH
        assert r["images_seen"] == r["step"] * BATCH
    vqvae.load_tokenizer(out)


def test_processes_stay_in_sync(tmp_path):
    verdict_path = tmp_path / "verdict.json"
    proc = run_script([*launch_args(2), "tests/helpers/dist_check.py", verdict_path])
    assert_ok(proc)
    verdict = json.loads(verdict_path.read_text())
    assert verdict["num_processes"] == 2 and verdict["distributed_type"].endswith("MULTI_CPU")
    assert verdict["built_with_sync"] and verdict["data_differs"] and verdict["codebook_moved"]
    assert verdict["params_equal"] and verdict["codebook_equal"]
    assert not verdict["control_codebook_equal"]  # without codebook sync they drift apart: the check can fail
    assert verdict["shares_disjoint"]
