"""bench/vq_gan.py: its sharpness measure against closed forms, and its quick run's table."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import vq_gan
from vqvae.config import VQ_PRESETS
from conftest import run_script, table_rows


def checkerboard(size: int, amplitude: float) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: 0.5 +- amplitude on the [0, 1] scale, alternating every pixel."""
    i = torch.arange(size)
    sign = ((i[:, None] + i[None, :]) % 2) * 2 - 1  # +-1
    x01 = 0.5 + amplitude * sign.float()
    return (x01 * 2 - 1).expand(1, 3, size, size).clone()


def test_constant_image_has_no_high_frequency_energy():
    for value in (-1.0, -0.3, 0.0, 0.8):
        assert vq_gan.high_freq_energy(torch.full((2, 3, 16, 16), value)).abs().max().item() < 1e-12


def test_checkerboard_energy_is_the_closed_form():
    # a pixel's 3x3 neighbourhood holds itself, its 4 diagonals (same sign) and 4 edge neighbours (opposite): the box
    # mean is a/9, the residual 8a/9 at every pixel (reflect padding continues the pattern at the borders)
    for amplitude in (0.1, 0.25, 0.5):
        energy = vq_gan.high_freq_energy(checkerboard(12, amplitude))
        assert energy.item() == pytest.approx((8 * amplitude / 9) ** 2, rel=1e-6)
    # the ratio of two checkerboards is the ratio of their squared amplitudes
    assert vq_gan.sharpness(checkerboard(12, 0.1), checkerboard(12, 0.4)) == pytest.approx(1 / 16, rel=1e-6)


def test_sharpness_is_one_for_the_originals_and_falls_with_blur():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    assert vq_gan.sharpness(images, images) == pytest.approx(1.0)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    twice = F.avg_pool2d(F.pad(blurred, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
    s1, s2 = vq_gan.sharpness(blurred, images), vq_gan.sharpness(twice, images)
    assert 0 < s2 < s1 < 0.5  # white noise loses most of its high frequencies to one box blur
    # a smooth ramp (linear in x and y) has zero residual in the interior: only the reflect-padded border counts
    ramp = torch.linspace(-1, 1, 32)
    smooth = (ramp[:, None] + ramp[None, :]).div(2).expand(1, 3, 32, 32)
    assert vq_gan.high_freq_energy(smooth).item() < vq_gan.high_freq_energy(images).mean().item() / 100


def test_sharpness_is_a_ratio_of_totals():
    flat_a, flat_b = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    flat_b[..., 3, 3] = 0.02  # a near-flat original whose reconstruction adds a speck: alone a huge ratio
    sharp = checkerboard(8, 0.4)
    ratio = vq_gan.sharpness(torch.cat([flat_b, sharp]), torch.cat([flat_a, sharp]))
    assert 1.0 < ratio < 1.01  # the speck barely moves the total


@pytest.mark.slow  # three subprocesses (the bench and two 6-step trainings at 64 px): ~30-60 s on 2 busy cores
def test_vq_gan_quick_prints_both_variants():
    proc = run_script(["bench/vq_gan.py", "--quick", "--threads", "1"], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Machine: CPU" in out and "command: python bench/vq_gan.py --quick --threads 1" in out
    header = "| variant | steps | PSNR (dB) | SSIM | sharpness |"
    assert header in out
    rows = table_rows(out, header)
    lpips = "| LPIPS |" in out
    names = [r[0] for r in rows]
    assert names == (["mse", "mse+gan", "mse+lpips+gan"] if lpips else ["mse", "mse+gan"])
    if not lpips:
        assert "mse+lpips+gan: skipped" in out
    for r in rows:
        assert int(r[1]) == vq_gan.QUICK["steps"]
        psnr, ssim, sharp = float(r[2]), float(r[3]), float(r[4])
        usage, perplexity = float(r[5].rstrip("%")), float(r[6])
        wall_ms, cpu_ms = float(r[-2]), float(r[-1])
        assert 5 < psnr < 60 and -1 < ssim <= 1 and 0 < sharp < 10 and math.isfinite(sharp)
        assert 0 < usage <= 100 and 1 <= perplexity <= VQ_PRESETS["tiny"][0].effective_codebook_size
        assert wall_ms > 0 and cpu_ms > 0
    verdicts = re.findall(r"^- (PSNR|SSIM|sharpness|codebook|time): mse\+gan ", out, flags=re.M)
    assert sorted(set(verdicts)) == ["PSNR", "SSIM", "codebook", "sharpness", "time"]
    # the bench's own held-out PSNR agrees with what train_vq.py measured on the same images
    for ours, theirs in re.findall(r"held-out PSNR ([\d.]+) dB \(train_vq.py's own evaluation: ([\d.]+)\)", out):
        assert float(ours) == pytest.approx(float(theirs), abs=0.02)
