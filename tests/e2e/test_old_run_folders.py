"""Run folders written by an earlier release (format_version 1) still load, encode, sample and resume-check.

tests/fixtures/runs_format_v1 holds a tiny tokenizer run (`vq/`, 16 px, FSQ 3x3) and a stage-2 run on it
(`maskgit/`, with EMA) written by the toolkit before the `core` package existed (commit fe551f9), plus
`reference.npz`: what that release's `model.generate(labels=arange(8) % 10, steps=4, cfg=1.0, generator=
Generator().manual_seed(0))` gave (`codes`), their decoded pixels (`pixels`, uint8) and the tokenizer's codes of
those pixels (`recodes`). Decoding and encoding are compared to the reference exactly up to one grey level;
sampling takes discrete choices, where a last-bit difference between torch releases could flip one, so at least
7 of the 8 sampled grids must match code for code.
"""

import json

import numpy as np
import pytest
import torch

from core.images import to_uint8
from maskgit import load_maskgit
from maskgit import sample_cli
from vqvae import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_old_tokenizer_decodes_and_encodes_as_it_did(old_runs):
    ref = np.load(old_runs / "reference.npz")
    vq = load_tokenizer(old_runs / "vq")
    with torch.no_grad():
        codes = torch.from_numpy(ref["codes"].astype(np.int64))
        pixels = to_uint8(vq.decode(codes.view(-1, *vq.grid_size)).clamp(-1, 1)).numpy()
        assert np.abs(pixels.astype(int) - ref["pixels"].astype(int)).max() <= 1
        images = torch.from_numpy(ref["pixels"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        assert (vq.encode(images).numpy() == ref["recodes"]).mean() > 0.95


def test_old_stage2_run_samples_as_it_did(old_runs):
    ref = np.load(old_runs / "reference.npz")
    model, vq, run = load_maskgit(old_runs / "maskgit")
    assert run.has_ema and run.step == 4 and run.grid == (4, 4) and run.num_classes == 10
    codes = model.generate(labels=torch.arange(8) % 10, steps=4, cfg=1.0, generator=torch.Generator().manual_seed(0))
    same = (codes.numpy() == ref["codes"]).all(axis=1)
    assert same.sum() >= 7, f"only {same.sum()} of 8 sampled grids match the earlier release"


@pytest.mark.slow
def test_sample_cli_reads_an_old_run(old_runs, tmp_path):
    out = tmp_path / "samples"
    sample_cli.main(["--checkpoint", str(old_runs / "maskgit"), "--out", str(out), "--num", "6", "--batch-size", "4"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["ema"] is True and meta["step"] == 4 and meta["image_size"] == 16
    assert np.load(out / "samples.npz")["arr_0"].shape == (6, 16, 16, 3)
