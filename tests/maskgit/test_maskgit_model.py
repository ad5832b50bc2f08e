"""Stage-2 model: schedules, loss weighting, masking/corruption, conditioning, critic, reproducibility, configs."""

import math
import random
from dataclasses import fields

import pytest
import torch
from x_transformers import Encoder, TransformerWrapper

from maskgit.config import MASKGIT_PRESETS, MaskGITConfig, MaskGITTrainConfig, check_configs
from maskgit.model import Losses, MaskGIT, build_maskgit, sincos_2d
from maskgit.schedules import (
    MDLM_MAX_WEIGHT, SCHEDULES, mask_rate, mask_rate_derivative, mdlm_weight,
)

K, GRID, N, C = 16, (4, 4), 16, 5  # codebook size, code grid, sequence length, classes


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def encoder(dim=32, depth=1):
    return Encoder(dim=dim, depth=depth, heads=2, attn_flash=True)


def make(num_classes=C, critic=None, dim=32, depth=1, **kwargs) -> MaskGIT:
    """The documented workflow: TransformerWrapper(num_tokens=K+1, ...) -> MaskGIT(net, ...)."""
    net = TransformerWrapper(num_tokens=K + 1, max_seq_len=N, attn_layers=encoder(dim, depth), use_abs_pos_emb=False)
    if critic == "separate":
        kwargs["token_critic"] = TransformerWrapper(
            num_tokens=K, max_seq_len=N, logits_dim=1, attn_layers=encoder(24), use_abs_pos_emb=False
        )
    elif critic == "self":
        kwargs["self_token_critic"] = True
    return MaskGIT(net, grid=GRID, codebook_size=K, num_classes=num_classes, **kwargs)


def codes_labels(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (b, N), generator=g), torch.randint(0, C, (b,), generator=g)


# schedules and the loss weight

# closed forms written out independently of maskgit.schedules, on Python floats
CLOSED = {
    "cosine": (lambda t: math.cos(math.pi * t / 2), lambda t: -math.pi / 2 * math.sin(math.pi * t / 2)),
    "linear": (lambda t: 1 - t, lambda t: -1.0),
    "square": (lambda t: 1 - t * t, lambda t: -2 * t),
    "arccos": (lambda t: 2 / math.pi * math.acos(t), lambda t: -2 / math.pi / math.sqrt(1 - t * t)),
}
T_INNER = [0.05, 0.2, 0.4, 0.5, 0.7, 0.9, 0.97]


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_endpoints_and_monotone(name):
    t = torch.linspace(0, 1, 101)
    m = mask_rate(name, t)
    assert m[0].item() == pytest.approx(1.0) and m[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert (m[1:] < m[:-1]).all(), "m(t) must strictly decrease"
    assert ((m >= 0) & (m <= 1)).all()
    for ti in T_INNER:
        assert mask_rate(name, torch.tensor(ti)).item() == pytest.approx(CLOSED[name][0](ti), abs=1e-6)


@pytest.mark.parametrize("name", SCHEDULES)
def test_derivative_matches_closed_form_and_autograd(name):
    t = torch.tensor(T_INNER, dtype=torch.float64)
    autograd = torch.vmap(torch.func.grad(lambda s: mask_rate(name, s)))(t)  # second, independent derivative
    closed = torch.tensor([CLOSED[name][1](ti) for ti in T_INNER], dtype=torch.float64)
    torch.testing.assert_close(mask_rate_derivative(name, t), closed)
    torch.testing.assert_close(autograd, closed)


@pytest.mark.parametrize("name", SCHEDULES)
def test_mdlm_weight_is_positive_and_equals_minus_dm_over_m(name):
    t = torch.tensor(T_INNER, dtype=torch.float64)
    m_prime = torch.vmap(torch.func.grad(lambda s: mask_rate(name, s)))(t)
    expected = -m_prime / mask_rate(name, t)
    w = mdlm_weight(name, t)
    torch.testing.assert_close(w, expected)
    assert (w > 0).all()
    # by hand: linear 1/(1-t), cosine (pi/2) tan(pi t/2)
    if name == "linear":
        torch.testing.assert_close(w, 1 / (1 - t))
    if name == "cosine":
        torch.testing.assert_close(w, math.pi / 2 * torch.tan(math.pi * t / 2))
    # finite and clamped where m -> 0, never nan (float32 as in training)
    end = mdlm_weight(name, torch.tensor([0.0, 0.999, 0.99999, 1.0]))
    assert torch.isfinite(end).all() and (end >= 0).all() and (end <= MDLM_MAX_WEIGHT).all()
    assert end[-1].item() == MDLM_MAX_WEIGHT


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown mask schedule"):
        mask_rate("exp", torch.tensor(0.5))
    with pytest.raises(ValueError, match="schedule"):
        make(schedule="exp")


# masking and corruption


def test_random_mask_counts_follow_the_schedule():
    model = make(schedule="cosine")
    t = torch.tensor([0.0, 0.1, 0.33, 0.5, 0.8, 0.99, 1.0])
    mask = model.random_mask(t, torch.rand(len(t), N))
    expected = [max(1, math.ceil(math.cos(math.pi * ti / 2) * N - 1e-5)) for ti in t.tolist()]
    assert mask.sum(dim=1).tolist() == expected
    assert mask[0].all() and mask[-1].sum() == 1  # t = 0 masks everything; t = 1 still masks one place


def test_corruption_never_inserts_the_mask_token_and_splits_as_asked():
    model = make(no_replace_prob=0.3, random_token_prob=0.3)
    codes = torch.randint(0, K, (20_000, N))
    mask = torch.rand(codes.shape) < 0.5
    inputs = model.corrupt(codes, mask)
    assert torch.equal(inputs[~mask], codes[~mask]), "unmasked places must keep their codes"
    shown = inputs[mask]
    assert ((shown >= 0) & (shown <= model.mask_id)).all()
    is_mask = (shown == model.mask_id).float().mean().item()
    changed = (shown != codes[mask]).float().mean().item() - is_mask  # random codes that differ from the truth
    assert is_mask == pytest.approx(0.4, abs=0.01)
    assert changed == pytest.approx(0.3 * (1 - 1 / K), abs=0.01)

    # all-random corruption, many times: only codes in [0, K) at masked places, never the mask token
    model = make(random_token_prob=1.0)
    for _ in range(50):
        codes = torch.randint(0, K, (64, N))
        inputs = model.corrupt(codes, torch.ones_like(codes, dtype=torch.bool))
        assert ((inputs >= 0) & (inputs < K)).all()


def test_logits_never_include_the_mask_token():
    model = make()
    codes, labels = codes_labels()
    seq = model.corrupt(codes, torch.rand(codes.shape) < 0.5)
    logits, embeds = model.logits(seq, labels)
    assert logits.shape == (8, N, K) and embeds.shape == (8, N, model.dim)
    # even a net that puts all its mass on the mask token cannot get it out through `logits()`
    with torch.no_grad():
        model.net.to_logits.weight[model.mask_id] = 100 * model.net.to_logits.weight.abs().max()
    assert model.logits(seq, labels)[0].argmax(dim=-1).max() < K


# conditioning


def test_class_condition_changes_logits_and_null_forms_agree():
    model = make().eval()
    seq = torch.full((3, N), model.mask_id)
    a = model.logits(seq, torch.tensor([0, 1, 2]))[0]
    b = model.logits(seq, torch.tensor([3, 4, 0]))[0]
    assert (a - b).abs().amax(dim=(1, 2)).min() > 1e-4, "every sample's logits must depend on its class"
    none = model.logits(seq, None)[0]
    torch.testing.assert_close(model.logits(seq, torch.full((3,), -1))[0], none)
    torch.testing.assert_close(model.logits(seq, torch.full((3,), model.null_class))[0], none)
    # an unconditional model ignores labels
    uncond = make(num_classes=0).eval()
    torch.testing.assert_close(uncond.logits(seq, torch.tensor([0, 1, 2]))[0], uncond.logits(seq)[0])


def test_condition_dropout_rate():
    model = make()
    torch.manual_seed(0)
    labels = torch.randint(0, C, (200_000,))
    ids = model.cond_ids(labels, len(labels), "cpu", drop_prob=0.1)
    dropped = ids == model.null_class
    # binomial: sd = sqrt(0.1 * 0.9 / 2e5) = 0.00067; allow 6 sd
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.004)
    assert torch.equal(ids[~dropped], labels[~dropped])
    assert (model.cond_ids(torch.full((4,), -1), 4, "cpu") == model.null_class).all()


def capture_ids(module, store):
    return module.register_forward_hook(lambda mod, args, out: store.append(args[0].clone()))


@pytest.mark.parametrize("critic", ["self", "separate"])
def test_critic_gets_the_same_condition_as_the_generator(critic):
    model = make(critic=critic, cond_drop_prob=0.5, self_cond=True, self_cond_train_prob=1.0)
    codes, labels = codes_labels(b=1000)
    gen_ids, critic_ids = [], []
    hooks = [capture_ids(model.class_emb, gen_ids)]
    if critic == "separate":
        hooks.append(capture_ids(model.critic_class_emb, critic_ids))
    torch.manual_seed(0)
    model(codes, labels)
    for h in hooks:
        h.remove()
    # self critic: the shared table is called by the self-cond pass, the generator and the critic
    calls = gen_ids + critic_ids
    assert len(calls) == 3 if critic == "self" else len(gen_ids) == 2 and len(critic_ids) == 1
    for ids in calls[1:]:
        assert torch.equal(ids, calls[0])
    dropped = calls[0] == model.null_class
    assert dropped.float().mean().item() == pytest.approx(0.5, abs=0.07)  # 4.4 sd; training drops conditions...
    assert torch.equal(calls[0][~dropped], labels[~dropped])
    gen_ids.clear()
    hooks = [capture_ids(model.class_emb, gen_ids)]
    model.eval()(codes, labels)  # ...eval mode does not
    hooks[0].remove()
    assert torch.equal(gen_ids[0], labels)


@pytest.mark.parametrize("critic", ["self", "separate"])
def test_class_condition_changes_critic_logits(critic):
    model = make(critic=critic).eval()
    seq = codes_labels(b=3)[0]
    a = model.critic_logits(seq, torch.tensor([0, 1, 2]))
    b = model.critic_logits(seq, torch.tensor([3, 4, 0]))
    assert a.shape == (3, N)
    assert (a - b).abs().amax(dim=1).min() > 1e-5


# the critic's targets


def test_critic_labels_mark_only_changed_places():
    model = make(critic="self")
    codes = torch.randint(0, K, (2, N))
    wrong = (codes + 1) % K
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[:, :8] = True
    # the generator's favourite: right at masked places 0-3, wrong at masked 4-7 and at every unmasked place
    favourite = torch.where(torch.arange(N) < 4, codes, wrong)
    logits = torch.nn.functional.one_hot(favourite, K).float() * 50
    generated, labels = model.critic_batch(logits, codes, mask, torch.full((2,), 1e-3))
    assert torch.equal(generated[:, 8:], codes[:, 8:]), "never-masked places hold the true code"
    assert (labels[:, 8:] == 0).all(), "...and are labelled right"
    assert (labels[:, :4] == 0).all() and (labels[:, 4:8] == 1).all()
    assert torch.equal(labels, (generated != codes).float())
    # upstream's rule (sampled != codes) would call all 8 never-masked places wrong
    upstream_labels = (logits.argmax(dim=-1) != codes).float()
    assert (upstream_labels[:, 8:] == 1).all()


@pytest.mark.parametrize("critic", ["self", "separate"])
def test_every_parameter_takes_part_in_a_joint_step(critic):
    # DDP without find_unused_parameters needs this, whichever way the self-conditioning coin falls
    codes, labels = codes_labels()
    for prob in (0.0, 1.0):
        model = make(critic=critic, self_cond=True, self_cond_train_prob=prob)
        model(codes, labels).loss.backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_only_train_critic_and_only_train_generator():
    codes, labels = codes_labels()
    for critic in ("self", "separate"):
        model = make(critic=critic)
        model(codes, labels, only_train_critic=True).loss.backward()
        critic_params = {n for n, _ in model.named_parameters() if n.startswith(("critic_", "token_critic."))}
        for name, p in model.named_parameters():
            has_grad = p.grad is not None and p.grad.abs().sum() > 0
            assert has_grad == (name in critic_params), f"{critic}: {name}"
        model.zero_grad(set_to_none=True)
        losses = model(codes, labels, only_train_generator=True)
        assert losses.critic_loss is None
        losses.loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n in critic_params)
    with pytest.raises(ValueError, match="no token critic|needs a token critic"):
        make()(codes, labels, only_train_critic=True)


# the loss


def test_losses_fields_and_critic_weight():
    assert Losses._fields == ("loss", "generator_loss", "critic_loss")
    codes, labels = codes_labels()
    losses = make()(codes, labels)
    assert losses.critic_loss is None and losses.loss is losses.generator_loss and losses.loss > 0
    losses = make(critic="separate", critic_loss_weight=0.3)(codes, labels)
    torch.testing.assert_close(losses.loss, losses.generator_loss + 0.3 * losses.critic_loss)


def test_accepts_grids_and_sequences_and_rejects_wrong_shapes():
    model = make(critic="self", self_cond=True)
    codes, labels = codes_labels()
    torch.manual_seed(3)
    flat = model(codes, labels)
    torch.manual_seed(3)
    grid = model(codes.view(8, *GRID), labels)
    assert flat == grid
    with pytest.raises(ValueError, match="expected codes"):
        model(codes[:, :-1], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        model(codes, labels[:3])


def test_self_conditioning_input_changes_logits():
    model = make(self_cond=True).eval()
    seq = torch.full((2, N), model.mask_id)
    first, embeds = model.logits(seq)
    second, _ = model.logits(seq, self_cond=embeds)
    assert (first - second).abs().max() > 1e-4
    plain = make(self_cond=False).eval()
    torch.testing.assert_close(plain.logits(seq, self_cond=embeds)[0], plain.logits(seq)[0])  # ignored


def grads_after_step(model, codes, labels, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    losses = model(codes, labels)
    losses.loss.backward()
    return losses.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_same_torch_seed_same_loss_and_grads_python_random_irrelevant():
    torch.manual_seed(0)
    model = make(critic="separate", self_cond=True, no_replace_prob=0.1, random_token_prob=0.1, cond_drop_prob=0.3)
    codes, labels = codes_labels()
    random.seed(1)
    loss_a, grads_a = grads_after_step(model, codes, labels, seed=0)
    random.seed(2)  # upstream draws coin flips from Python's random; we must not
    loss_b, grads_b = grads_after_step(model, codes, labels, seed=0)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    loss_c, _ = grads_after_step(model, codes, labels, seed=1)
    assert not torch.equal(loss_a, loss_c)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = make(dim=32, depth=2, cond_drop_prob=0.0)
    codes, labels = codes_labels(b=4, seed=1)
    labels = torch.arange(4)  # distinct classes tell the 4 sequences apart even when all is masked
    held = dict(codes=codes.repeat(8, 1), labels=labels.repeat(8), generator=torch.Generator().manual_seed(0))
    before = model.evaluate(**held)["loss"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        opt.zero_grad()
        model(codes.repeat(2, 1), labels.repeat(2)).loss.backward()
        opt.step()
    after = model.evaluate(**{**held, "generator": torch.Generator().manual_seed(0)})
    assert after["loss"] < before / 10 and after["masked_acc"] > 0.95, (before, after)


def test_mdlm_weighted_loss_is_positive_and_learns():
    # upstream's weight has the wrong sign: its loss is negative and training un-learns (test_upstream.py)
    torch.manual_seed(0)
    model = make(dim=32, depth=2, cond_drop_prob=0.0, mdlm_weight=True, schedule="linear")
    codes, labels = codes_labels(b=4, seed=1)
    labels = torch.arange(4)
    held = lambda: dict(codes=codes.repeat(8, 1), labels=labels.repeat(8), generator=torch.Generator().manual_seed(0))
    before = model.evaluate(**held())["loss"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        opt.zero_grad()
        loss = model(codes.repeat(2, 1), labels.repeat(2)).loss
        assert loss > 0
        loss.backward()
        opt.step()
    assert model.evaluate(**held())["loss"] < 0.8 * before


# evaluation, generation


def test_evaluate_is_reproducible_and_keeps_the_mode():
    model = make(critic="self", self_cond=True)
    codes, labels = codes_labels()
    a = model.evaluate(codes, labels, torch.Generator().manual_seed(0))
    b = model.evaluate(codes, labels, torch.Generator().manual_seed(0))
    assert a == b and set(a) == {"loss", "masked_acc", "critic_loss", "critic_acc"}
    assert a["loss"] > 0 and 0 <= a["masked_acc"] <= 1 and 0 <= a["critic_acc"] <= 1
    assert model.training
    assert set(make().evaluate(codes, labels)) == {"loss", "masked_acc"}


def test_generate_returns_codes():
    pytest.importorskip("maskgit.sampler")
    model = make(critic="self")
    labels = torch.tensor([0, 1, 2])
    out = model.generate(labels=labels, steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, N) and out.dtype == torch.long and ((out >= 0) & (out < K)).all()
    assert model.generate(steps=2).shape == (N,)
    assert model.training


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    # the aot_eager backend traces like inductor but skips C++ codegen (minutes on CPU)
    model = make(critic="separate", no_replace_prob=0.1, random_token_prob=0.1)
    codes, labels = codes_labels()
    torch.manual_seed(0)
    eager = model(codes, labels)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    out = compiled(codes, labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss)
    torch._dynamo.reset()


# positions, configs


def test_sincos_2d_encodes_row_and_column():
    table = sincos_2d(3, 5, 16).view(3, 5, 16)
    assert torch.equal(table[:, 0, :8], table[:, 4, :8]), "the first half depends on the row only"
    assert torch.equal(table[0, :, 8:], table[2, :, 8:]), "the second half on the column only"
    assert torch.unique(table.view(15, 16), dim=0).shape[0] == 15
    torch.testing.assert_close(table[1, 2, 0], torch.tensor(math.sin(1.0)))


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        MaskGITConfig(schedule="exp")
    with pytest.raises(ValueError, match="divisible by heads"):
        MaskGITConfig(dim=100, heads=8)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        MaskGITConfig(cond_drop_prob=1.5)
    with pytest.raises(ValueError, match="<= 1"):
        MaskGITConfig(no_replace_prob=0.6, random_token_prob=0.6)
    with pytest.raises(ValueError, match="critic"):
        MaskGITConfig(critic="big")
    with pytest.raises(ValueError, match="grad_accum"):
        MaskGITTrainConfig(batch_size=10, grad_accum=3)
    with pytest.raises(ValueError, match="critic_steps"):
        MaskGITTrainConfig(train_critic="separate")
    with pytest.raises(ValueError, match="needs a critic"):
        check_configs(MaskGITConfig(), MaskGITTrainConfig(train_critic="separate", critic_steps=10))
    with pytest.raises(ValueError, match="num_tokens"):
        MaskGIT(TransformerWrapper(num_tokens=K, max_seq_len=N, attn_layers=encoder()), grid=GRID, codebook_size=K)
    with pytest.raises(ValueError, match="labelled dataset"):
        build_maskgit(MaskGITConfig(dim=32, heads=2, depth=1), codebook_size=K, grid=GRID, num_classes=0)
    assert not {f.name for f in fields(MaskGITConfig)} & {f.name for f in fields(MaskGITTrainConfig)}


@pytest.mark.parametrize("preset", sorted(MASKGIT_PRESETS))
def test_presets_build(preset):
    cfg, train_cfg = MASKGIT_PRESETS[preset]
    check_configs(cfg, train_cfg)
    if preset == "tiny":
        model = build_maskgit(cfg, codebook_size=64, grid=(8, 8), num_classes=10)
        codes = torch.randint(0, 64, (2, 8, 8))
        assert model(codes, torch.tensor([1, 2])).loss > 0
        assert model.seq_len == 64 and model.mask_id == 64 and model.null_class == 10 and not model.has_critic


@pytest.mark.parametrize("critic", ["self", "separate"])
def test_build_maskgit_with_critic(critic):
    cfg = MaskGITConfig(dim=32, heads=2, depth=1, critic=critic, critic_depth=1, critic_dim=16)
    model = build_maskgit(cfg, codebook_size=K, grid=GRID, num_classes=C)
    codes, labels = codes_labels()
    losses = model(codes.view(8, *GRID), labels)
    assert model.has_critic and losses.critic_loss > 0
    if critic == "separate":
        assert model.token_critic.emb_dim == 16 and model.critic_logits(codes, labels).shape == (8, N)
