"""Data end to end through the scripts: unreadable files mid-run (counted in metrics.jsonl, also through loader
workers), --verify-images, Hugging Face sources, the token cache built by two processes, and the 16x16-grid path
(sampling, editing, export)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_MODEL, TINY_TRAIN, launch_args, run_script

pytestmark = pytest.mark.slow

TINY_MASKGIT = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-size", "8", "--num-eval-images", "8",
                "--steps", "2", "--save-every", "2", "--eval-every", "2", "--sample-every", "2",
                "--num-sample-images", "4", "--warmup-steps", "1", "--tune-samples", "20"]  # measured defaults: cheaply


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKGIT_IMAGE_CACHE_DIR", str(tmp_path / "image_cache"))  # run_script copies os.environ


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def metrics_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def damaged_images(tiny_images, tmp_path):
    """A copy of the tiny folder with 20 of its 240 files broken (garbage, truncated, empty)."""
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_images, folder)
    for i, path in enumerate(sorted(folder.glob("*.png"))[5::12]):
        data = path.read_bytes()
        path.write_bytes([b"garbage", data[: len(data) // 3], b""][i % 3])
    return folder


def test_unreadable_files_are_skipped_counted_or_verified(damaged_images, tmp_path):
    args = ["--data", damaged_images, *TINY_MODEL, *TINY_TRAIN, "--image-cache", "off"]
    streamed = run_script(["train_vq.py", *args, "--out", tmp_path / "streamed"])
    assert_ok(streamed)
    assert "skipping unreadable image" in streamed.stderr
    records = metrics_of(tmp_path / "streamed")
    assert all("unreadable_images" in r for r in records) and records[-1]["unreadable_images"] > 0

    verified = run_script(["train_vq.py", *args, "--verify-images", "--out", tmp_path / "verified"])
    assert_ok(verified)
    assert "unreadable image file(s)" in verified.stderr and "skipping unreadable" not in verified.stderr
    assert metrics_of(tmp_path / "verified")[-1]["unreadable_images"] == 0

    export = run_script(["export_dataset.py", "--data", damaged_images, "--image-size", "16", "--split", "train",
                         "--verify-images", "--out", tmp_path / "refs"])
    assert_ok(export)
    assert len(np.load(tmp_path / "refs" / "data.npz")["arr_0"]) == len(list((tmp_path / "refs" / "images").iterdir()))
    assert len(np.load(tmp_path / "refs" / "data.npz")["arr_0"]) < 216  # broken training files left out


def test_loader_workers_train_stream_and_count_unreadable_files(damaged_images, tmp_path):
    """Training through DataLoader workers (--num-workers 2: batch blocks in shared memory, per-worker counters of
    unreadable files) runs, counts the broken files its workers skipped exactly as a run without workers counts them
    (the same seeded batches; the held-out evaluation reads in the training process, so a lost worker count shows as
    a smaller total), and resumes. The presets train with 0 workers: this is the worker path end to end."""
    args = ["--data", damaged_images, *TINY_MODEL, *TINY_TRAIN, "--image-cache", "off"]
    in_process = run_script(["train_vq.py", *args, "--steps", "6", "--out", tmp_path / "in_process"])
    assert_ok(in_process)
    args += ["--num-workers", "2"]
    first = run_script(["train_vq.py", *args, "--steps", "6", "--out", tmp_path / "workers"])
    assert_ok(first)
    counted = metrics_of(tmp_path / "workers")[-1]["unreadable_images"]
    assert counted > 0 and counted == metrics_of(tmp_path / "in_process")[-1]["unreadable_images"]
    resumed = run_script(["train_vq.py", *args, "--steps", "12", "--resume", "--out", tmp_path / "workers"])
    assert_ok(resumed)
    records = metrics_of(tmp_path / "workers")
    assert records[-1]["step"] == 12 and records[-1]["unreadable_images"] > 0


def test_hugging_face_source_through_both_stages(tmp_path):
    datasets = pytest.importorskip("datasets")
    from core.data import make_shapes

    images, labels = make_shapes(80, 16)
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images],
                                     "y": labels.tolist()}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    spec = f"hf:{tmp_path / 'saved'}?image=img&label=y"
    vq = tmp_path / "vq"
    assert_ok(run_script(["train_vq.py", "--data", spec, *TINY_MODEL, *TINY_TRAIN, "--steps", "2", "--out", vq]))
    assert json.loads((vq / "config.json").read_text())["data"]["data"] == spec
    mg = tmp_path / "mg"
    proc = run_script(["train_maskgit.py", "--vq", vq, *TINY_MASKGIT, "--out", mg])
    assert_ok(proc)
    config = json.loads((mg / "config.json").read_text())
    assert config["classes"] == [str(i) for i in range(10)] and config["num_classes"] == 10
    export = run_script(["export_dataset.py", "--data", spec, "--image-size", "16", "--split", "test",
                         "--out", tmp_path / "refs"])
    assert_ok(export)
    assert np.load(tmp_path / "refs" / "data.npz")["arr_0"].shape[1:] == (16, 16, 3)


def test_token_cache_by_two_processes_equals_one(tiny_labelled_images, tmp_path):
    vq = tmp_path / "vq"
    assert_ok(run_script(["train_vq.py", "--data", tiny_labelled_images, *TINY_MODEL, *TINY_TRAIN, "--steps", "2",
                          "--out", vq]))
    one = run_script(["train_maskgit.py", "--vq", vq, *TINY_MASKGIT, "--cache-dir", tmp_path / "c1",
                      "--out", tmp_path / "m1"])
    assert_ok(one)
    two = run_script([*launch_args(2), "train_maskgit.py", "--vq", vq, *TINY_MASKGIT, "--cache-dir", tmp_path / "c2",
                      "--out", tmp_path / "m2"])
    assert_ok(two)
    files = {d: sorted((tmp_path / d).glob("codes-*.safetensors")) for d in ("c1", "c2")}
    assert [p.name for p in files["c1"]] == [p.name for p in files["c2"]] and len(files["c1"]) == 2
    for a, b in zip(files["c1"], files["c2"]):
        assert a.read_bytes() == b.read_bytes()  # the same file, whoever encoded which shard
        assert load_file(a)["codes"].dtype.itemsize == 1  # 64 codes: uint8
    assert not list((tmp_path / "c2").glob("*.parts"))


def test_16x16_grids_sample_edit_and_export(tiny_labelled_images, tmp_path):
    """The 256-px path on a budget: 64 px at f=4 gives the same 16x16 code grid as 256 px at f=16."""
    vq = tmp_path / "vq"
    model = [a for a in TINY_MODEL]
    model[model.index("--image-size") + 1] = "64"
    assert_ok(run_script(["train_vq.py", "--data", tiny_labelled_images, *model, "--downsample", "4", *TINY_TRAIN,
                          "--steps", "2", "--out", vq]))
    mg = tmp_path / "mg"
    assert_ok(run_script(["train_maskgit.py", "--vq", vq, *TINY_MASKGIT, "--out", mg]))
    assert json.loads((mg / "config.json").read_text())["grid"] == [16, 16]

    samples = tmp_path / "samples"
    assert_ok(run_script(["sample.py", "--checkpoint", mg, "--out", samples, "--num", "4", "--batch-size", "4",
                          "--steps", "4"]))
    assert np.load(samples / "samples.npz")["arr_0"].shape == (4, 64, 64, 3)

    init = tmp_path / "init.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(init)
    edit = tmp_path / "edit"
    assert_ok(run_script(["sample.py", "--checkpoint", mg, "--out", edit, "--num", "2", "--batch-size", "2",
                          "--steps", "4", "--init-image", init, "--mask-box", "0,0,32,32"]))
    meta = json.loads((edit / "meta.json").read_text())
    assert meta["grid"] == [16, 16] and meta["edit"]["mask_box"] == "0,0,32,32"
    assert np.load(edit / "samples.npz")["arr_0"].shape == (2, 64, 64, 3)

    refs = tmp_path / "refs"
    assert_ok(run_script(["export_dataset.py", "--data", tiny_labelled_images, "--image-size", "64", "--split", "test",
                          "--limit", "8", "--out", refs]))
    assert np.load(refs / "data.npz")["arr_0"].shape == (8, 64, 64, 3)
