"""export_dataset.py streams: memory independent of the number of images, np.savez's file layout, and nothing
left behind by an export that fails half-way (Ctrl-C, a full disk)."""

import io
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from test_foundation import disk_full_beyond

from core import export_cli
from core.images import to_uint8

S = 32  # 3 KiB an image


class NoiseImages:
    """n labelled noise images made on request (the dataset holds none of them); item `fail_at` raises `error`."""

    classes = ["a", "b", "c"]
    num_classes = 3

    def __init__(self, n: int, fail_at: int | None = None, error: BaseException | None = None):
        self.n, self.fail_at, self.error = n, fail_at, error

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise self.error
        return torch.rand(3, S, S, generator=torch.Generator().manual_seed(i)) * 2 - 1, i % 3


def export(monkeypatch, out, dataset, *extra):
    monkeypatch.setattr(export_cli, "load_dataset", lambda *args, **kwargs: dataset)
    export_cli.main(["--data", "noise", "--image-size", str(S), "--out", str(out), *extra])


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_export_memory_does_not_grow_with_the_number_of_images(tmp_path, monkeypatch):
    """tracemalloc sees Python and numpy allocations, where an array of all images used to be built."""
    export(monkeypatch, tmp_path / "warm-up", NoiseImages(3))  # first-use caches (PIL plugins, tqdm) not counted
    peaks = {}
    tracemalloc.start()
    try:
        for n in (10, 200):
            start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            export(monkeypatch, tmp_path / f"n{n}", NoiseImages(n))
            peaks[n] = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    # the peak is ~100 KiB at any size, give or take 10 (tqdm's refreshes, the garbage collector's timing); an
    # array of all images would add 190 x 3 KiB
    assert peaks[200] - peaks[10] < 64 * 1024, peaks

    # the layout np.savez writes: uncompressed members arr_0 then labels, byte for byte
    ds = NoiseImages(200)
    pixels = np.stack([to_uint8(ds[i][0][None])[0].numpy() for i in range(200)])
    reference = io.BytesIO()
    np.savez(reference, arr_0=pixels, labels=np.arange(200, dtype=np.int64) % 3)
    with zipfile.ZipFile(reference) as ref, zipfile.ZipFile(tmp_path / "n200" / "data.npz") as ours:
        assert [m.filename for m in ours.infolist()] == ["arr_0.npy", "labels.npy"]
        assert all(m.compress_type == zipfile.ZIP_STORED for m in ours.infolist())
        for name in ("arr_0.npy", "labels.npy"):
            assert ours.read(name) == ref.read(name)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "n200" / "images" / "000199.png")), pixels[199])


def test_an_interrupted_export_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "refs"
    export(monkeypatch, out, NoiseImages(4))
    assert files_under(out) == ["data.npz", *(f"images/{i:06d}.png" for i in range(4))]
    with pytest.raises(KeyboardInterrupt):  # the old export is replaced: never mixed with a part of the new one
        export(monkeypatch, out, NoiseImages(8, fail_at=5, error=KeyboardInterrupt()), "--overwrite")
    assert files_under(out) == []

    # a killed export (no clean-up ran) leaves only hidden .partial files: removed by the next export
    (out / "images" / ".000003.png.partial").write_bytes(b"\x89PNG cut short")
    (out / ".data.npz.partial").write_bytes(b"PK cut short")
    export(monkeypatch, out, NoiseImages(2))
    assert files_under(out) == ["data.npz", "images/000000.png", "images/000001.png"]


def test_a_full_disk_is_one_clear_line_and_removes_the_partial_export(tmp_path, monkeypatch):
    out = tmp_path / "refs"
    with disk_full_beyond(40 * 1024), pytest.raises(SystemExit) as exit_info:  # data.npz would take 600 KiB
        export(monkeypatch, out, NoiseImages(200))
    message = str(exit_info.value.code)
    assert message.startswith("error: no space left on device while writing") and "\n" not in message, message
    assert "partial export was removed" in message
    assert files_under(out) == []
