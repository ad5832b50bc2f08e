"""train_vq.py with the VQGAN objective end to end: exact resume with a discriminator, D idle before its start,
LPIPS from a local folder of (random) weights, and two processes keeping D in sync."""

import json
import shutil

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from conftest import launch_args, run_script
from vqvae.perceptual import HEADS_FILENAME, VGG16_FILENAME

pytestmark = pytest.mark.slow

GAN = ["--disc-weight", "0.5", "--disc-start", "4", "--disc-channels", "8", "--disc-layers", "2",
       "--lecam-weight", "0.001"]
DISC_FILE = "model_1.safetensors"  # accelerate's name for the second prepared model (the discriminator)


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def metrics_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory, tiny_args):
    out = tmp_path_factory.mktemp("vqgan") / "run"
    assert_ok(run_script(["train_vq.py", *tiny_args, *GAN, "--out", out]))
    return out


def test_resume_with_a_discriminator_is_exact(gan_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(gan_run, copy)
    proc = run_script(["train_vq.py", "--out", copy, "--resume", copy / "checkpoints" / "step_00000008"])
    assert_ok(proc)
    assert_same(load_file(copy / "model.safetensors"), load_file(gan_run / "model.safetensors"))
    last = "checkpoints/step_00000012/"
    assert_same(load_file(copy / last / DISC_FILE), load_file(gan_run / last / DISC_FILE))
    final, expected = metrics_of(copy)[-1], metrics_of(gan_run)[-1]
    for key in ("loss", "gan", "gan_weight", "disc_total", "disc_lecam", "psnr", "ssim"):
        assert final[key] == expected[key], key


def test_discriminator_trains_only_from_its_start_step(gan_run, tiny_args, tmp_path):
    first, last = (load_file(gan_run / f"checkpoints/step_{s:08d}" / DISC_FILE) for s in (4, 12))
    assert any(not torch.equal(first[k], last[k]) for k in first), "D never trained"
    metrics = metrics_of(gan_run)  # evaluations at steps 6 and 12 (conftest's --eval-every 6)
    assert all(r["gan"] != 0 and r["disc_total"] > 0 for r in metrics)
    idle = tmp_path / "idle"  # D starts after the last step: never updated, so every checkpoint holds its start
    assert_ok(run_script(["train_vq.py", *tiny_args, *GAN, "--disc-start", "100", "--out", idle]))
    ckpts = [load_file(idle / f"checkpoints/step_{s:08d}" / DISC_FILE) for s in (4, 8, 12)]
    assert_same(ckpts[0], ckpts[2])
    assert all(r["gan"] == 0 and "disc_total" not in r for r in metrics_of(idle))


def test_perceptual_loss_with_local_weights(tiny_args, tmp_path):
    weights = tmp_path / "lpips"
    weights.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), weights / VGG16_FILENAME)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))},
               weights / HEADS_FILENAME)
    out = tmp_path / "run"
    assert_ok(run_script(["train_vq.py", *tiny_args, "--steps", "6", "--perceptual-weight", "1",
                          "--perceptual-weights", weights, "--out", out]))
    record = metrics_of(out)[-1]
    assert record["perceptual"] > 0 and record["lpips"] > 0 and 0 < record["ssim"] <= 1


def test_missing_perceptual_weights_stop_before_training(tiny_args, tmp_path):
    proc = run_script(["train_vq.py", *tiny_args, "--perceptual-weight", "1", "--perceptual-weights",
                       tmp_path / "missing.pth", "--out", tmp_path / "run"])
    assert proc.returncode == 2 and "missing.pth" in proc.stderr and "--perceptual-weight" in proc.stderr


def test_two_processes_keep_the_discriminator_in_sync(tmp_path):
    verdict_path = tmp_path / "verdict.json"
    assert_ok(run_script([*launch_args(2), "tests/helpers/dist_check_gan.py", verdict_path]))
    verdict = json.loads(verdict_path.read_text())
    assert verdict["num_processes"] == 2 and verdict["data_differs"]
    assert verdict["disc_moved"] and verdict["disc_equal"] and verdict["tokenizer_equal"]
    assert not verdict["control_equal"]  # unsynchronised copies drift apart: the comparison can fail
