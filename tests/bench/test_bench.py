"""The benchmark scripts (bench/): each runs in quick mode and prints its table, and the measuring pieces are right."""

import math
import re
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from vqvae.config import VQ_PRESETS

sys.path.insert(0, str(REPO / "bench"))


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the Markdown table whose header row starts with `header_start` (the separator row dropped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    """The first number in a cell: '1.53x' -> 1.53, '12.5%' -> 12.5, '10.0% ± 6.7%' -> 10.0."""
    return float(re.match(r"[-+]?\d+(\.\d+)?", cell).group())


def check_script(args: list[str]) -> str:
    proc = run_script(args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # a subprocess that imports torch and runs its sweep: ~10-20 s on 2 busy cores
def test_sample_speed_quick_prints_every_row():
    out = check_script(["bench/sample_speed.py", "--quick", "--threads", "1"])
    assert "Machine: CPU" in out and "torch" in out
    rows = table_rows(out, "| steps | batch | ours img/s")
    assert [(int(r[0]), int(r[1])) for r in rows] == [(4, 1), (4, 8), (8, 1), (8, 8)]  # quick: steps 4 8, batch 1 8
    for r in rows:
        ours_ips, ours_ms, ref_ips, ref_ms, ratio = map(number, r[2:7])
        assert all(math.isfinite(v) and v > 0 for v in (ours_ips, ours_ms, ref_ips, ref_ms, ratio))
        # images/s and latency are two views of one time, and the ratio is the reference's time over ours
        assert ours_ips == pytest.approx(int(r[1]) / (ours_ms / 1e3), rel=0.02)
        assert ratio == pytest.approx(ref_ms / ours_ms, rel=0.03)
        assert 0 <= number(r[7]) <= 100 and 0 <= number(r[8]) <= 100  # shares outside the forward, in percent
    ar = table_rows(out, "| batch | AR img/s")
    assert [int(r[0]) for r in ar] == [1, 8] and all(number(c) > 0 for r in ar for c in r[1:])
    alone = table_rows(out, "| batch | ours ms/step")
    assert all(number(r[1]) > 0 and number(r[2]) > 0 for r in alone)
    assert all(number(r[1]) > 0 for r in table_rows(out, "| batch | tokenizer decode ms"))
    verdicts = re.findall(r"^- (PASS|FAIL): ", out, flags=re.M)
    assert len(verdicts) == 3


@pytest.mark.slow  # a subprocess that imports torch and runs its sweep: ~10-20 s on 2 busy cores
def test_train_speed_quick_prints_both_stages():
    out = check_script(["bench/train_speed.py", "--quick", "--threads", "1"])
    rows = table_rows(out, "| stage | variant")
    quantizer = VQ_PRESETS["tiny"][0].quantizer  # the VQ-VAE row is named after the preset's quantizer
    assert [r[1] for r in rows] == [quantizer, "critic none", "critic self", "critic separate"]
    for r in rows:
        steps_per_s, images_per_s, ms = number(r[4]), number(r[5]), number(r[6])
        assert math.isfinite(steps_per_s) and steps_per_s > 0
        assert images_per_s == pytest.approx(steps_per_s * int(r[3]), rel=0.02)
        assert ms == pytest.approx(1e3 / steps_per_s, rel=0.02)
        assert number(r[7]) >= 0  # memory growth, MiB
    params = {r[1]: int(r[2].replace(",", "")) for r in rows}
    # a self critic is one linear head (dim -> 1, with bias) on the generator; a separate critic is a second net
    assert params["critic self"] - params["critic none"] == 128 + 1  # the tiny preset is 128 wide
    assert params["critic separate"] > 1.5 * params["critic none"]


@pytest.mark.slow  # a subprocess that imports torch and runs its sweep: ~10-20 s on 2 busy cores
def test_quality_quick_prints_every_setting():
    out = check_script(["bench/quality.py", "--quick", "--threads", "1"])
    assert re.search(r"held-out accuracy on \d+ real images: \*\*\d+\.\d%\*\*", out)
    rows = table_rows(out, "| sampler | schedule")
    settings = {(r[0], r[1], int(r[2]), float(r[3])) for r in rows if not r[0].startswith("*")}
    for steps in (4, 8):
        for strategy in ("confidence", "critic", "halton"):
            assert (strategy, "cosine", steps, 0.0) in settings
        assert ("confidence", "linear", steps, 0.0) in settings
    for strategy in ("confidence", "critic", "halton"):
        for w in (1.0, 3.0):
            assert (strategy, "cosine", 8, w) in settings
    assert sum(r[0].startswith("*") for r in rows) == 2  # the real-image and reconstruction reference rows
    for r in rows:
        assert 0 <= number(r[4]) <= 100
        fd = number(r[5])
        assert math.isfinite(fd) and fd >= 0
    assert re.search(r"^- Cosine beats linear at few steps \(MaskGIT paper\): [A-Z]", out, flags=re.M)


# the measuring pieces, in-process


def test_frechet_matches_scipy_and_closed_forms():
    from scipy import linalg

    from quality import frechet

    rng = np.random.default_rng(0)
    d = 12
    a, b = rng.normal(size=(d, 3 * d)), rng.normal(size=(d, 3 * d))
    s_a, s_b = a @ a.T / d, b @ b.T / d  # SPD
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    covmean = linalg.sqrtm(s_a @ s_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)
    assert frechet((mu_a, s_a), (mu_b, s_b)) == pytest.approx(expected, rel=1e-8)
    assert frechet((mu_a, s_a), (mu_a, s_a)) == pytest.approx(0.0, abs=1e-9)
    # diagonal covariances: sum of (sqrt(a_i) - sqrt(b_i))^2, and singular ones (a dead feature) are fine
    va, vb = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])
    closed = ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum() + 1.0
    assert frechet((np.zeros(3), np.diag(va)), (np.array([1.0, 0, 0]), np.diag(vb))) == pytest.approx(closed)


def test_flop_count_matches_the_closed_form():
    """FlopCounterMode's count of one forward is 2 * matmul weights * places + attention's 4 n^2 (heads * dim_head)
    per layer (QK^T and attention-weighted V)."""
    from x_transformers import Encoder, TransformerWrapper

    from sample_speed import flops_per_sequence

    dim, depth, heads, dim_head, n, vocab = 64, 2, 4, 24, 17, 33  # inner attention width 96, not dim
    net = TransformerWrapper(num_tokens=vocab, max_seq_len=n, use_abs_pos_emb=False,
                             attn_layers=Encoder(dim=dim, depth=depth, heads=heads, attn_dim_head=dim_head,
                                                 attn_flash=True)).eval()
    matmul_weights = sum(p.numel() for name, p in net.named_parameters() if p.ndim == 2 and "token_emb" not in name)
    with torch.inference_mode():
        counted = flops_per_sequence(lambda: net(torch.zeros(1, n, dtype=torch.long)))
    assert counted == 2 * matmul_weights * n + 4 * n * n * heads * dim_head * depth


def test_forward_timer_sees_one_forward_per_step():
    """Our sampler runs the transformer once per step (no guidance, no critic): the hook count says so."""
    from maskgit.config import MaskGITConfig
    from maskgit.model import build_maskgit
    from sample_speed import ForwardTimer

    torch.manual_seed(0)
    model = build_maskgit(MaskGITConfig(dim=32, depth=1, heads=2, dropout=0.0), codebook_size=16, grid=(3, 4),
                          num_classes=2).eval()
    timer = ForwardTimer(model.net, torch.device("cpu"))
    with torch.inference_mode():
        start = torch.get_num_threads()
        model.generate(labels=torch.tensor([0, 1]), steps=5)
        assert timer.calls == 5
        timer.reset()
        model.generate(labels=torch.tensor([0, 1]), steps=5, cfg=2.0)  # guidance: still one (batched) call per step
        assert timer.calls == 5 and torch.get_num_threads() == start
    assert 0 < timer.seconds() < 60
