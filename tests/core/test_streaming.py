"""Streamed datasets (folders, Hugging Face), the image cache, the token cache, and the bad inputs they must survive."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import core.data as data_mod
from core import image_cache, sharded
from core.data import (PROBES, FolderDataset, StreamingDataset, center_crop_arr, dataset_fingerprint, decode_image,
                       load_dataset, to_tensor, train_loader, unreadable_images)
from core.order import StepBatchSampler
from maskgit import token_cache

from conftest import REPO, script_env

S = 8


def noise_png(path, h=S, w=S, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return a


def folder_of(tmp_path, n=40, classes=("a", "b"), size=12):
    root = tmp_path / "data"
    for i in range(n):
        noise_png(root / classes[i % len(classes)] / f"{i:03d}.png", size, size, seed=i)
    return root


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Image caches of these tests go to a temporary folder, never to ~/.cache."""
    monkeypatch.setenv("MASKGIT_IMAGE_CACHE_DIR", str(tmp_path / "image_cache"))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- streaming folders

def test_folder_streams_from_a_packed_file_list(tmp_path):
    root = folder_of(tmp_path)
    ds = load_dataset(str(root), S, "train")
    assert isinstance(ds, FolderDataset) and ds.classes == ["a", "b"]
    # no per-image Python objects: names live in two numpy arrays, labels in a third
    per_item = [k for k, v in vars(ds).items() if isinstance(v, (list, tuple, dict, set)) and len(v) >= len(ds)]
    assert per_item == [] and isinstance(ds._files.blob, np.ndarray) and isinstance(ds._labels, np.ndarray)
    for i, rel in enumerate(ds.paths):
        x, y = ds[i]
        assert torch.equal(x, to_tensor(decode_image(root / rel, S)))
        assert y == ds.classes.index(rel.split("/")[0]) == int(ds.labels[i])


def test_split_rule_is_unchanged_and_takes_names_that_are_not_utf8(tmp_path):
    root = tmp_path / "data"
    names = [f"img{i:03d}.png" for i in range(60)] + ["café.png"]
    for i, name in enumerate(names):
        noise_png(root / name, seed=i)
    odd = os.path.join(os.fsencode(root), b"caf\xe9-latin1.png")  # not valid UTF-8
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(open(odd, "wb"), format="PNG")
    train, test = (load_dataset(str(root), S, s) for s in ("train", "test"))
    old_rule = {n for n in names if int.from_bytes(hashlib.sha1(n.encode()).digest()[:8], "big") / 2**64 < 0.1}
    assert set(test.paths) - {os.fsdecode(b"caf\xe9-latin1.png")} == old_rule  # existing splits do not move
    everything = set(train.paths) | set(test.paths)
    assert os.fsdecode(b"caf\xe9-latin1.png") in everything and len(everything) == len(names) + 1
    for ds in (train, test):
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, S, S)


def test_symlink_loops_add_nothing(tmp_path):
    root = folder_of(tmp_path, n=16)
    os.symlink("..", root / "a" / "up")  # a loop to the dataset root
    os.symlink(".", root / "b" / "self")  # a loop to itself
    with pytest.warns(UserWarning, match="symbolic links"):
        files, labels, classes = data_mod._find_images(root)
    assert len(files) == 16 and classes == ["a", "b"] and len(set(files)) == 16


def test_empty_class_folder_keeps_its_index(tmp_path):
    root = tmp_path / "data"
    for c in ("0", "2"):
        for i in range(6):
            noise_png(root / c / f"{i}.png", seed=i)
    (root / "1").mkdir()
    with pytest.warns(UserWarning, match="hold no images"):
        ds = load_dataset(str(root), S, "train")
    assert ds.classes == ["0", "1", "2"]  # --class 1 still means folder "1"
    assert {ds[i][1] for i in range(len(ds))} == {0, 2}


def test_unreadable_deleted_and_added_files_mid_run(tmp_path):
    root = folder_of(tmp_path, n=30, classes=("a",))
    ds = load_dataset(str(root), S, "train")
    n = len(ds)
    paths = ds.paths
    (root / paths[3]).write_bytes(b"not an image any more")
    (root / paths[7]).unlink()
    noise_png(root / "a" / "new.png", seed=99)  # added: not seen until a restart
    with pytest.warns(UserWarning, match="unreadable"):
        x3, y3 = ds[3]
    assert torch.equal(x3, ds[4][0]) and y3 == ds[4][1]  # the next item stands in
    with pytest.warns(UserWarning, match=paths[7]):
        assert torch.equal(ds[7][0], ds[8][0])
    assert ds.unreadable_count() == 2 and len(ds) == n
    assert "a/new.png" not in ds.paths


def test_unreadable_files_are_counted_across_workers(tmp_path):
    root = folder_of(tmp_path, n=40, classes=("a",))
    ds = load_dataset(str(root), S, "train")
    for rel in ds.paths[::4]:
        (root / rel).write_bytes(b"garbage")
    sampler = StepBatchSampler(len(ds), 8, seed=0, rank=0, world_size=1, total_steps=6)
    loader = train_loader(ds, sampler, num_workers=2, pin_memory=False, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = [tuple(x.shape) for x, _ in loader]
    assert shapes == [(8, 3, S, S)] * 6  # batches keep their shape
    assert ds.unreadable_count() > 0

    class Acc:  # the accelerate calls unreadable_images makes
        device = torch.device("cpu")

        def reduce(self, t, op):
            return t

    assert unreadable_images(Acc(), ds)["unreadable_images"] == ds.unreadable_count()


def test_a_folder_of_non_images_fails_at_load_and_verify_drops_bad_files(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    for i in range(PROBES + 5):
        (root / f"{i}.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="could be read"):
        quiet(load_dataset, str(root), S)
    good = folder_of(tmp_path, n=20, classes=("a",))
    (good / "a" / "005.png").write_bytes(b"x")
    streamed = [load_dataset(str(good), S, s) for s in ("train", "test")]
    with pytest.warns(UserWarning, match="005.png"):
        verified = [load_dataset(str(good), S, s, verify=True) for s in ("train", "test")]
    assert sum(map(len, streamed)) == 20 and sum(map(len, verified)) == 19


def test_adm_centre_crop_matches_the_reference_code():
    def adm(pil_image, image_size):  # guided-diffusion's image_datasets.center_crop_arr
        while min(*pil_image.size) >= 2 * image_size:
            pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
        scale = image_size / min(*pil_image.size)
        pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
        arr = np.array(pil_image)
        crop_y = (arr.shape[0] - image_size) // 2
        crop_x = (arr.shape[1] - image_size) // 2
        return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]

    rng = np.random.default_rng(0)
    for h, w, s in [(300, 500, 64), (517, 389, 32), (64, 64, 64), (40, 90, 64), (1000, 333, 256)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert np.array_equal(center_crop_arr(im, s), adm(im, s)), (h, w, s)


def test_exif_rotation_is_applied(tmp_path):
    from PIL import ImageOps

    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    im.save(tmp_path / "rotated.png", exif=exif)
    with Image.open(tmp_path / "rotated.png") as stored:
        expected = center_crop_arr(ImageOps.exif_transpose(stored).convert("RGB"), 16)
        unrotated = center_crop_arr(stored.convert("RGB"), 16)
    got = decode_image(tmp_path / "rotated.png", 16)
    assert np.array_equal(got, expected) and not np.array_equal(got, unrotated)


def test_random_resized_crop_is_a_function_of_seed_step_index(tmp_path):
    root = folder_of(tmp_path, n=24, classes=("a",), size=40)
    ds = load_dataset(str(root), S, "train", crop="random-resized", crop_scale=(0.3, 0.6))
    assert ds.wants_step_keys
    a, b = ds[(2, 0, 5)][0], ds[(2, 0, 5)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(2, 0, 6)][0]) and not torch.equal(a, ds[(2, 1, 5)][0])
    assert torch.equal(ds[2][0], to_tensor(decode_image(root / ds.paths[2], S)))  # plain index: centre crop

    def batches(start):
        sampler = StepBatchSampler(len(ds), 4, seed=3, rank=0, world_size=1, start_step=start, total_steps=6)
        return [x for x, _ in train_loader(ds, sampler, num_workers=0, pin_memory=False, seed=3)]

    full, resumed = batches(0), batches(4)
    assert all(torch.equal(p, q) for p, q in zip(full[4:], resumed))  # a resume sees the very same crops


@pytest.mark.parametrize("source", ["folder", "shapes8", "shapes16"])
def test_training_batches_are_uint8_and_as_float_gives_the_items_exactly(tmp_path, source):
    from core.data import as_float

    ds = (load_dataset(str(folder_of(tmp_path, n=20)), S, "train") if source == "folder" else
          load_dataset("shapes", 8, "test") if source == "shapes8" else
          load_dataset("shapes", 16, "test", crop="center"))
    if source == "shapes16":  # stored at 16 px, asked at 12: resized in float, so it travels as float
        ds.image_size = 12
    sampler = StepBatchSampler(len(ds), 4, seed=0, rank=0, world_size=1, total_steps=2)
    for step, (x, y) in enumerate(train_loader(ds, sampler, num_workers=0, pin_memory=False, seed=0)):
        assert x.dtype == (torch.float32 if source == "shapes16" else torch.uint8)
        idx = sampler.local_indices(step, 0)
        assert torch.equal(as_float(x), torch.stack([ds[i][0] for i in idx]))
        assert as_float(x).is_contiguous()
        if source == "folder":  # decoded pixels travel as stored, (b, S, S, 3); the batch is a view of them
            assert x.permute(0, 2, 3, 1).is_contiguous()
        assert y.tolist() == [ds[i][1] for i in idx]


def test_builtin_datasets_accept_step_keys():
    ds = load_dataset("shapes", 8, "test", crop="random-resized")
    assert ds[(1, 0, 0)][0].shape == (3, 8, 8) and torch.equal(ds[(1, 0, 0)][0], ds[(1, 0, 0)][0])


# ----------------------------------------------------------------------------- fingerprints (hardening case 7)

def test_fingerprint_sees_content_changes_that_keep_size_and_mtime(tmp_path, monkeypatch):
    root = folder_of(tmp_path, n=6, classes=("a",))
    victim = root / "a" / "002.png"
    before = dataset_fingerprint(str(root), S)
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF  # same size
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # `cp -p`: the old mtime
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    data_mod._DIGESTS.clear()  # a later start (within one start-up, equal metadata reuses the digest)
    assert dataset_fingerprint(str(root), S) != before

    # above the content limit: sampled content, plus the inode that `rsync -a` (temp file + rename) changes
    monkeypatch.setattr(data_mod, "CONTENT_HASH_LIMIT", 10)
    monkeypatch.setattr(data_mod, "CONTENT_SAMPLE_FILES", 1)
    sampled = dataset_fingerprint(str(root), S)
    other = root / "a" / "004.png"
    st = other.stat()
    copy = root / "a" / ".tmp"
    copy.write_bytes(other.read_bytes())
    os.replace(copy, other)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert dataset_fingerprint(str(root), S) != sampled


# ----------------------------------------------------------------------------- the image cache

def test_image_cache_serves_the_streamed_pixels_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(image_cache, "SHARD_SIZE", 8)
    root = folder_of(tmp_path, n=40)
    streamed = load_dataset(str(root), S, "train")
    cached = load_dataset(str(root), S, "train", image_cache="on")
    assert cached._cache is not None and len(cached) == len(streamed)
    for i in range(len(streamed)):
        assert torch.equal(cached[i][0], streamed[i][0]) and cached[i][1] == streamed[i][1]
    folders = list((tmp_path / "image_cache").iterdir())
    assert len(folders) == 1 and (folders[0] / "valid.npy").is_file()
    array = np.memmap(folders[0] / "images.u8", np.uint8, "r")
    assert array.size == len(streamed) * S * S * 3

    calls = []
    monkeypatch.setattr(StreamingDataset, "load_uint8", lambda self, j, u=None: calls.append(j))
    again = load_dataset(str(root), S, "train", image_cache="auto")  # <= 64 px: auto uses it
    assert again._cache is not None and calls == []  # opened, not rebuilt
    assert load_dataset(str(root), 128, "train", image_cache="auto")._cache is None  # auto: small images only


def test_image_cache_leaves_out_unreadable_files_naming_them(tmp_path):
    root = folder_of(tmp_path, n=20, classes=("a",))
    (root / "a" / "007.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="007.png"):
        sets = [load_dataset(str(root), S, s, image_cache="on") for s in ("train", "test")]
    assert sum(map(len, sets)) == 19 and all("a/007.png" not in ds.paths for ds in sets)


def test_image_cache_survives_a_full_disk_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(image_cache, "SHARD_SIZE", 4)
    monkeypatch.setattr(image_cache, "CHUNK", 2)
    root = folder_of(tmp_path, n=40)
    reference = load_dataset(str(root), S, "train")
    real_write = sharded.write_at
    budget = {"writes": 5}

    def filling_disk(fd, data, offset):
        if budget["writes"] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        budget["writes"] -= 1
        real_write(fd, data, offset)

    monkeypatch.setattr(sharded, "write_at", filling_disk)
    with pytest.warns(UserWarning, match="could not be written.*streaming"):
        fallback = load_dataset(str(root), S, "train", image_cache="auto")
    assert fallback._cache is None and torch.equal(fallback[5][0], reference[5][0])
    with pytest.raises(OSError, match="No space left"):
        quiet(load_dataset, str(root), S, "train", image_cache="on")
    folder = next((tmp_path / "image_cache").iterdir())
    assert not (folder / "valid.npy").exists()  # nothing half-written passes for a cache
    done = len(list((folder / "done-s4").iterdir()))
    assert done == 2  # 5 writes of 2 images: two whole shards of 4

    monkeypatch.setattr(sharded, "write_at", real_write)
    decoded = []
    real_load = StreamingDataset.load_uint8
    monkeypatch.setattr(StreamingDataset, "load_uint8",
                        lambda self, j, u=None: decoded.append(j) or real_load(self, j, u))
    resumed = load_dataset(str(root), S, "train", image_cache="on")
    assert len(decoded) == len(reference) - 8  # the two finished shards were kept
    for i in range(len(reference)):
        assert torch.equal(resumed[i][0], reference[i][0])


def test_preallocation_reports_enospc_up_front(tmp_path, monkeypatch):
    root = folder_of(tmp_path, n=10)

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match="No space left"):
        quiet(load_dataset, str(root), S, "train", image_cache="on")


def test_two_processes_build_one_cache(tmp_path):
    root = folder_of(tmp_path, n=60)
    code = ("import sys, warnings; warnings.simplefilter('ignore'); import core.image_cache as c; c.SHARD_SIZE = 4; "
            "from core.data import load_dataset; "
            f"ds = load_dataset({str(root)!r}, {S}, 'train', image_cache='on', progress=False); "
            "print(len(ds), ds._cache is not None)")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=script_env({"LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
                                              "MASKGIT_IMAGE_CACHE_DIR": str(tmp_path / "shared")}), text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    reference = load_dataset(str(root), S, "train")
    assert {o[0].split()[0] for o in outs} == {str(len(reference))} and all("True" in o[0] for o in outs)
    folder = next((tmp_path / "shared").iterdir())
    pixels = np.memmap(folder / "images.u8", np.uint8, "r", shape=(len(reference), S, S, 3))
    for i in range(len(reference)):
        assert torch.equal(to_tensor(np.array(pixels[i])), reference[i][0])


# ----------------------------------------------------------------------------- the token cache

class FakeTokenizer:
    """Codes = a pure function of the pixels: mean of each 2x2 cell quantised to `codebook_size` levels."""

    def __init__(self, codebook_size):
        self.codebook_size, self.calls = codebook_size, 0

    def grid_for(self, size):
        return size // 2, size // 2

    def encode(self, images):
        self.calls += 1
        cells = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 2)[:, 0]
        return ((cells + 1) / 2 * (self.codebook_size - 1)).round().long().clamp(0, self.codebook_size - 1)


def fake_vq_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    return path


@pytest.mark.parametrize("codebook, dtype", [(64, torch.uint8), (1000, torch.int16), (70_000, torch.int32)])
def test_token_cache_stores_the_smallest_type_memory_mapped(tmp_path, codebook, dtype):
    from safetensors.torch import load_file

    root = folder_of(tmp_path, n=20, classes=("a",))
    vq = FakeTokenizer(codebook)
    ds = load_dataset(str(root), S, "train")
    codes, labels, classes = token_cache.load_or_encode(tmp_path / "tc", "k", lambda: ds, vq, views="flip",
                                                        image_size=S)
    assert codes.dtype == dtype and codes.shape == (len(ds), 2, S // 2, S // 2) and labels.dtype == torch.int64
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert torch.equal(codes.long(), torch.stack([vq.encode(images), vq.encode(images.flip(-1))], 1))
    saved = load_file(tmp_path / "tc" / "codes-k.safetensors")  # a valid safetensors file
    assert torch.equal(saved["codes"], codes) and torch.equal(saved["labels"], labels)
    assert not (tmp_path / "tc" / "codes-k.parts").exists()


def test_interrupted_encode_resumes_at_the_missing_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "SHARD_SIZE", 8)
    root = folder_of(tmp_path, n=40, classes=("a",))
    ds = load_dataset(str(root), S, "train")
    real_mark = sharded.ShardedBuild.mark_done
    marks = []

    def crash_after_two(self, shard, payload):
        if len(marks) == 2:
            raise KeyboardInterrupt("killed")
        marks.append(shard)
        real_mark(self, shard, payload)

    monkeypatch.setattr(sharded.ShardedBuild, "mark_done", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        token_cache.load_or_encode(tmp_path / "tc", "k", lambda: ds, FakeTokenizer(64), views="none", image_size=S,
                                   batch_size=4)
    assert not (tmp_path / "tc" / "codes-k.safetensors").exists()
    monkeypatch.setattr(sharded.ShardedBuild, "mark_done", real_mark)
    vq = FakeTokenizer(64)
    codes, labels, _ = token_cache.load_or_encode(tmp_path / "tc", "k", lambda: ds, vq, views="none", image_size=S,
                                                  batch_size=4)
    rest = [min(8, len(ds) - start) for start in range(16, len(ds), 8)]  # shards 2, 3, ...
    assert vq.calls == sum(-(-r // 4) for r in rest)  # shards 0 and 1 (16 images) were not encoded again
    fresh, _, _ = token_cache.load_or_encode(tmp_path / "tc2", "k", lambda: ds, FakeTokenizer(64), views="none",
                                             image_size=S)
    assert torch.equal(codes, fresh)


def test_tencrop_views_follow_llamagen(tmp_path):
    from torchvision.transforms.functional import ten_crop

    root = folder_of(tmp_path, n=8, classes=("a",), size=30)
    size, big = 20, token_cache.encode_size("tencrop", 20)
    assert big == 22  # the 1.1x centre crop the ten crops are cut from
    ds = load_dataset(str(root), big, "train")
    vq = FakeTokenizer(64)
    codes, _, _ = token_cache.load_or_encode(tmp_path / "tc", "k", lambda: ds, vq, views="tencrop", image_size=size)
    assert codes.shape == (len(ds), 10, 10, 10)
    x = ds[0][0][None]
    expected = torch.stack([vq.encode(c) for c in ten_crop(x, [size, size])], 1)[0]
    assert torch.equal(codes[0].long(), expected)


def test_token_cache_key_tracks_content_and_views(tmp_path):
    root = folder_of(tmp_path, n=6, classes=("a",))
    vq_run = fake_vq_run(tmp_path / "vq")
    key = lambda views="flip", split="train": token_cache.cache_key(vq_run, str(root), S, split, None, views)  # noqa
    base = key()
    assert key() == base and key("none") != base and key("tencrop") != base and key(split="test") != base
    assert token_cache.cache_key(vq_run, str(root), S, "train", None, True) == base  # the old flips=True
    victim = root / "a" / "001.png"
    st = victim.stat()
    blob = bytearray(victim.read_bytes())
    blob[-30] ^= 1
    victim.write_bytes(bytes(blob))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    data_mod._DIGESTS.clear()  # a later start (within one start-up, equal metadata reuses the digest)
    changed = key()
    assert changed != base  # `cp -p` of an equal-sized file: caught by the content hash
    (vq_run / "model.safetensors").write_bytes(b"other weights")
    assert key() not in (base, changed)


def test_batch_widens_per_batch(tmp_path):
    from maskgit.train import batch

    codes = torch.randint(0, 200, (10, 2, 3, 3)).to(torch.uint8)
    labels = torch.arange(10)
    sampler = StepBatchSampler(10, 4, seed=0, rank=0, world_size=1)
    grids, y = batch(codes, labels, sampler, 0, 0, 0, 0, torch.device("cpu"))
    assert grids.dtype == torch.int64 and grids.shape == (4, 9) and codes.dtype == torch.uint8


# ----------------------------------------------------------------------------- Hugging Face datasets

def saved_hf(tmp_path, n=30, dict_with_validation=False):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (10 + i % 3, 12, 3), dtype=np.uint8)) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)
    out = tmp_path / "hf"
    if dict_with_validation:
        datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))}).save_to_disk(str(out))
    else:
        ds.save_to_disk(str(out))
    return out, images


def test_hf_saved_dataset_streams_with_the_folder_rules(tmp_path):
    out, images = saved_hf(tmp_path)
    train = quiet(load_dataset, f"hf:{out}", S, "train")
    test = quiet(load_dataset, f"hf:{out}", S, "test")
    assert train.classes == test.classes == ["cat", "dog", "eel"]
    assert len(train) + len(test) == 30 and 1 <= len(test) <= 8
    rows = list(train._rows) + list(test._rows)
    assert sorted(rows) == list(range(30))
    for ds in (train, test):
        for i in range(len(ds)):
            row = int(ds._rows[i])
            x, y = ds[i]
            assert y == row % 3
            assert torch.equal(x, to_tensor(center_crop_arr(images[row].convert("RGB"), S)))
    unlabelled = quiet(load_dataset, f"hf:{out}?label=none", S, "train")
    assert unlabelled.classes == [] and unlabelled[0][1] == -1


def test_hf_validation_split_and_options(tmp_path):
    out, _ = saved_hf(tmp_path, dict_with_validation=True)
    assert len(quiet(load_dataset, f"hf:{out}", S, "test")) == 5
    assert len(quiet(load_dataset, f"hf:{out}", S, "train")) == 30
    assert len(quiet(load_dataset, f"hf:{out}?test_split=hash", S, "train")) < 30
    with pytest.raises(ValueError, match="unknown option"):
        load_dataset(f"hf:{out}?colour=red", S)
    with pytest.raises(ValueError, match="no split 'nope'"):
        quiet(load_dataset, f"hf:{out}?test_split=nope", S, "test")
    with pytest.raises(ValueError, match="no column"):
        quiet(load_dataset, f"hf:{out}?image=pixels", S)
    fp = dataset_fingerprint(f"hf:{out}", S)
    assert fp == dataset_fingerprint(f"hf:{out}", S) and fp != dataset_fingerprint(f"hf:{out}", 2 * S)


def test_hf_cache_serves_the_same_pixels(tmp_path):
    out, _ = saved_hf(tmp_path)
    streamed = quiet(load_dataset, f"hf:{out}", S, "train")
    cached = quiet(load_dataset, f"hf:{out}", S, "train", image_cache="on")
    assert cached._cache is not None
    assert all(torch.equal(streamed[i][0], cached[i][0]) for i in range(len(streamed)))


def test_hf_hub_id_offline_is_one_clear_error(tmp_path):
    pytest.importorskip("datasets")
    code = ("from core.data import load_dataset\n"
            "try:\n    load_dataset('hf:nobody/no-such-dataset-xyz', 8)\n"
            "except ValueError as err:\n    print('ERROR', err)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=script_env({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}))
    assert "ERROR" in proc.stdout, proc.stderr[-2000:]
    assert "HF_HUB_OFFLINE" in proc.stdout and "nobody/no-such-dataset-xyz" in proc.stdout


def test_missing_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="pip install datasets"):
        load_dataset("hf:/nowhere", 8)


def test_canonical_data_records_absolute_paths(tmp_path, monkeypatch):
    from core.data import canonical_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "saved").mkdir()
    assert canonical_data("shapes") == "shapes"
    assert canonical_data("hf:saved?label=none") == f"hf:{tmp_path / 'saved'}?label=none"
    assert canonical_data("hf:imagenet-1k") == "hf:imagenet-1k"
    assert canonical_data("saved") == str(tmp_path / "saved")
    assert json.loads(json.dumps(canonical_data("hf:saved")))  # recorded in config.json as is
