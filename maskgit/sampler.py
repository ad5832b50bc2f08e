"""Parallel decoding of a masked code grid: MaskGIT confidence, token-critic or Halton order, with CFG and editing.

Each of `steps` steps runs the transformer once on the current grid, draws a token at every masked place and
reveals a scheduled number of them (at least one per step, all by the last): the most confident ones
(`confidence`, Chang et al. 2022), those the token critic judges right (`critic`, Lezama et al. 2022), or the
next ones in a fixed low-discrepancy order (`halton`, Besnier et al. 2025). Places given by the caller (`keep`)
never change and do not count toward the schedule.

`CompiledSampler` runs the same sampling with the transformer forward under torch.compile and/or the whole
fixed-shape run (`sample_fixed`) captured once per (batch, settings) in a CUDA graph and replayed (sample.py
--compile / --cuda-graphs). Both are off by default: bench/gpu_check.py measures whether they pay on a GPU.
"""

import contextlib
import sys
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from .halton import halton_order
from .model import uniform
from .schedules import check_schedule, mask_rate

STRATEGIES = ("confidence", "critic", "halton")
CFG_SCHEDULES = ("constant", "linear")
_GATHER_BELOW = 0.75  # draw only at the masked places when they are fewer than this fraction


@dataclass
class SamplerConfig:
    steps: int = 8                     # refinement steps = transformer forward passes
    strategy: str = "confidence"       # which drawn tokens to keep each step: "confidence" | "critic" | "halton"
    schedule: str = "cosine"           # mask schedule m(t): a fraction m((s+1)/steps) stays masked after step s
    temperature: float = 1.0           # token softmax temperature at the first step; <= 0 means argmax
    temperature_end: float = 1.0       # ... linearly annealed to this at the last step (= temperature: constant)
    choice_temperature: float = 4.5    # Gumbel noise scale on confidences (MaskGIT), annealed linearly towards 0
    critic_noise: float = 1.0          # the same for critic scores ("critic"), which live on a logit scale
    top_k: int | None = None           # draw only among the k likeliest codes
    top_p: float | None = None         # nucleus: the likeliest codes holding this much mass (alone it costs a sort)
    cfg: float = 0.0                   # guidance w: cond + w * (cond - uncond); 0 = no unconditional pass
    cfg_schedule: str = "constant"     # "constant" w, or "linear": w ramps from 0 at the first step to cfg at the last
    remask: bool = False               # let later steps re-mask tokens drawn earlier (never given ones)

    def __post_init__(self):
        check_schedule(self.schedule)
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be >= 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}: choose one of {STRATEGIES}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule={self.cfg_schedule!r}: choose one of {CFG_SCHEDULES}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1 (or None for no top-k filter)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (or None for no nucleus filter)")
        if self.cfg < 0:
            raise ValueError(f"cfg={self.cfg}: must be >= 0")
        if self.remask and self.strategy == "halton":
            raise ValueError("remask=True has no meaning for the fixed halton order: use confidence or critic")

    def ramp(self, step: int) -> float:
        """Fraction of the way from the first step (0) to the last (1); 1 for a single step."""
        return step / (self.steps - 1) if self.steps > 1 else 1.0

    def temperature_at(self, step: int) -> float:
        return self.temperature + (self.temperature_end - self.temperature) * self.ramp(step)

    def cfg_at(self, step: int) -> float:
        return self.cfg * (self.ramp(step) if self.cfg_schedule == "linear" else 1.0)

    def noise_at(self, step: int) -> float:
        """Annealing factor of the selection noise: 1 at the first step, 1/steps at the last."""
        return 1.0 - step / self.steps


def masked_counts(schedule: str, steps: int, n_unknown: Tensor) -> Tensor:
    """Places still masked after each step (steps, b) for n_unknown (b,) places to fill.

    floor(m((s+1)/steps) * n_unknown), lowered where needed so every step reveals at least one place while any
    remain; 0 after the last step.
    """
    j = torch.arange(steps, device=n_unknown.device)
    t = (j + 1).double() / steps
    # float64 and a hair of slack: m(t) * n that is an integer on paper must not floor to one less
    wanted = (mask_rate(schedule, t)[:, None] * n_unknown.double() + 1e-9).floor().long()  # (steps, b)
    # "at least one per step" is counts[s] <= counts[s-1] - 1 with counts[-1] = n_unknown, unrolled:
    # counts[s] = min(n_unknown - 1 - s, min over i <= s of wanted[i] - (s - i))
    j = j[:, None]
    counts = torch.minimum(torch.cummin(wanted + j, dim=0).values, n_unknown - 1) - j
    counts[-1] = 0
    return counts.clamp(min=0)


@torch.no_grad()
def sample(model, batch_size: int | None = None, labels: Tensor | None = None, config: SamplerConfig | None = None,
           *, init_codes: Tensor | None = None, keep: Tensor | None = None,
           generator: torch.Generator | None = None, return_trajectory: bool = False):
    """Codes (b, n) in [0, K) from a MaskGIT (and a list of the (b, n) states after each step if asked).

    init_codes (b, n) or (b, h, w) with keep (b, n) bool: kept places hold init_codes throughout (inpainting,
    outpainting, editing). Without keep, every place of init_codes that is not the mask id is kept.
    """
    config = config or SamplerConfig()
    device = next(model.parameters()).device
    n = model.seq_len
    b, labels = _check_call(model, batch_size, labels, config, init_codes, device)
    seq, keep = _initial_state(model, b, init_codes, keep, device)
    plan = _plan(model, config, keep, device)

    masked = ~keep
    prev_embeds = None
    trajectory = []
    was_training = model.training
    model.eval()
    try:
        for step in range(config.steps):
            if plan.work[step] == 0:  # everything revealed already (more steps than places): nothing to compute
                if return_trajectory:
                    trajectory.append(seq.clone())
                continue
            # the same draws every step whatever the settings, so runs that differ only in settings stay comparable
            u = uniform((2, b, n), device, generator)
            seq, masked, prev_embeds = _step(model, config, plan, step, seq, masked, keep, labels, prev_embeds, u,
                                             gather=True)
            if return_trajectory:
                trajectory.append(seq.clone())
    finally:
        model.train(was_training)
    return (seq, trajectory) if return_trajectory else seq


def _check_call(model, batch_size, labels, config: SamplerConfig, init_codes, device) -> tuple[int, Tensor | None]:
    """(batch size, labels as a (b,) long tensor on the model's device or None), the call's settings checked."""
    b = batch_size or (len(labels) if labels is not None else len(init_codes) if init_codes is not None else 1)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        if len(labels) != b:
            raise ValueError(f"{len(labels)} labels for batch_size={b}")
    if config.cfg > 0 and (labels is None or model.num_classes == 0):
        raise ValueError("cfg > 0 needs a class-conditional model and labels (guidance contrasts them with no class)")
    if config.strategy == "critic" and not model.has_critic:
        raise ValueError("strategy='critic' needs a model with a token critic (token_critic or self_token_critic)")
    return b, labels


@dataclass
class _Plan:
    """What every step of one run reveals, fixed before the first step (one host sync for all of them)."""

    reveal: Tensor                 # (steps, b) places to reveal at each step
    work: list[int]                # per step: most places still masked in a row when it starts (0: nothing to do)
    n_masked: list[int]            # per step: masked places in the whole batch when it starts
    reveal_max: list[int]          # per step: most places any row reveals
    final: list[bool]              # per step: it reveals every candidate (no scores needed)
    rank_score: Tensor | None      # (n,) "halton": higher = earlier in the order


def _plan(model, config: SamplerConfig, keep: Tensor, device) -> _Plan:
    n = model.seq_len
    n_unknown = (~keep).sum(-1)                                             # (b,)
    counts = masked_counts(config.schedule, config.steps, n_unknown)        # (steps, b) masked after each step
    before = torch.cat([n_unknown[None], counts[:-1]])                      # (steps, b) masked when a step starts
    # places to reveal among the candidates: the masked ones, or with remask every place not given
    reveal = (n_unknown if config.remask else before) - counts              # (steps, b)
    # one host sync here rather than one per step
    work, n_masked, reveal_max = before.amax(-1).tolist(), before.sum(-1).tolist(), reveal.amax(-1).tolist()
    final = (counts.amax(-1) == 0).tolist()  # steps that reveal every candidate: no scores needed
    rank_score = None
    if config.strategy == "halton":
        order = halton_order(*model.grid).to(device)
        # earlier in the Halton order = higher score, so the top scores among masked places are revealed next
        rank_score = torch.empty(n, device=device).index_put_((order,), -torch.arange(n, device=device).float())
    return _Plan(reveal, work, n_masked, reveal_max, final, rank_score)


def _step(model, config: SamplerConfig, plan: _Plan, step: int, seq: Tensor, masked: Tensor, keep: Tensor,
          labels: Tensor | None, prev_embeds: Tensor | None, u: Tensor, *,
          gather: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """One refinement step: (seq, masked, embeddings for self-conditioning) after it. u (2, b, n): its uniforms.

    gather=False draws at every place (the masked ones are kept): no shape depends on the data, no host sync."""
    b, n = seq.shape
    w = config.cfg_at(step)
    logits, embeds = _guided_logits(model, seq, labels, w, prev_embeds if model.self_cond else None)
    prev_embeds = embeds if model.self_cond else None
    u_token, u_choice = u

    # scores are needed unless this step reveals every candidate (the last step, at the latest)
    need_logp = config.strategy == "confidence" and not plan.final[step] and not config.remask
    temperature = config.temperature_at(step)
    if gather:
        tokens, logp = _draw_masked(logits, u_token, masked, plan.n_masked[step], temperature, config.top_k,
                                    config.top_p, need_logp)
    else:
        tokens, logp = _draw(logits, u_token, temperature, config.top_k, config.top_p, need_logp)
    proposal = torch.where(masked, tokens, seq)  # (b, n)
    if plan.final[step]:
        return proposal, torch.zeros_like(masked), prev_embeds
    candidates = ~keep if config.remask else masked
    if config.strategy == "confidence":
        if config.remask:  # a held token is judged by its own log-prob, not by a fresh draw's
            logp = _log_prob_of(logits, proposal)
        score = _add_gumbel(logp, u_choice, config.choice_temperature * config.noise_at(step))
    elif config.strategy == "critic":
        wrong = _guided_critic(model, proposal, labels, w)  # (b, n) logit that the token is wrong
        score = _add_gumbel(-wrong, u_choice, config.critic_noise * config.noise_at(step))
    else:
        score = plan.rank_score.expand(b, n)
    revealed = _top_places(score.masked_fill(~candidates, -torch.inf), plan.reveal[step], plan.reveal_max[step])
    masked = candidates & ~revealed
    return proposal.masked_fill(masked, model.mask_id), masked, prev_embeds


def _initial_state(model, b: int, init_codes: Tensor | None, keep: Tensor | None, device) -> tuple[Tensor, Tensor]:
    """(seq (b, n) with mask_id at unknown places, keep (b, n) bool)."""
    n, mask_id = model.seq_len, model.mask_id
    if init_codes is None:
        if keep is not None:
            raise ValueError("keep needs init_codes: the codes to keep")
        return torch.full((b, n), mask_id, device=device), torch.zeros(b, n, dtype=torch.bool, device=device)
    init_codes = torch.as_tensor(init_codes, device=device).long()
    if init_codes.dim() == 3:  # (b, h, w) grid straight from the tokenizer
        init_codes = rearrange(init_codes, "b h w -> b (h w)")
    init_codes = init_codes.expand(b, n)
    keep = init_codes != mask_id if keep is None else torch.as_tensor(keep, device=device).bool().expand(b, n)
    given = init_codes[keep]
    if len(given) and (given.min() < 0 or given.max() >= model.codebook_size):
        raise ValueError(f"kept init_codes must be codes in [0, {model.codebook_size})")
    return torch.where(keep, init_codes, mask_id), keep


def _guided_logits(model, seq: Tensor, labels: Tensor | None, w: float,
                   self_cond: Tensor | None) -> tuple[Tensor, Tensor]:
    """Logits (b, n, K) guided with scale w, and the forward's embeddings; one forward of batch b, or 2b if w != 0."""
    b = len(seq)
    if w == 0:
        logits, embeds = model.logits(seq, labels, self_cond=None if self_cond is None else self_cond[:b])
        return logits.float(), embeds  # float32 for the sampling arithmetic even under autocast (no copy if it is)
    if self_cond is not None and len(self_cond) == b:  # the previous step was unguided: no unconditional estimate yet
        self_cond = torch.cat([self_cond, self_cond])
    null = torch.full_like(labels, model.null_class)
    logits, embeds = model.logits(torch.cat([seq, seq]), torch.cat([labels, null]), self_cond=self_cond)
    cond, uncond = logits.float().chunk(2)
    # uncond + (1 + w) * (cond - uncond) = cond + w * (cond - uncond), in one pass
    return torch.lerp(uncond, cond, 1.0 + w), embeds


def _guided_critic(model, seq: Tensor, labels: Tensor | None, w: float) -> Tensor:
    """Critic logits (b, n), guided like the generator (one batched call)."""
    if w == 0:
        return model.critic_logits(seq, labels).float()
    null = torch.full_like(labels, model.null_class)
    cond, uncond = model.critic_logits(torch.cat([seq, seq]), torch.cat([labels, null])).float().chunk(2)
    return torch.lerp(uncond, cond, 1.0 + w)


def _add_gumbel(score: Tensor, u: Tensor, scale: float) -> Tensor:
    """score + scale * Gumbel(0, 1) noise made from uniforms u."""
    if scale == 0:
        return score
    # u = 0 would give -inf and tie with the places that are no candidates
    return score - scale * torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))


def _top_places(score: Tensor, k: Tensor, k_max: int) -> Tensor:
    """(b, n) bool: the k[i] highest-scoring places of row i (k differs per row; k_max = k.max())."""
    top = score.topk(k_max, dim=-1).indices                              # (b, k_max)
    take = torch.arange(k_max, device=score.device) < k[:, None]        # (b, k_max)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, take)


def _log_prob_of(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits) at tokens: (b, n, K), (b, n) -> (b, n)."""
    peak = logits.amax(-1, keepdim=True)  # (b, n, 1); exp-sum by hand: faster than logsumexp on CPU
    log_norm = (logits - peak).exp_().sum(-1).log() + peak.squeeze(-1)
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - log_norm


def _draw_masked(logits: Tensor, u: Tensor, masked: Tensor, n_masked: int, temperature: float,
                 top_k: int | None, top_p: float | None, need_logp: bool) -> tuple[Tensor, Tensor | None]:
    """_draw at the masked places of (b, n) only (the other entries of the results are meaningless).

    Gathering the masked rows costs a copy of them; it pays off when few places are masked, or always when the
    per-row work is a top-k or a sort."""
    filtered = temperature > 0 and top_k != 1 and (top_k or top_p is not None and top_p < 1)
    if n_masked == masked.numel() or not (filtered or n_masked < _GATHER_BELOW * masked.numel()):
        return _draw(logits, u, temperature, top_k, top_p, need_logp)
    tokens, logp = _draw(logits[masked], u[masked], temperature, top_k, top_p, need_logp)  # (r,) each
    tokens = torch.zeros_like(u, dtype=torch.long).masked_scatter_(masked, tokens)
    return tokens, None if logp is None else torch.zeros_like(u).masked_scatter_(masked, logp)


def _draw(logits: Tensor, u: Tensor, temperature: float, top_k: int | None, top_p: float | None,
          need_logp: bool) -> tuple[Tensor, Tensor | None]:
    """One code per row of logits (..., K) from softmax(logits / temperature) cut by top-k / top-p, by inverse CDF
    at the uniforms u (...). With need_logp also log softmax(logits) of it: unscaled and unfiltered, the model's
    own belief, which is MaskGIT's confidence."""
    K = logits.shape[-1]
    greedy = temperature <= 0 or top_k == 1
    cut_k = top_k is not None and top_k < K
    cut_p = top_p is not None and top_p < 1
    peak = logits.amax(-1, keepdim=True)                          # (..., 1)
    log_norm = None                                               # log sum exp(logits - peak), for logp
    if greedy:
        tokens = logits.argmax(-1)
    elif not (cut_k or cut_p):
        weights = logits - peak                                   # (..., K) unnormalised probabilities...
        if temperature != 1:
            weights.mul_(1 / temperature)
        weights = weights.exp_()                                  # ... once exponentiated in place
        tokens, total = _inverse_cdf(weights, u)
        if temperature == 1:
            log_norm = total.log()
    else:
        # top-k gives the k likeliest codes sorted, with no full-vocabulary scatter; top-p alone needs a full sort
        vals, ids = logits.topk(top_k, dim=-1) if cut_k else logits.sort(dim=-1, descending=True)  # (..., k)
        weights = ((vals - peak) / temperature).exp()
        if cut_p:
            cdf = weights.cumsum(-1)
            # the nucleus: the codes whose likelier predecessors hold less than top_p of the mass (>= 1 code)
            size = ((cdf - weights) < top_p * cdf[..., -1:]).sum(-1, keepdim=True)  # (..., 1)
            weights = weights.masked_fill(torch.arange(weights.shape[-1], device=u.device) >= size, 0.0)
        tokens = ids.gather(-1, _inverse_cdf(weights, u)[0][..., None]).squeeze(-1)
    if not need_logp:
        return tokens, None
    if log_norm is None:
        log_norm = (logits - peak).exp_().sum(-1).log()
    logp = logits.gather(-1, tokens[..., None]).squeeze(-1) - peak.squeeze(-1) - log_norm
    return tokens, logp


def _inverse_cdf(weights: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of weights (..., K) >= 0, the index i with cdf[i-1] <= u * total < cdf[i]; also total (...,).

    Two levels (blocks of ~sqrt(K) codes, then codes within the chosen block) so no full-length cumsum is needed:
    the block sums are one fast reduction. Only codes with positive weight can come out.
    """
    *lead, K = weights.shape
    size = next(d for d in range(int(K ** 0.5), 0, -1) if K % d == 0)       # block length, divides K
    blocks = weights.reshape(*lead, K // size, size)                          # (..., nb, size)
    mass = blocks.sum(-1)                                                     # (..., nb)
    block_cdf = mass.cumsum(-1)
    total = block_cdf[..., -1:]                                               # (..., 1)
    # u < 1, but u * total may round up to total: stay strictly below it, which keeps zero-weight codes out
    v = torch.minimum(u[..., None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # (..., 1) block with positive mass; the clamp only matters for non-finite weights (a diverged model), which
    # then yield some valid code instead of an out-of-range index
    blk = torch.searchsorted(block_cdf, v, right=True).clamp_(max=K // size - 1)
    v = v - (block_cdf.gather(-1, blk) - mass.gather(-1, blk))                # offset within that block
    inner = blocks.gather(-2, blk[..., None].expand(*lead, 1, size)).squeeze(-2)  # (..., size)
    inner_cdf = inner.cumsum(-1)
    # block sum and cumsum round differently: clamp the offset into [0, inner total) for the same guarantee
    v = torch.minimum(v.clamp(min=0), torch.nextafter(inner_cdf[..., -1:], torch.zeros_like(v)))
    idx = torch.searchsorted(inner_cdf, v, right=True).clamp_(max=size - 1)
    return (blk * size + idx).squeeze(-1), total.squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Compiled forwards and CUDA graphs


@torch.no_grad()
def sample_fixed(model, batch_size: int | None = None, labels: Tensor | None = None,
                 config: SamplerConfig | None = None, *, generator: torch.Generator | None = None) -> Tensor:
    """`sample` from an all-masked grid, computed the way a CUDA graph replays it: every shape fixed by (batch,
    settings), no host sync between the steps. The uniforms are drawn first, in the order `sample` draws them,
    and the tokens are drawn at every place (the masked ones are kept) rather than at the masked places alone,
    which is the same arithmetic per place: the same codes as `sample` for the same generator state."""
    config = config or SamplerConfig()
    device = next(model.parameters()).device
    b, labels = _check_call(model, batch_size, labels, config, None, device)
    plan = _plan(model, config, torch.zeros(b, model.seq_len, dtype=torch.bool, device=device), device)
    was_training = model.training
    model.eval()
    try:
        return _run_fixed(model, config, plan, labels, _draw_uniforms(plan, b, model.seq_len, device, generator))
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_fixed_graph(model, batch_size: int | None = None, labels: Tensor | None = None,
                       config: SamplerConfig | None = None, *, generator: torch.Generator | None = None,
                       backend: str = "eager") -> Tensor:
    """`sample_fixed` traced by torch.compile as ONE graph (`fullgraph=True`): it raises where any step would need
    a host sync or a data-dependent shape, which is what a CUDA graph cannot replay. Same codes as `sample`."""
    config = config or SamplerConfig()
    device = next(model.parameters()).device
    b, labels = _check_call(model, batch_size, labels, config, None, device)
    plan = _plan(model, config, torch.zeros(b, model.seq_len, dtype=torch.bool, device=device), device)
    uniforms = _draw_uniforms(plan, b, model.seq_len, device, generator)
    traced = torch.compile(lambda lab, u: _run_fixed(model, config, plan, lab, u), fullgraph=True, backend=backend)
    was_training = model.training
    model.eval()
    try:
        return traced(labels, uniforms)
    finally:
        model.train(was_training)


def _draw_uniforms(plan: _Plan, b: int, n: int, device, generator, out: Tensor | None = None) -> Tensor:
    """(steps that compute, 2, b, n): the uniforms of a run, drawn in the order `sample` draws them."""
    draws = [uniform((2, b, n), device, generator) for work in plan.work if work]
    return torch.stack(draws) if out is None else torch.stack(draws, out=out)


def _run_fixed(model, config: SamplerConfig, plan: _Plan, labels: Tensor | None, us: Tensor) -> Tensor:
    """All steps from an all-masked grid with the uniforms us (see _draw_uniforms): fixed shapes, no host sync."""
    b, n = us.shape[2], model.seq_len
    device = us.device
    seq = torch.full((b, n), model.mask_id, device=device)
    keep = torch.zeros(b, n, dtype=torch.bool, device=device)
    masked, prev_embeds, i = ~keep, None, 0
    for step in range(config.steps):
        if plan.work[step] == 0:
            continue
        seq, masked, prev_embeds = _step(model, config, plan, step, seq, masked, keep, labels, prev_embeds, us[i],
                                         gather=False)
        i += 1
    return seq


class _CompiledForward:
    """Stands in for a MaskGIT inside the sampler: `logits` and `critic_logits` compiled, all else the model's."""

    def __init__(self, model, compile_fn):
        self._model = model
        self.logits = compile_fn(model.logits)
        self.critic_logits = compile_fn(model.critic_logits) if model.has_critic else model.critic_logits

    def __getattr__(self, name):  # only called for what the instance does not have itself
        return getattr(self._model, name)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    plan: _Plan
    labels: Tensor | None          # static inputs: copied into before each replay
    uniforms: Tensor
    out: Tensor                    # static output: cloned after each replay


class CompiledSampler:
    """`sample` with the transformer forward under torch.compile and/or the whole run replayed from a CUDA graph.

        sampler = CompiledSampler(compile=True, cuda_graphs=True)
        codes = sampler(model, 32, labels, SamplerConfig(steps=8), generator=g)   # sample()'s signature

    compile: `model.logits` (and the critic's) go through `torch.compile` (one compilation per batch shape;
    `backend`, `mode` and `dynamic` are passed on). cuda_graphs: the first call for a (model, batch size,
    labels or not, settings, autocast) captures the whole fixed-shape run (`sample_fixed`: every step's forward
    and sampling work) after `warmup` runs on a side stream; later calls draw the uniforms as `sample` does,
    copy them and the labels into the graph's inputs and replay it: one launch instead of hundreds. Both give the
    tokens `sample` gives for the same generator state, up to the rounding of compiled kernels (measured in
    bench/gpu_check.py, which also measures whether they pay; both are off by default).

    Where an option cannot apply the call runs eagerly with a note (printed once per reason): CUDA graphs need a
    CUDA device and an all-masked start (no init_codes / keep / return_trajectory); compile off a CUDA device
    runs only when a `backend` is named (e.g. "eager" or "aot_eager" on the CPU, for tests).

    A graph reads the model's parameters at their addresses: weights changed in place (load_state_dict, an
    optimizer step) are seen, parameters replaced or moved are not: call `reset()` after that.
    """

    def __init__(self, compile: bool = False, cuda_graphs: bool = False, *, backend: str | None = None,
                 mode: str | None = None, dynamic: bool | None = None, warmup: int = 2, note=None):
        self.compile, self.cuda_graphs = compile, cuda_graphs
        self.backend, self.mode, self.dynamic, self.warmup = backend, mode, dynamic, warmup
        self._note_fn = note or (lambda message: print(f"note: {message}", file=sys.stderr, flush=True))
        self._noted: set[str] = set()
        self._forwards: dict[int, tuple] = {}
        self._graphs: dict[tuple, _Graph] = {}

    def reset(self) -> None:
        """Forget every compiled forward and captured graph."""
        self._forwards.clear()
        self._graphs.clear()

    def note(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            self._note_fn(message)

    def forward_model(self, model):
        """The model as the sampler sees it: with compiled forwards when compile applies on its device."""
        if not self.compile:
            return model
        device = next(model.parameters()).device
        if device.type != "cuda" and self.backend is None:
            self.note(f"compile: skipped on {device.type} (no backend named): sampling runs eagerly")
            return model
        cached = self._forwards.get(id(model))
        if cached is None or cached[0] is not model:
            options = {k: v for k, v in (("backend", self.backend), ("mode", self.mode)) if v is not None}
            proxy = _CompiledForward(model, lambda fn: torch.compile(fn, dynamic=self.dynamic, **options))
            cached = self._forwards[id(model)] = (model, proxy)
        return cached[1]

    @torch.no_grad()
    def __call__(self, model, batch_size: int | None = None, labels: Tensor | None = None,
                 config: SamplerConfig | None = None, *, init_codes: Tensor | None = None, keep: Tensor | None = None,
                 generator: torch.Generator | None = None, return_trajectory: bool = False):
        config = config or SamplerConfig()
        forward = self.forward_model(model)
        if self.cuda_graphs:
            device = next(model.parameters()).device
            if device.type != "cuda":
                self.note(f"cuda_graphs: skipped on {device.type} (CUDA graphs need a CUDA device): sampling runs "
                          "eagerly")
            elif init_codes is not None or keep is not None or return_trajectory:
                self.note("cuda_graphs: skipped for init_codes / keep / return_trajectory (the graph starts from "
                          "an all-masked grid and keeps no trajectory): those calls run eagerly")
            else:
                return self._replay(model, forward, batch_size, labels, config, generator, device)
        return sample(forward, batch_size, labels, config, init_codes=init_codes, keep=keep, generator=generator,
                      return_trajectory=return_trajectory)

    def _replay(self, model, forward, batch_size, labels, config: SamplerConfig, generator, device) -> Tensor:
        b, labels = _check_call(model, batch_size, labels, config, None, device)
        autocast = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        key = (id(model), str(device), b, labels is None, tuple(vars(config).items()), autocast, forward is model)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(model, forward, b, labels, config, device)
        if labels is not None:
            entry.labels.copy_(labels)
        _draw_uniforms(entry.plan, b, model.seq_len, device, generator, out=entry.uniforms)
        entry.graph.replay()
        return entry.out.clone()

    def _capture(self, model, forward, b: int, labels: Tensor | None, config: SamplerConfig, device) -> _Graph:
        n = model.seq_len
        plan = _plan(model, config, torch.zeros(b, n, dtype=torch.bool, device=device), device)
        static_labels = None if labels is None else labels.clone()
        static_u = torch.full((sum(1 for w in plan.work if w), 2, b, n), 0.5, device=device)
        was_training = model.training
        model.eval()
        try:
            graph, out = capture_cuda_graph(lambda: _run_fixed(forward, config, plan, static_labels, static_u),
                                            device, warmup=self.warmup)
        finally:
            model.train(was_training)
        return _Graph(graph, plan, static_labels, static_u, out)


def capture_cuda_graph(fn, device, warmup: int = 2):
    """(graph, output): fn() captured in a CUDA graph after `warmup` calls on a side stream; graph.replay() reruns
    it, writing the same output tensor(s).

    Under autocast the capture runs with autocast's weight-cast cache off: a cached bf16 copy of a weight made
    outside the capture would be freed when the caller's autocast region ends, while the graph still read it; with
    the cache off the casts are part of the graph, and they follow weights changed in place."""
    kind = torch.device(device).type
    if torch.is_autocast_enabled(kind):
        context = lambda: torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), cache_enabled=False)  # noqa: E731
    else:
        context = contextlib.nullcontext
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with context():
        with torch.cuda.stream(side):  # allocator, cuBLAS workspaces, compilation: before the capture
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    return graph, out
