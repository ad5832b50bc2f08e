"""Pins the x-transformers behaviour that maskgit/model.py works around (see docs/upstream.md).

Each test asserts the defect is still there. If one fails, upstream changed: read the message, re-check
docs/upstream.md, and decide whether our workaround (and its test in test_maskgit_model.py) is still needed."""

import math
import random

import pytest
import torch
from torch import nn
from x_transformers import Encoder, TransformerWrapper
from x_transformers.nonautoregressive_wrapper import NonAutoregressiveWrapper, cosine_schedule, linear_schedule

from maskgit.model import MaskGIT
from maskgit.schedules import mask_rate, mdlm_weight

K, N = 16, 16
REVISIT = "x-transformers changed: revisit docs/upstream.md defect {} and the workaround in maskgit/model.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def net(**kwargs):
    return TransformerWrapper(num_tokens=K + 1, max_seq_len=N, attn_layers=Encoder(dim=32, depth=1, heads=2), **kwargs)


def test_upstream_loss_weight_has_the_wrong_sign():
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    wrapper = NonAutoregressiveWrapper(net(), mask_id=K, schedule="cosine")  # use_simple_mdlm_loss_weight=True
    weight = wrapper.loss_weight_fn(t)
    # it is m'(t) / (1 - m(t)) for the mask rate m...
    m_prime = torch.vmap(torch.func.grad(cosine_schedule))(t)
    torch.testing.assert_close(weight, m_prime / (1 - cosine_schedule(t)))
    assert (weight < 0).all(), REVISIT.format(1)
    # ...where the MDLM weight is -m'(t) / m(t) > 0 (ours); linear upstream gives -1/t, ours 1/(1-t)
    torch.testing.assert_close(cosine_schedule(t), mask_rate("cosine", t))
    assert (mdlm_weight("cosine", t) > 0).all()
    linear = NonAutoregressiveWrapper(net(), mask_id=K, schedule="linear").loss_weight_fn(t)
    torch.testing.assert_close(linear, -1 / t)
    torch.testing.assert_close(mdlm_weight("linear", t), 1 / linear_schedule(t))  # 1/(1-t)

    # so the default training loss is negative
    torch.manual_seed(0)
    random.seed(0)
    codes = torch.randint(0, K, (8, N))
    assert wrapper(codes).loss < 0, REVISIT.format(1)


class ConstantCritic(nn.Module):
    """A critic that always says "right" with logit -c, and records what it was given."""

    def __init__(self, c: float):
        super().__init__()
        self.c, self.calls = c, []

    def forward(self, seq, **kwargs):
        self.calls.append((seq.clone(), kwargs))
        return torch.full((*seq.shape, 1), -self.c)


def test_upstream_labels_never_masked_places_wrong_and_gives_the_critic_no_condition():
    # a quarter of the places masked: at least 3/4 of what the critic sees is the true code
    critic = ConstantCritic(c=30.0)
    wrapper = NonAutoregressiveWrapper(
        net(), mask_id=K, schedule=lambda t: torch.full_like(t, 0.25), token_critic=critic,
        use_simple_mdlm_loss_weight=False, no_replace_prob=0.0, random_token_prob=0.0,
    )
    torch.manual_seed(0)
    random.seed(0)
    codes = torch.randint(0, K, (32, N))
    critic_loss = wrapper(codes).critic_loss.item()
    generated, kwargs = critic.calls[0]
    true_wrong = (generated != codes).float().mean().item()
    # BCE of logit -c is ~c per place labelled wrong and ~0 per place labelled right
    upstream_wrong = critic_loss / math.log1p(math.exp(30.0))
    assert true_wrong <= 0.25
    assert upstream_wrong > 0.8, REVISIT.format(2)  # ~ 1 - 1/K: unmasked places count as wrong
    assert kwargs == {}, REVISIT.format(3)  # the critic gets no condition


def test_upstream_self_critic_crashes_on_a_conditioned_net():
    wrapper = NonAutoregressiveWrapper(
        net(embed_num_tokens={"label": 4}), mask_id=K, self_token_critic=True, use_simple_mdlm_loss_weight=False,
        no_replace_prob=0.0, random_token_prob=0.0,
    )
    codes, labels = torch.randint(0, K, (2, N)), torch.tensor([0, 3])
    with pytest.raises(AssertionError, match="embed_num_tokens"):
        wrapper(codes, embed_ids={"label": labels[:, None].expand(2, N)})


class FavourMask(nn.Module):
    """Output head of a net that always prefers the mask token."""

    def forward(self, x):
        logits = torch.zeros(*x.shape[:-1], K + 1)
        logits[..., K] = 10.0
        return logits


def test_upstream_generate_can_emit_the_mask_token():
    torch.manual_seed(0)
    wrapper = NonAutoregressiveWrapper(net(to_logits=FavourMask()), mask_id=K, steps=4)
    out = wrapper.generate(batch_size=2)
    assert (out == K).any(), REVISIT.format(4)
    ours = MaskGIT(net(to_logits=FavourMask(), use_abs_pos_emb=False), grid=(4, 4), codebook_size=K)
    assert ours.logits(torch.full((2, N), K))[0].shape[-1] == K


def test_upstream_training_depends_on_python_random():
    wrapper = NonAutoregressiveWrapper(net(), mask_id=K, self_cond=True)  # default BERT-style corruption on
    codes = torch.randint(0, K, (8, N), generator=torch.Generator().manual_seed(0))
    losses = set()
    for python_seed in range(8):
        torch.manual_seed(0)  # the same torch seed every time
        random.seed(python_seed)
        losses.add(wrapper(codes).loss.item())
    assert len(losses) > 1, REVISIT.format(6)


def test_excise_prepend_embeds_breaks_return_embeddings():
    # why MaskGIT cuts the class token off itself
    model = net(use_abs_pos_emb=False)
    seq, prefix = torch.randint(0, K, (2, N)), torch.randn(2, 1, 32)
    with pytest.raises(UnboundLocalError):
        model(seq, prepend_embeds=prefix, excise_prepend_embeds=True, return_embeddings=True)
    # what we rely on instead: without excising, the prefix is the first place of the output
    full = model(seq, prepend_embeds=prefix)
    assert full.shape == (2, N + 1, K + 1)
    torch.testing.assert_close(full[:, 1:], model(seq, prepend_embeds=prefix, excise_prepend_embeds=True))


def test_float_pos_reaches_the_attention_layers():
    # why MaskGIT adds 2D positions through sum_embeds: a float `pos` also feeds rotary (and ALiBi) as 1D positions
    model = TransformerWrapper(num_tokens=K + 1, max_seq_len=N, use_abs_pos_emb=False,
                               attn_layers=Encoder(dim=32, depth=1, heads=2, rotary_pos_emb=True))
    seq, pos = torch.randint(0, K, (2, N)), torch.randn(2, N, 32)
    with pytest.raises(RuntimeError):
        model(seq, pos=pos)
    assert model(seq, sum_embeds=pos).shape == (2, N, K + 1)
