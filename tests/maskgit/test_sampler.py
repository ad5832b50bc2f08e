"""The parallel decoder (maskgit/sampler.py) on a real MaskGIT over a tiny x-transformers net."""

import math

import pytest
import torch
from x_transformers import Encoder, TransformerWrapper

from maskgit.halton import halton_order
from maskgit.model import MaskGIT
from maskgit.sampler import SamplerConfig, _draw, _inverse_cdf, masked_counts, sample

K, H, W, C = 16, 4, 6, 3  # codebook, grid (not square, so rows and columns cannot be swapped unnoticed), classes
N = H * W


def tiny_net(num_tokens: int, **kwargs) -> TransformerWrapper:
    return TransformerWrapper(num_tokens=num_tokens, max_seq_len=N, use_abs_pos_emb=False,
                              attn_layers=Encoder(dim=32, depth=1, heads=2, attn_flash=True), **kwargs)


def make_model(critic: str = "none", num_classes: int = C, self_cond: bool = False) -> MaskGIT:
    torch.manual_seed(0)
    token_critic = tiny_net(K, logits_dim=1) if critic == "separate" else None
    model = MaskGIT(tiny_net(K + 1), grid=(H, W), codebook_size=K, num_classes=num_classes, self_cond=self_cond,
                    token_critic=token_critic, self_token_critic=critic == "self")
    # a freshly built net is almost uniform over the codes and almost blind to positions: sharpen it and make the
    # places differ, so that confidences, guidance and seeds matter
    with torch.no_grad():
        model.net.to_logits.weight.mul_(5.0)
        model.pos_emb.scale.fill_(1.0)
        if num_classes:
            model.class_emb.weight.mul_(10.0)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def critic_model():
    return make_model(critic="separate")


def labels_for(b: int) -> torch.Tensor:
    return torch.arange(b) % C


def run(model, b=4, generator_seed=0, **kwargs):
    call = {k: kwargs.pop(k) for k in ("init_codes", "keep", "return_trajectory") if k in kwargs}
    labels = kwargs.pop("labels", labels_for(b))
    return sample(model, b, labels, SamplerConfig(**kwargs), generator=torch.Generator().manual_seed(generator_seed),
                  **call)


def closed_form_counts(schedule: str, steps: int, n_unknown: int) -> list[int]:
    """Masked places after each step, written out step by step from the rule (independent of masked_counts)."""
    rate = {"cosine": lambda t: math.cos(math.pi / 2 * t), "linear": lambda t: 1.0 - t}[schedule]
    counts, left = [], n_unknown
    for s in range(steps):
        want = math.floor(rate((s + 1) / steps) * n_unknown + 1e-9)
        left = 0 if s == steps - 1 else max(0, min(want, left - 1))
        counts.append(left)
    return counts


def masked_per_step(trajectory, model) -> torch.Tensor:
    return torch.stack([(state == model.mask_id).sum(-1) for state in trajectory])  # (steps, b)


def net_batch_sizes(model, fn) -> list[int]:
    sizes = []
    handle = model.net.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        fn()
    finally:
        handle.remove()
    return sizes


def random_keep(b: int, seed: int) -> torch.Tensor:
    """Uneven keep masks: row 0 keeps nothing, row 1 everything but one place, the rest a random fraction each."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, N, generator=g) < torch.rand(b, 1, generator=g)
    keep[0] = False
    keep[1] = True
    keep[1, 5] = False
    return keep


STRATEGY_SETTINGS = [
    dict(strategy="confidence"),
    dict(strategy="confidence", remask=True, top_p=0.8),
    dict(strategy="confidence", top_k=3, temperature=2.0, temperature_end=0.2, cfg=2.0),
    dict(strategy="critic"),
    dict(strategy="critic", remask=True, cfg=1.5, cfg_schedule="linear"),
    dict(strategy="halton", temperature=0.5),
]


@pytest.mark.parametrize("settings", STRATEGY_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_codes_valid_and_reproducible(critic_model, settings):
    codes = run(critic_model, b=5, steps=6, **settings)
    assert codes.shape == (5, N) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < K  # in particular never the mask id K
    assert torch.equal(codes, run(critic_model, b=5, steps=6, **settings))
    assert not torch.equal(codes, run(critic_model, b=5, steps=6, generator_seed=1, **settings))


def test_global_rng_when_no_generator(model):
    torch.manual_seed(3)
    first = sample(model, 4, labels_for(4), SamplerConfig(steps=4))
    torch.manual_seed(3)
    assert torch.equal(first, sample(model, 4, labels_for(4), SamplerConfig(steps=4)))


@pytest.mark.parametrize("settings", STRATEGY_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_editing_keeps_given_codes_and_schedule_per_sample(critic_model, settings):
    b, steps = 6, 5
    keep = random_keep(b, seed=len(str(settings)))
    init = torch.randint(0, K, (b, N), generator=torch.Generator().manual_seed(1))
    codes, trajectory = run(critic_model, b=b, steps=steps, init_codes=init, keep=keep, return_trajectory=True,
                            **settings)
    assert torch.equal(codes[keep], init[keep])
    for state in trajectory:
        assert torch.equal(state[keep], init[keep])  # given places are never masked or redrawn
    assert codes.min() >= 0 and codes.max() < K
    n_unknown = (~keep).sum(-1).tolist()
    expected = torch.tensor([closed_form_counts("cosine", steps, u) for u in n_unknown]).T  # (steps, b)
    assert torch.equal(masked_per_step(trajectory, critic_model), expected)


def test_init_codes_alone_keeps_everything_but_mask_ids(model):
    init = torch.randint(0, K, (2, H, W))  # a (b, h, w) grid straight from a tokenizer
    init[:, 1:3, 2:5] = model.mask_id  # inpaint a box
    codes = run(model, b=2, steps=3, init_codes=init)
    given = (init != model.mask_id).flatten(1)
    assert torch.equal(codes[given], init.flatten(1)[given])
    assert (codes < K).all()


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [1, 3, 8, 20])
def test_masked_count_follows_schedule(model, schedule, steps):
    # 20 steps > cosine's useful resolution on 24 places: the at-least-one rule has to step in
    _, trajectory = run(model, b=2, steps=steps, schedule=schedule, return_trajectory=True)
    got = masked_per_step(trajectory, model)
    assert len(trajectory) == steps
    assert (got == torch.tensor(closed_form_counts(schedule, steps, N))[:, None]).all()
    revealed = torch.cat([torch.full((1, 2), N), got[:-1]]) - got
    assert (revealed >= 1).all() and got[-1].eq(0).all()
    assert torch.equal(masked_counts(schedule, steps, torch.tensor([N, N])), got)


def test_more_steps_than_places_stops_calling_the_net(model):
    steps = N + 6
    sizes = net_batch_sizes(model, lambda: run(model, b=2, steps=steps, schedule="linear", return_trajectory=True))
    assert len(sizes) == N  # one place per step at least, so N forwards reveal everything


@pytest.mark.parametrize("strategy", ["confidence", "halton"])
def test_one_net_forward_per_step_and_guidance_doubles_the_batch(model, strategy):
    b, steps = 3, 5
    assert net_batch_sizes(model, lambda: run(model, b=b, steps=steps, strategy=strategy)) == [b] * steps
    assert net_batch_sizes(model, lambda: run(model, b=b, steps=steps, strategy=strategy, cfg=3.0)) == [2 * b] * steps
    # the linear ramp starts at w = 0: that step runs no unconditional half
    linear = net_batch_sizes(model, lambda: run(model, b=b, steps=steps, strategy=strategy, cfg=3.0,
                                                cfg_schedule="linear"))
    assert linear == [b] + [2 * b] * (steps - 1)


def test_cfg_zero_is_unguided_bit_for_bit(model):
    plain, plain_traj = run(model, steps=5, return_trajectory=True)
    zero, _ = run(model, steps=5, cfg=0.0, cfg_schedule="linear", return_trajectory=True)
    assert torch.equal(plain, zero)
    # a step with w = 0 inside a guided run is exactly the unguided step
    _, guided_traj = run(model, steps=5, cfg=4.0, cfg_schedule="linear", return_trajectory=True)
    assert torch.equal(guided_traj[0], plain_traj[0])
    assert not torch.equal(guided_traj[-1], plain_traj[-1])  # guidance did change the later steps


def test_guidance_formula(model):
    b, w = 6, 4.0
    labels = labels_for(b)
    codes = sample(model, b, labels, SamplerConfig(steps=1, top_k=1, cfg=w))
    seq = torch.full((b, N), model.mask_id)
    with torch.no_grad():
        cond, _ = model.logits(seq, labels)
        uncond, _ = model.logits(seq, torch.full((b,), model.null_class))
    assert torch.equal(codes, (cond + w * (cond - uncond)).argmax(-1))
    assert not torch.equal(codes, cond.argmax(-1))  # guidance changed something: the test has teeth


def test_cfg_needs_labels():
    with pytest.raises(ValueError, match="cfg"):
        run(make_model(num_classes=0), labels=None, steps=2, cfg=2.0)


def test_top_k_one_is_argmax(model):
    b = 4
    codes = run(model, b=b, steps=1, top_k=1, temperature=3.0)
    with torch.no_grad():
        logits, _ = model.logits(torch.full((b, N), model.mask_id), labels_for(b))
    assert torch.equal(codes, logits.argmax(-1))
    # over several steps, temperature cannot matter once only one code is allowed: same as temperature 0 (argmax)
    greedy = run(model, b=b, steps=4, temperature=0.0, temperature_end=0.0)
    assert torch.equal(greedy, run(model, b=b, steps=4, top_k=1, temperature=5.0, temperature_end=0.1))
    assert not torch.equal(greedy, run(model, b=b, steps=4, temperature=5.0))


def test_confidence_reveals_the_most_likely_places(model):
    # greedy draws and no selection noise: step 0 must reveal the places with the highest max log-prob
    b, steps = 4, 4
    _, trajectory = run(model, b=b, steps=steps, temperature=0.0, temperature_end=0.0, choice_temperature=0.0,
                        return_trajectory=True)
    with torch.no_grad():
        logits, _ = model.logits(torch.full((b, N), model.mask_id), labels_for(b))
    best = logits.log_softmax(-1).amax(-1)  # (b, n)
    n_reveal = N - closed_form_counts("cosine", steps, N)[0]
    expected = torch.zeros(b, N, dtype=torch.bool).scatter_(1, best.topk(n_reveal, dim=-1).indices, True)
    assert torch.equal(trajectory[0] != model.mask_id, expected)
    assert torch.equal(trajectory[0][expected], logits.argmax(-1)[expected])


def test_remask_scores_held_tokens_by_their_own_log_prob(model):
    # upstream defect 7: a held token must be judged by the log-prob of the token it holds, not of a fresh draw.
    # Temperatures 3, 0, -3 over the steps: random draws at step 0, then argmax (<= 0), so step 1 can be replayed.
    b, steps = 8, 3
    _, trajectory = run(model, b=b, steps=steps, remask=True, temperature=3.0, temperature_end=-3.0,
                        choice_temperature=0.0, return_trajectory=True)
    state = trajectory[0]
    held = state != model.mask_id
    with torch.no_grad():
        logits, _ = model.logits(state, labels_for(b))
    logp = logits.log_softmax(-1)
    fresh = logp.amax(-1)  # log-prob of an argmax draw at every place
    own = torch.where(held, logp.gather(-1, state.clamp(max=K - 1)[..., None]).squeeze(-1), fresh)
    n_keep = N - closed_form_counts("cosine", steps, N)[1]

    def top(score):
        return torch.zeros(b, N, dtype=torch.bool).scatter_(1, score.topk(n_keep, dim=-1).indices, True)

    assert not torch.equal(top(own), top(fresh))  # the two rules disagree here: the test can tell them apart
    assert torch.equal(trajectory[1] != model.mask_id, top(own))


def test_critic_strategy(critic_model):
    with pytest.raises(ValueError, match="critic"):
        run(make_model(), steps=2, strategy="critic")
    # with no selection noise, step 0 reveals the places the critic finds least likely wrong
    seen = []  # the critic's inputs: the grid with a fresh draw at every masked place
    handle = critic_model.token_critic.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        _, trajectory = run(critic_model, b=3, steps=4, strategy="critic", critic_noise=0.0,
                            return_trajectory=True)
    finally:
        handle.remove()
    assert len(seen) == 3  # the last step reveals everything: no critic call
    proposal = seen[0]
    with torch.no_grad():
        wrong = critic_model.critic_logits(proposal, labels_for(3))
    n_reveal = N - closed_form_counts("cosine", 4, N)[0]
    expected = torch.zeros(3, N, dtype=torch.bool).scatter_(1, (-wrong).topk(n_reveal, dim=-1).indices, True)
    revealed = trajectory[0] != critic_model.mask_id
    assert torch.equal(revealed, expected)
    assert torch.equal(trajectory[0][revealed], proposal[revealed])


def test_self_critic_and_self_conditioning():
    model = make_model(critic="self", self_cond=True)
    for settings in (dict(), dict(strategy="critic", cfg=2.0, cfg_schedule="linear"), dict(remask=True, cfg=1.0)):
        fed_back = []  # batch sizes of the embeddings fed back: every step after the first, both CFG halves
        handle = model.to_self_cond.register_forward_pre_hook(lambda m, args, out=fed_back: out.append(len(args[0])))
        try:
            codes = run(model, b=3, steps=4, **settings)
        finally:
            handle.remove()
        assert fed_back == [6 if settings.get("cfg") else 3] * 3
        assert codes.shape == (3, N) and (codes < K).all() and (codes >= 0).all()
        assert torch.equal(codes, run(model, b=3, steps=4, **settings))


def test_halton_order_is_a_spread_permutation():
    for h, w in [(8, 8), (H, W), (5, 7), (1, 9)]:
        assert sorted(halton_order(h, w).tolist()) == list(range(h * w))
    order = halton_order(8, 8)
    rows, cols = (order // 8).tolist(), (order % 8).tolist()
    quadrant = [2 * (r >= 4) + (c >= 4) for r, c in zip(rows, cols, strict=True)]
    assert sorted(quadrant[:8]) == [0, 0, 1, 1, 2, 2, 3, 3]  # the first 8 cells: two per quadrant
    # base 2 along the rows and base 3 along the columns stratify: on an 8 x 9 grid the first 8 cells take every
    # row once and the first 9 cells every column once
    wide = halton_order(8, 9)
    assert sorted((wide[:8] // 9).tolist()) == list(range(8))
    assert sorted((wide[:9] % 9).tolist()) == list(range(9))
    first = list(zip(rows[:8], cols[:8], strict=True))
    # no two of the first 8 cells are side by side
    assert min(abs(r1 - r2) + abs(c1 - c2) for i, (r1, c1) in enumerate(first) for r2, c2 in first[i + 1:]) >= 2


def test_halton_sampling_reveals_in_halton_order(model):
    b, steps = 3, 5
    keep = random_keep(b, seed=7)
    init = torch.randint(0, K, (b, N))
    _, trajectory = run(model, b=b, steps=steps, strategy="halton", init_codes=init, keep=keep,
                        return_trajectory=True)
    order = halton_order(H, W)
    for i in range(b):
        unknown_in_order = [p for p in order.tolist() if not keep[i, p]]
        for s, state in enumerate(trajectory):
            n_revealed = len(unknown_in_order) - closed_form_counts("cosine", steps, len(unknown_in_order))[s]
            revealed = set(torch.nonzero((state[i] != model.mask_id) & ~keep[i]).flatten().tolist())
            assert revealed == set(unknown_in_order[:n_revealed])


def test_batch_of_one(model):
    codes, trajectory = run(model, b=1, steps=3, return_trajectory=True)
    assert codes.shape == (1, N) and len(trajectory) == 3
    one = model.generate(steps=3)  # no batch size, no labels: a single (n,) sequence, as upstream
    assert one.shape == (N,) and (one < K).all()


@pytest.mark.parametrize("vocab", [12, 256])
@pytest.mark.parametrize("cut", [dict(), dict(top_k=5), dict(top_p=0.6), dict(top_k=5, top_p=0.6)])
def test_draws_follow_the_filtered_softmax(vocab, cut):
    torch.manual_seed(0)
    rows, temperature = 30_000, 0.7
    logits = torch.randn(vocab) * 2
    u = torch.rand(rows)
    tokens, logp = _draw(logits.expand(rows, vocab), u, temperature, cut.get("top_k"), cut.get("top_p"), True)
    # the target distribution, written out with a full sort
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    allowed = torch.ones(vocab, dtype=torch.bool)
    if "top_k" in cut:
        allowed[order[cut["top_k"]:]] = False
    if "top_p" in cut:
        kept = torch.where(allowed, probs, 0.0)
        kept = kept / kept.sum()
        before = kept[order].cumsum(0) - kept[order]
        allowed[order[before >= cut["top_p"]]] = False
    target = torch.where(allowed, probs, 0.0)
    target = target / target.sum()
    freq = torch.bincount(tokens, minlength=vocab).float() / rows
    assert (freq[~allowed] == 0).all()
    assert (freq - target).abs().max() < 4 * (target * (1 - target) / rows).sqrt().max() + 1e-3
    assert torch.allclose(logp, logits.log_softmax(-1)[tokens], atol=1e-5)  # unscaled log-prob: the confidence


def test_config_validation():
    for bad in (dict(steps=0), dict(strategy="random"), dict(schedule="nope"), dict(top_k=0), dict(top_p=0.0),
                dict(cfg=-1.0), dict(cfg_schedule="cosine"), dict(strategy="halton", remask=True)):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)


def test_inverse_cdf_stays_in_range_for_non_finite_weights():
    # a diverged model gives nan/inf weights: every draw must still be a valid code index, never K or beyond
    K = 12
    weights = torch.rand(6, K)
    weights[0] = float("nan")
    weights[1, 3] = float("inf")
    weights[2, -1] = float("nan")
    weights[3] = 0.0
    u = torch.tensor([0.0, 0.3, 0.5, 0.7, 0.9, 1 - 2**-24])
    idx, _ = _inverse_cdf(weights, u)
    assert idx.shape == (6,) and bool(((idx >= 0) & (idx < K)).all()), idx
