"""Parallel decoding of a masked code grid: MaskGIT confidence, token-critic or Halton order, with CFG and editing.

Each of `steps` steps runs the transformer once on the current grid, draws a token at every masked place and
reveals a scheduled number of them (at least one per step, all by the last): the most confident ones
(`confidence`, Chang et al. 2022), those the token critic judges right (`critic`, Lezama et al. 2022), or the
next ones in a fixed low-discrepancy order (`halton`, Besnier et al. 2025). Places given by the caller (`keep`)
never change and do not count toward the schedule.
"""

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
    n, mask_id = model.seq_len, model.mask_id

    b = batch_size or (len(labels) if labels is not None else len(init_codes) if init_codes is not None else 1)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        if len(labels) != b:
            raise ValueError(f"{len(labels)} labels for batch_size={b}")
    if config.cfg > 0 and (labels is None or model.num_classes == 0):
        raise ValueError("cfg > 0 needs a class-conditional model and labels (guidance contrasts them with no class)")
    if config.strategy == "critic" and not model.has_critic:
        raise ValueError("strategy='critic' needs a model with a token critic (token_critic or self_token_critic)")
    seq, keep = _initial_state(model, b, init_codes, keep, device)

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

    masked = ~keep
    prev_embeds = None
    trajectory = []
    was_training = model.training
    model.eval()
    try:
        for step in range(config.steps):
            if work[step] == 0:  # everything revealed already (more steps than places): nothing to compute
                if return_trajectory:
                    trajectory.append(seq.clone())
                continue
            w = config.cfg_at(step)
            logits, embeds = _guided_logits(model, seq, labels, w, prev_embeds if model.self_cond else None)
            prev_embeds = embeds if model.self_cond else None
            # the same draws every step whatever the settings, so runs that differ only in settings stay comparable
            u_token, u_choice = uniform((2, b, n), device, generator)

            # scores are needed unless this step reveals every candidate (the last step, at the latest)
            need_logp = config.strategy == "confidence" and not final[step] and not config.remask
            tokens, logp = _draw_masked(logits, u_token, masked, n_masked[step], config.temperature_at(step),
                                        config.top_k, config.top_p, need_logp)
            proposal = torch.where(masked, tokens, seq)  # (b, n)
            if final[step]:
                seq, masked = proposal, torch.zeros_like(masked)
            else:
                candidates = ~keep if config.remask else masked
                if config.strategy == "confidence":
                    if config.remask:  # a held token is judged by its own log-prob, not by a fresh draw's
                        logp = _log_prob_of(logits, proposal)
                    score = _add_gumbel(logp, u_choice, config.choice_temperature * config.noise_at(step))
                elif config.strategy == "critic":
                    wrong = _guided_critic(model, proposal, labels, w)  # (b, n) logit that the token is wrong
                    score = _add_gumbel(-wrong, u_choice, config.critic_noise * config.noise_at(step))
                else:
                    score = rank_score.expand(b, n)
                revealed = _top_places(score.masked_fill(~candidates, -torch.inf), reveal[step], reveal_max[step])
                masked = candidates & ~revealed
                seq = proposal.masked_fill(masked, mask_id)
            if return_trajectory:
                trajectory.append(seq.clone())
    finally:
        model.train(was_training)
    return (seq, trajectory) if return_trajectory else seq


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
