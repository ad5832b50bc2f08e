"""train_maskgit.py end to end: run folder contents, the token cache, exact resume, non-finite losses, clear
errors, two processes (weights in sync, critic-only phases under DDP)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file

import maskgit
import vqvae
from core.data import load_dataset
from core.checkpoints import verify_checkpoint
from core.runs import RunFolderError
from maskgit.tune import pick

from conftest import REPO, launch_args, run_script, script_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STEPS, BATCH, EVAL_IMAGES, KEEP_LAST, CODEBOOK, CLASSES = 12, 16, 16, 2, 64, 10
TINY_MASKGIT = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", BATCH, "--num-eval-images", EVAL_IMAGES,
                "--steps", STEPS, "--save-every", "4", "--eval-every", "6", "--sample-every", "6",
                "--num-sample-images", "10", "--keep-last", KEEP_LAST, "--tune-cfg", "0", "2",
                "--tune-temperatures", "1", "--tune-choice-temperatures", "4.5", "--tune-remask", "false", "true",
                "--tune-samples", "20"]
CRITIC_KEYS = {"critic_loss", "eval_critic_loss", "eval_critic_acc"}


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def train(out, args, *extra, launch=(), timeout=300):
    return run_script([*launch, "train_maskgit.py", *args, "--out", out, *extra], timeout=timeout)


def metrics_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint_names(run):
    return [p.name for p in sorted((run / "checkpoints").iterdir())]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def changed(before, after) -> set[str]:
    return {k for k in after if not torch.equal(before[k], after[k])}


def ema_in_checkpoint(checkpoint) -> dict:
    """The EMA weights saved in a resume checkpoint (ema.safetensors, in the run folder's own format)."""
    return load_file(checkpoint / "ema.safetensors")


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, tiny_args):
    """A tiny stage-1 run (4x4 grids of 64 codes) on the flat `tiny_images` folder."""
    out = tmp_path_factory.mktemp("train_maskgit") / "vq"
    assert_ok(run_script(["train_vq.py", *tiny_args, "--out", out]))
    return out


@pytest.fixture(scope="module")
def mg_args(vq_run, tiny_labelled_images):
    """Stage-2 arguments (add --out): the tokenizer above, on the same shapes sorted into 10 class folders."""
    return ["--vq", vq_run, "--data", tiny_labelled_images, *TINY_MASKGIT]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, mg_args):
    """One uninterrupted 12-step class-conditional run with a self critic (read-only for its users)."""
    out = tmp_path_factory.mktemp("train_maskgit") / "reference"
    proc = train(out, mg_args, "--critic", "self")
    assert_ok(proc)
    return out, proc


def held_out(run, tiny_labelled_images):
    """The held-out code grids (b, h*w) and labels an evaluation of `run` sees, encoded here independently."""
    tokenizer = vqvae.load_tokenizer(json.loads((run / "config.json").read_text())["data"]["vq_run"])
    dataset = load_dataset(str(tiny_labelled_images), 16, "test")
    images = torch.stack([dataset[i][0] for i in range(EVAL_IMAGES)])
    labels = torch.tensor([dataset[i][1] for i in range(EVAL_IMAGES)])
    return tokenizer.encode(images).flatten(1), labels


def assert_logged_eval_reproduces(run, record, tiny_labelled_images, processes: int):
    """Recompute the final evaluation from the exported EMA weights: each process's share, seeded 1234 + rank."""
    model, _, _ = maskgit.load_maskgit(run)
    codes, labels = held_out(run, tiny_labelled_images)
    shares = zip(codes.chunk(processes), labels.chunk(processes))
    per_process = [model.evaluate(c, y, generator=torch.Generator().manual_seed(1234 + rank))
                   for rank, (c, y) in enumerate(shares)]
    for name in per_process[0]:
        expected = sum(m[name] for m in per_process) / processes
        assert record[f"eval_{name}"] == pytest.approx(expected, rel=1e-4, abs=1e-6), name


def assert_generates(run, labels):
    """The run folder alone rebuilds model and tokenizer; a 4-step sample gives valid codes that decode."""
    model, tokenizer, loaded = maskgit.load_maskgit(run)
    config = loaded.config
    codes = model.generate(labels=labels, steps=4, generator=torch.Generator().manual_seed(0))
    count = len(labels)
    assert codes.shape == (count, 16) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < config["codebook_size"]
    with torch.no_grad():
        images = tokenizer.decode(codes.view(count, *config["grid"]))
    assert images.shape == (count, 3, 16, 16) and torch.isfinite(images).all()
    return model


# ---------------------------------------------------------------------------------------------- one run


def test_run_folder_is_complete(reference_run, vq_run, tiny_labelled_images):
    run, proc = reference_run
    config = json.loads((run / "config.json").read_text())
    assert config["stage"] == "maskgit" and config["step"] == STEPS and config["num_processes"] == 1
    assert config["data"]["vq_run"] == str(vq_run.resolve()) and os.path.isabs(config["data"]["vq_run"])
    assert config["classes"] == sorted(p.name for p in tiny_labelled_images.iterdir())
    assert config["num_classes"] == CLASSES and config["grid"] == [4, 4] and config["codebook_size"] == CODEBOOK
    assert config["model"]["critic"] == "self" and config["model"]["dim"] == 32 and config["ema"] is True
    assert "global batch 16 = 1 processes x 1 accumulation x 16" in proc.stdout

    records = metrics_of(run)
    assert [r["step"] for r in records] == [6, 12]
    for r in records:
        assert {"loss", "generator_loss", "eval_loss", "eval_masked_acc", "images_per_s", "global_batch"} <= r.keys()
        assert CRITIC_KEYS <= r.keys()
        assert r["global_batch"] == BATCH and r["images_seen"] == r["step"] * BATCH and r["skipped_steps"] == 0
        assert r["images_per_s"] > 0 and r["eval_loss"] > 0 and r["generator_loss"] > 0 and r["critic_loss"] > 0
        assert 0 <= r["eval_masked_acc"] <= 1 and 0 <= r["eval_critic_acc"] <= 1
        assert r["loss"] > r["generator_loss"]  # joint training: generator loss + weighted critic loss
    assert_logged_eval_reproduces(run, records[-1], tiny_labelled_images, processes=1)

    # one row per class, num_sample_images // classes = 1 column, 16px cells with 2px padding
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000006.png", "step_00000012.png"]
    with Image.open(run / "samples" / "step_00000012.png") as im:
        assert im.size == (1 * 18 + 2, CLASSES * 18 + 2)

    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_00000008", "step_00000012"]  # keep_last=2 pruned step 4
    assert all(verify_checkpoint(p) is None for p in checkpoints)
    raw, ema = load_file(run / "model.safetensors"), load_file(run / "ema.safetensors")
    assert_same_weights(raw, load_file(checkpoints[-1] / "model.safetensors"))
    assert_same_weights(ema, ema_in_checkpoint(checkpoints[-1]))
    assert changed(raw, ema), "the EMA should lag the raw weights"

    # sampling defaults measured at the end: both guidance scales scored, the pick recorded for sample.py
    sampling = config["sampling"]
    assert [(s["cfg"], s["temperature"], s["choice_temperature"], s["remask"]) for s in sampling["scores"]] == [
        (0.0, 1.0, 4.5, False), (0.0, 1.0, 4.5, True), (2.0, 1.0, 4.5, False), (2.0, 1.0, 4.5, True)]
    chosen = pick(sampling["scores"], sampling["samples_per_setting"])  # class fidelity first, then the distance
    assert ((sampling["cfg"], sampling["temperature"], sampling["remask"])
            == (chosen["cfg"], chosen["temperature"], chosen["remask"]))
    assert all(0 <= s["fidelity"] <= 1 for s in sampling["scores"])
    # 16 held-out images: too few per class for the intra-class distance, so the pooled one
    assert sampling["steps"] == 8 and sampling["metric"] == "class fidelity (code classifier), then FD"
    assert 0 <= sampling["classifier_held_out_accuracy"] <= 1
    assert "sampling settings at 8 steps" in proc.stdout

    model = assert_generates(run, labels=torch.arange(CLASSES))
    assert_same_weights(model.state_dict(), ema)  # sampling uses the EMA weights by default...
    raw_model, _, _ = maskgit.load_maskgit(run, ema=False)
    assert_same_weights(raw_model.state_dict(), raw)  # ...and the raw ones on request


def test_separate_critic(mg_args, tmp_path):
    out = tmp_path / "separate"
    assert_ok(train(out, mg_args, "--critic", "separate", "--critic-depth", "1", "--steps", "6",
                    "--sample-every", "6"))
    (record,) = metrics_of(out)
    assert record["step"] == 6 and CRITIC_KEYS <= record.keys()
    model = assert_generates(out, labels=torch.arange(3))
    assert model.token_critic is not None and model.critic_head is None


def assert_phases(run, critic_prefixes):
    """Generator-only steps 1-8 never touch the critic; critic-only steps 9-12 touch nothing else."""
    at_4, at_8 = (load_file(run / "checkpoints" / f"step_{s:08d}" / "model.safetensors") for s in (4, 8))
    final = load_file(run / "model.safetensors")
    critic = {k for k in final if k.startswith(critic_prefixes)}
    assert critic and changed(at_8, final) == critic
    assert changed(at_4, at_8) == set(final) - critic


def test_critic_trained_after_the_generator(mg_args, tmp_path):
    out = tmp_path / "phases"
    proc = train(out, mg_args, "--critic", "self", "--train-critic", "separate", "--steps", "8", "--critic-steps",
                 "4", "--keep-last", "3")
    assert_ok(proc)
    at_6, at_12 = metrics_of(out)
    assert (at_6["step"], at_12["step"]) == (6, 12)  # 8 generator steps, then 4 critic steps
    assert "critic_loss" not in at_6 and at_6["loss"] == at_6["generator_loss"]
    assert at_12["loss"] == at_12["critic_loss"] and at_12["generator_loss"] > 0
    assert at_12["images_seen"] == 12 * BATCH
    assert_phases(out, ("critic_head.",))


# ---------------------------------------------------------------------------------------------- token cache


def test_token_cache(vq_run, tiny_images, tmp_path):
    vq, data = tmp_path / "vq", tmp_path / "data"
    shutil.copytree(vq_run, vq, ignore=shutil.ignore_patterns("token_cache", "checkpoints"))
    shutil.copytree(tiny_images, data)
    args = ["--vq", vq, "--data", data, "--class-cond", "false", *TINY_MASKGIT, "--steps", "2", "--eval-every", "2",
            "--sample-every", "2", "--save-every", "2"]

    first = train(tmp_path / "first", args)
    assert_ok(first)
    assert "encoding dataset" in first.stderr
    cache = sorted((vq / "token_cache").glob("codes-*.safetensors"))
    assert len(cache) == 2  # train and held-out splits
    stamps = {p: p.stat().st_mtime_ns for p in cache}

    second = train(tmp_path / "second", args)  # same tokenizer, same data: the cache is read, not rebuilt
    assert_ok(second)
    assert "encoding dataset" not in second.stderr
    assert {p: p.stat().st_mtime_ns for p in (vq / "token_cache").glob("codes-*.safetensors")} == stamps

    # the cached codes are the tokenizer's codes of each image, as given (view 0) and mirrored (view 1)
    tokenizer = vqvae.load_tokenizer(vq)
    by_views = {t["codes"].shape[1]: t for t in map(load_file, cache)}
    for split, views in (("train", 2), ("test", 1)):
        dataset = load_dataset(str(data), 16, split)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        expected = torch.stack([tokenizer.encode(v) for v in (images, images.flip(-1))[:views]], dim=1)
        assert torch.equal(by_views[views]["codes"].long(), expected), split
        assert torch.equal(by_views[views]["labels"], torch.full((len(dataset),), -1))

    with Image.open(data / "0000.png") as im:  # a new image: the dataset's fingerprint changes
        im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(data / "extra.png")
    third = train(tmp_path / "third", args)
    assert_ok(third)
    assert "encoding dataset" in third.stderr
    now = sorted((vq / "token_cache").glob("codes-*.safetensors"))
    assert len(now) == 4 and {p: p.stat().st_mtime_ns for p in cache} == stamps  # new files beside the old
    new = [load_file(p)["codes"] for p in now if p not in stamps]
    assert sum(len(c) for c in new) == len(list(tiny_images.glob("*.png"))) + 1  # in one of the two splits


# ---------------------------------------------------------------------------------------------- resume


def test_killed_run_resumes_to_identical_weights(reference_run, mg_args, tmp_path):
    run, _ = reference_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "train_maskgit.py", *map(str, mg_args), "--critic", "self", "--out", str(out)]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 240
        try:
            while not (out / "checkpoints" / "step_00000004").exists():
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "step_00000012").exists()  # killed mid-run

    resumed = run_script(["train_maskgit.py", "--out", out, "--resume"])  # settings come from the run folder
    assert_ok(resumed)
    assert "resumed from" in resumed.stdout
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(load_file(out / name), load_file(run / name))
    records, expected = metrics_of(out), metrics_of(run)
    assert [r["step"] for r in records] == [6, 12]  # no step logged twice
    for key in ("loss", "generator_loss", "critic_loss", "eval_loss", "eval_masked_acc", "eval_critic_acc",
                "images_seen", "lr"):
        assert records[-1][key] == expected[-1][key], key
    assert checkpoint_names(out) == checkpoint_names(run)


# ---------------------------------------------------------------------------------------------- non-finite


def test_nonfinite_loss_stops_the_run_and_keeps_checkpoints(mg_args, tmp_path):
    out = tmp_path / "nan"
    proc = train(out, mg_args, "--lr", "1e6", "--save-every", "1")
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert "loss is nan at step" in message and "--skip-nonfinite" in message, proc.stderr[-3000:]
    kept = sorted((out / "checkpoints").iterdir())
    assert kept and len(kept) <= KEEP_LAST and all(verify_checkpoint(p) is None for p in kept)
    failed_at = int(re.search(r"at step (\d+)", message).group(1))
    assert kept[-1].name in message and kept[-1].name == f"step_{failed_at - 1:08d}"  # the step before the NaN


def test_skip_nonfinite_finishes_with_finite_weights(mg_args, tmp_path):
    out = tmp_path / "skip"
    proc = train(out, mg_args, "--lr", "1e6", "--skip-nonfinite", "--steps", "6", "--eval-every", "3",
                 "--save-every", "3", "--sample-every", "6")
    assert_ok(proc)
    at_3, at_6 = metrics_of(out)
    assert at_6["step"] == 6 and at_6["skipped_steps"] > 0
    assert at_6["skipped_steps"] - at_3["skipped_steps"] == 3, "expected steps 4-6 all to be skipped"
    # skipped updates touch neither the weights nor the EMA: step 6 holds exactly step 3's tensors
    raw, ema = load_file(out / "model.safetensors"), load_file(out / "ema.safetensors")
    assert all(torch.isfinite(t).all() for t in [*raw.values(), *ema.values()])
    step_3 = out / "checkpoints" / "step_00000003"
    assert_same_weights(raw, load_file(step_3 / "model.safetensors"))
    assert_same_weights(ema, ema_in_checkpoint(step_3))
    maskgit.load_maskgit(out)


# ---------------------------------------------------------------------------------------------- clear errors


def main_error(module, capsys, *argv) -> str:
    """Run train_maskgit.main in-process where it must stop before any work; return its error message."""
    with pytest.raises(SystemExit) as exit_info:
        module.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ")
    return message


def test_config_errors(reference_run, vq_run, mg_args, tmp_path, train_maskgit_module, capsys):
    run, _ = reference_run
    before = (run / "metrics.jsonl").read_text(), checkpoint_names(run)

    message = main_error(train_maskgit_module, capsys, *mg_args, "--out", run)
    assert "already holds a run" in message and "--resume" in message
    message = main_error(train_maskgit_module, capsys, "--out", run, "--resume", "--dim", "64")
    assert "['dim']" in message and "cannot change" in message
    other_vq = tmp_path / "other_vq"  # the same tokenizer, copied elsewhere: still not the one recorded
    shutil.copytree(vq_run, other_vq, ignore=shutil.ignore_patterns("token_cache", "checkpoints"))
    message = main_error(train_maskgit_module, capsys, "--out", run, "--resume", "--vq", other_vq)
    assert "differs from the tokenizer this run was trained on" in message and str(vq_run.resolve()) in message
    assert ((run / "metrics.jsonl").read_text(), checkpoint_names(run)) == before  # the run is untouched

    # the two stages' folders swapped
    message = main_error(train_maskgit_module, capsys, "--vq", run, "--out", tmp_path / "new")
    assert "is a stage-2 (MaskGIT transformer) run, not a tokenizer" in message and "stage-1" in message
    assert not (tmp_path / "new").exists()
    with pytest.raises(RunFolderError, match="'vqvae' run, expected a 'maskgit' run"):
        maskgit.load_maskgit(vq_run)


def test_class_cond_needs_labels(vq_run, tiny_images, tmp_path):
    out = tmp_path / "flat"
    proc = train(out, ["--vq", vq_run, "--data", tiny_images, *TINY_MASKGIT, "--class-cond"])
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()[-1]
    assert "--class-cond needs a labelled dataset" in message and "--class-cond false" in message
    assert not (out / "config.json").exists()  # nothing to resume or to clean up


# ---------------------------------------------------------------------------------------------- two processes


def run_with_timeout(args, timeout: float) -> subprocess.CompletedProcess:
    """`python ARGS` in its own process group, which is killed whole if it runs past `timeout` (a hang)."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=script_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"two-process run still going after {timeout} s (hung?)\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_two_processes(mg_args, tiny_labelled_images, tmp_path):
    out = tmp_path / "ddp"
    proc = run_with_timeout([*launch_args(2), "train_maskgit.py", *mg_args, "--critic", "separate",
                             "--critic-depth", "1", "--out", out], timeout=300)
    assert_ok(proc)
    assert "global batch 16 = 2 processes x 1 accumulation x 8" in proc.stdout
    assert json.loads((out / "config.json").read_text())["num_processes"] == 2
    for checkpoint in (out / "checkpoints").iterdir():
        assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
        assert verify_checkpoint(checkpoint) is None
        # masks come from the global torch RNG: the processes must not draw the same ones for their shares
        rng = [accelerate_load(checkpoint / f"random_states_{r}.pkl")["torch_manual_seed"]  # weights_only=True
               for r in (0, 1)]
        assert not torch.equal(*rng), "both processes hold the same RNG state, so they drew the same masks"
    records = metrics_of(out)
    assert [r["step"] for r in records] == [6, 12]
    for r in records:
        assert r["global_batch"] == BATCH and r["images_seen"] == r["step"] * BATCH and CRITIC_KEYS <= r.keys()
    # the logged evaluation is the mean over both processes' halves of the held-out grids
    assert_logged_eval_reproduces(out, records[-1], tiny_labelled_images, processes=2)
    assert_generates(out, labels=torch.arange(CLASSES))


def test_two_processes_critic_phase(mg_args, tmp_path):
    """Phases that leave parameters without gradients (DDP's find_unused_parameters) neither hang nor crash."""
    out = tmp_path / "ddp_phases"
    proc = run_with_timeout([*launch_args(2), "train_maskgit.py", *mg_args, "--critic", "separate",
                             "--critic-depth", "1", "--train-critic", "separate", "--steps", "8", "--critic-steps",
                             "4", "--keep-last", "3", "--out", out], timeout=300)
    assert_ok(proc)
    assert [r["step"] for r in metrics_of(out)] == [6, 12]
    assert_phases(out, ("token_critic.", "critic_"))


def test_processes_stay_in_sync(tmp_path):
    verdict_path = tmp_path / "verdict.json"
    assert_ok(run_with_timeout([*launch_args(2), "tests/helpers/dist_check_maskgit.py", verdict_path], timeout=300))
    verdict = json.loads(verdict_path.read_text())
    assert verdict["num_processes"] == 2 and verdict["distributed_type"].endswith("MULTI_CPU")
    assert verdict["data_differs"] and verdict["params_moved"]
    assert verdict["params_equal"] and verdict["joint_params_equal"]
    assert not verdict["control_params_equal"]  # without DDP the copies drift apart: the check can fail
    assert verdict["critic_phase_changed"] == ["critic_head.bias", "critic_head.weight"]
    assert verdict["generator_phase_changed"] == verdict["generator_params"]
