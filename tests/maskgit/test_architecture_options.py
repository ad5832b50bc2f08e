"""The transformer options of MaskGITConfig that the anchors use: SwiGLU, QK-norm, adaptive-LayerNorm class
conditioning and axial 2D rotary positions.

Facts relied on (x-transformers 2.31.10, the version these tests were written against; the tests fail if they
change): `Encoder(ff_glu=True, ff_swish=True)` builds a SwiGLU feed-forward, `attn_qk_norm=True` l2-normalises
queries and keys, `use_adaptive_layernorm=True, dim_condition=d` makes every block's norm read a `condition`
(b, d) keyword of the forward pass, and a precomputed `rotary_pos_emb=(freqs, None)` keyword is used by every
attention layer as is (x-transformers' own 1D rotary fills the same argument), applied to the last
`seq_len` rows of `freqs` by `apply_rotary_pos_emb` with channel pairs (2i, 2i+1) sharing angle i.
"""

import pytest
import torch
from x_transformers.x_transformers import Attention, apply_rotary_pos_emb

from maskgit.config import MaskGITConfig
from maskgit.model import build_maskgit, rope_2d

OPTIONS = [
    dict(ff_glu=True),
    dict(qk_norm=True),
    dict(class_cond_mode="adaln"),
    dict(positions="rope2d"),
    dict(positions="rope2d", class_cond_mode="adaln", ff_glu=True, qk_norm=True, self_cond=True, critic="separate"),
]


def build(grid=(4, 4), codebook=16, classes=3, **kw):
    cfg = MaskGITConfig(dim=64, depth=2, heads=4, dropout=0.0, **kw)
    return build_maskgit(cfg, codebook_size=codebook, grid=grid, num_classes=classes if cfg.class_cond else 0)


def test_rope_2d_scores_depend_only_on_row_and_column_offsets():
    """Rotated by upstream's apply_rotary_pos_emb, q.k between two places depends on (drow, dcol) only, and the
    prepended class token is not rotated."""
    torch.manual_seed(0)
    h, w, hd = 5, 6, 16
    freqs = rope_2d(h, w, hd)  # (1, 1 + h*w, hd)
    assert freqs.shape == (1, 1 + h * w, hd)
    q, k = torch.randn(hd), torch.randn(hd)
    qs = apply_rotary_pos_emb(q.expand(1, 1 + h * w, hd), freqs)[0]
    ks = apply_rotary_pos_emb(k.expand(1, 1 + h * w, hd), freqs)[0]
    torch.testing.assert_close(qs[0], q)  # class token: angle 0
    place = lambda r, c: 1 + r * w + c  # noqa: E731
    score = lambda a, b: qs[place(*a)] @ ks[place(*b)]  # noqa: E731
    torch.testing.assert_close(score((0, 0), (1, 2)), score((3, 2), (4, 4)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score((2, 5), (0, 1)), score((4, 4), (2, 0)), rtol=1e-4, atol=1e-4)
    # and both axes matter: a row offset is not a column offset
    assert not torch.allclose(score((0, 0), (1, 0)), score((0, 0), (0, 1)), atol=1e-3)
    # shorter sequences (no class token) take the last h*w rows, as upstream slices them
    torch.testing.assert_close(rope_2d(h, w, hd, prepended=0), freqs[:, 1:])


def test_rope_2d_needs_a_head_dim_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        MaskGITConfig(dim=72, heads=4, positions="rope2d")  # head dim 18
    with pytest.raises(ValueError, match="positions"):
        MaskGITConfig(positions="rope")
    with pytest.raises(ValueError, match="class_cond_mode"):
        MaskGITConfig(class_cond_mode="film")


@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: "+".join(f"{k}={v}" for k, v in kw.items()))
def test_every_option_trains_every_parameter_and_samples(kw):
    torch.manual_seed(0)
    model = build(**kw)
    codes, labels = torch.randint(0, 16, (6, 16)), torch.randint(0, 3, (6,))
    model(codes, labels).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # DDP-safe: nothing unused
    out = model.generate(labels=labels, steps=4, cfg=2.0)
    assert out.shape == (6, 16) and out.min() >= 0 and out.max() < 16


def test_built_encoder_has_the_options():
    plain, opts = build(), build(ff_glu=True, qk_norm=True, class_cond_mode="adaln", positions="rope2d")
    attn = [m for m in opts.net.attn_layers.modules() if isinstance(m, Attention)]
    assert attn and all(a.qk_norm for a in attn)
    assert not any(a.qk_norm for a in plain.net.attn_layers.modules() if isinstance(a, Attention))
    assert opts.net.attn_layers.need_condition and not plain.net.attn_layers.need_condition
    assert opts.pos_emb is None and plain.pos_emb is not None
    # SwiGLU: the first feed-forward projection is twice as wide (value and gate)
    def ff_in(m):
        return next(p for n, p in m.net.attn_layers.named_parameters() if ".ff.0." in n and n.endswith("weight"))
    assert ff_in(opts).shape[0] == 2 * ff_in(plain).shape[0]


def test_adaln_conditions_on_the_class_without_a_token():
    """adaLN passes the class embedding as `condition`; the sequence the Encoder sees is the grid alone."""
    torch.manual_seed(0)
    model = build(class_cond_mode="adaln").eval()
    for name, p in model.net.attn_layers.named_parameters():
        if "to_gamma" in name:  # x-transformers starts these at zero (the identity), as adaLN-Zero does
            torch.nn.init.normal_(p, std=0.1)
    seen = []
    model.net.attn_layers.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    seq = torch.full((3, 16), 16)  # all masked
    a, _ = model.logits(seq, torch.tensor([0, 0, 0]))
    b, _ = model.logits(seq, torch.tensor([1, 1, 1]))
    assert seen == [16, 16]
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="adaptive LayerNorm"):
        from maskgit.model import MaskGIT
        MaskGIT(model.net, grid=(4, 4), codebook_size=16, num_classes=0)


def shift_gap(positions: str) -> float:
    """Largest change of the (centred) logits at a pattern's place when the pattern moves one column right."""
    torch.manual_seed(0)
    model = build(grid=(4, 8), class_cond=False, positions=positions).eval()
    if model.pos_emb is not None:
        model.pos_emb.scale.data.fill_(1.0)  # a trained-size position signal
    seq = torch.full((1, 4, 8), 16)
    seq[0, 1, 2], seq[0, 2, 3] = 5, 7
    a, _ = model.logits(seq)
    b, _ = model.logits(torch.roll(seq, 1, dims=2))  # the wrapped column holds only mask tokens
    a, b = a.view(4, 8, -1)[1, 2], b.view(4, 8, -1)[1, 3]
    return ((a - a.mean()) - (b - b.mean())).abs().max().item()


def test_rope2d_is_translation_equivariant_inside_the_grid():
    """With rotary positions only (no absolute table, no class token), a pattern shifted by one column on a grid
    of mask tokens gets (nearly: the border differs) the same logits at its own places; with the absolute table
    it does not."""
    assert shift_gap("rope2d") < 0.02
    assert shift_gap("sincos") > 0.05
