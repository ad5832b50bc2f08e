"""MaskGIT: a bidirectional transformer that predicts masked codes of a (h, w) token grid (Chang et al. 2022).

The workflow is x-transformers' NonAutoregressiveWrapper's:

    net = TransformerWrapper(num_tokens=K + 1, max_seq_len=h * w, attn_layers=Encoder(...), use_abs_pos_emb=False)
    model = MaskGIT(net, grid=(h, w), codebook_size=K, num_classes=10)
    loss = model(codes, labels).loss
    codes = model.generate(batch_size=16, labels=labels, steps=8)

It is our own module rather than a subclass: every method of the upstream wrapper needed a change (see
docs/upstream.md), and a subclass would inherit its Python-`random` coin flips and constructor
defaults (mask id, loss weighting) that change semantics. What differs from upstream, and why:

* Loss weight: plain masked cross-entropy by default; `mdlm_weight=True` uses -m'(t)/m(t) >= 0
  (upstream's m'/(1-m) is negative, so minimising it un-learns).
* The mask token (id K) is never predicted: `logits()` drops its column, so neither the loss nor a sampler
  can put mass on it; BERT-style random tokens are drawn from [0, K).
* Critic labels are `generated != codes`: a never-masked place holds the true code and is labelled 0
  (upstream labels `sampled != codes` everywhere).
* The critic (self or separate) gets the same class condition as the generator, including dropped ones.
* All randomness comes from torch, so `torch.manual_seed` reproduces a training step.

Design choices:

* Positions: a fixed 2D sin-cos table (half the channels encode the row, half the column) times a learned
  scalar initialised to dim**-0.5, like x-transformers' `scaled_sinu_pos_emb` but 2D. It is added through
  `sum_embeds`, not the float `pos=` argument: the wrapper also forwards `pos` to the attention layers, where
  rotary or ALiBi would read it as 1D positions (with rotary, a (b, n, d) `pos` crashes). Build the net with
  `use_abs_pos_emb=False` (`build_maskgit` does); a learned 1D table on top would be redundant, not wrong.
* Class condition: one prepended token (`prepend_embeds`) from our own embedding table (ids 0..C-1, null
  class C), cut off the output: a class token before the image tokens, as in MaskGIT's reference code. It works
  with any TransformerWrapper (no `embed_num_tokens` needed at construction) and with a critic of another width.
  With a net whose Encoder has `use_adaptive_layernorm=True` the same embedding is passed as x-transformers'
  `condition` instead (adaptive LayerNorm in every block, as DiT-style models condition); no token is prepended.
* `positions="rope2d"`: axial 2D rotary positions instead of the added table. Half of each head's channel pairs
  rotate with the row, half with the column (RoPE-Mixed/axial RoPE as in 2D ViTs), so attention scores depend
  on the row and column offsets between places; a prepended class token gets angle 0. The table is handed to
  the Encoder as a precomputed `rotary_pos_emb=(freqs, None)` (the argument its own 1D rotary fills), so any
  Encoder works; build it without `rotary_pos_emb=True`.
* Self-conditioning: as upstream, a no-grad first pass whose output embeddings are projected and summed into
  the input, run for the whole batch with probability `self_cond_train_prob`; "no self-conditioning" is a zero
  vector (not a learned one), so no parameter is left without a gradient in some steps (DDP-safe). The coin
  is the one graph break under torch.compile; without self-conditioning the training step is one graph.
"""

from collections import namedtuple
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from x_transformers import Encoder, TransformerWrapper

from .config import MaskGITConfig
from .schedules import check_schedule, mask_rate, mdlm_weight

Losses = namedtuple("Losses", ["loss", "generator_loss", "critic_loss"])


def sincos_2d(h: int, w: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos position table (h*w, dim), row-major; the first half of the channels encodes the row."""
    quarter = dim // 4
    freqs = 1.0 / (10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (dim/4,)
    rows = torch.arange(h, dtype=torch.float64)[:, None] * freqs  # (h, dim/4)
    cols = torch.arange(w, dtype=torch.float64)[:, None] * freqs  # (w, dim/4)
    row_emb = torch.cat((rows.sin(), rows.cos()), dim=-1)[:, None, :].expand(h, w, dim // 2)
    col_emb = torch.cat((cols.sin(), cols.cos()), dim=-1)[None, :, :].expand(h, w, dim // 2)
    return rearrange(torch.cat((row_emb, col_emb), dim=-1), "h w d -> (h w) d").float()


def rope_2d(h: int, w: int, head_dim: int, prepended: int = 1) -> Tensor:
    """Axial 2D rotary angles (1, prepended + h*w, head_dim), row-major, in x-transformers' interleaved pair
    layout (channels 2i and 2i+1 share angle i): the first head_dim/4 pairs turn with the row, the rest with the
    column; the `prepended` places (a class token) get angle 0, i.e. no rotation."""
    if head_dim % 4:
        raise ValueError(f"head dim {head_dim} must be divisible by 4 for 2D rotary positions")
    quarter = head_dim // 4
    freqs = 1.0 / (10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (hd/4,)
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)  # (h*w,) row of each place
    cols = torch.arange(w, dtype=torch.float64).repeat(h)  # (h*w,)
    angles = torch.cat((rows[:, None] * freqs, cols[:, None] * freqs), dim=-1)  # (h*w, hd/2)
    angles = torch.cat((angles.new_zeros(prepended, head_dim // 2), angles))
    return angles.repeat_interleave(2, dim=-1)[None].float()  # (1, prepended + h*w, hd)


class GridPositions(nn.Module):
    """2D sin-cos positions of a (h, w) grid with one learned scale: () -> (h*w, dim)."""

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2D sin-cos positions")
        self.register_buffer("table", sincos_2d(*grid, dim), persistent=False)  # rebuilt from the grid
        self.scale = nn.Parameter(torch.tensor(dim**-0.5))

    def forward(self) -> Tensor:
        return self.table * self.scale


def uniform(shape, device, generator: torch.Generator | None = None) -> Tensor:
    """U(0, 1) from `generator` (drawn on its own device: a CPU generator can drive a GPU model) or the global
    torch RNG, delivered on `device`."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def gumbel_sample(logits: Tensor, temperature: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Sample ids (b, n) from softmax(logits / temperature), logits (b, n, k), temperature (b,) > 0."""
    u = uniform(logits.shape, logits.device, generator).clamp(min=1e-20)
    gumbel = -torch.log((-torch.log(u)).clamp(min=1e-20))  # (b, n, k)
    return (logits.float() / temperature[:, None, None] + gumbel).argmax(dim=-1)


class MaskGIT(nn.Module):
    """Masked token model over a (h, w) code grid: x-transformers' NonAutoregressiveWrapper workflow, mended."""

    def __init__(
        self,
        net: TransformerWrapper,
        *,
        grid: tuple[int, int],
        codebook_size: int,
        num_classes: int = 0,
        schedule: str = "cosine",
        cond_drop_prob: float = 0.1,
        label_smoothing: float = 0.0,
        mdlm_weight: bool = False,
        no_replace_prob: float = 0.0,
        random_token_prob: float = 0.0,
        self_cond: bool = False,
        self_cond_train_prob: float = 0.5,
        token_critic: TransformerWrapper | None = None,
        self_token_critic: bool = False,
        critic_loss_weight: float = 1.0,
        critic_temperature: float | None = None,  # None: U(0, 1) per sample, so the critic sees varied samples
        positions: str = "sincos",
        head_dim: int | None = None,  # needed by positions="rope2d"
    ):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.seq_len = self.grid[0] * self.grid[1]
        self.codebook_size = codebook_size
        self.mask_id = codebook_size
        self.num_classes = num_classes
        self.null_class = num_classes
        self.schedule = schedule
        self.cond_drop_prob = cond_drop_prob
        self.label_smoothing = label_smoothing
        self.mdlm_weight = mdlm_weight
        self.no_replace_prob = no_replace_prob
        self.random_token_prob = random_token_prob
        self.self_cond = self_cond
        self.self_cond_train_prob = self_cond_train_prob
        self.critic_loss_weight = critic_loss_weight
        self.critic_temperature = critic_temperature
        self.positions = positions
        self._validate(net, token_critic, self_token_critic)
        # adaptive-LayerNorm conditioning when the Encoder was built for it, else a prepended class token
        self.adaln = bool(getattr(net.attn_layers, "need_condition", False))

        self.net = net
        dim, emb_dim = net.attn_layers.dim, net.emb_dim
        self.dim = dim
        if positions == "rope2d":
            if head_dim is None:
                raise ValueError('positions="rope2d" needs head_dim (the attention head width)')
            self.pos_emb = None
            self.register_buffer("rope", rope_2d(*self.grid, head_dim), persistent=False)  # rebuilt from the grid
        else:
            self.pos_emb = GridPositions(self.grid, emb_dim)
        self.class_emb = self._class_embedding(net.attn_layers.dim_condition if self.adaln else emb_dim)
        # previous embeddings (b, n, dim) -> input embeddings (b, n, emb_dim); upstream used emb_dim for both
        self.to_self_cond = nn.Linear(dim, emb_dim, bias=False) if self_cond else None

        self.token_critic = token_critic
        self.critic_head = nn.Linear(dim, 1) if self_token_critic else None
        if token_critic is not None:
            self.critic_pos_emb = GridPositions(self.grid, token_critic.emb_dim)
            self.critic_adaln = bool(getattr(token_critic.attn_layers, "need_condition", False))
            self.critic_class_emb = self._class_embedding(
                token_critic.attn_layers.dim_condition if self.critic_adaln else token_critic.emb_dim)
        self.has_critic = token_critic is not None or self_token_critic

    def _validate(self, net, token_critic, self_token_critic):
        h, w = self.grid
        if h < 1 or w < 1:
            raise ValueError(f"grid={self.grid}: both sides must be >= 1")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size={self.codebook_size}: must be >= 2")
        if net.num_tokens != self.codebook_size + 1:
            raise ValueError(
                f"net.num_tokens={net.num_tokens}: build the net with num_tokens=codebook_size + 1 = "
                f"{self.codebook_size + 1} (the codes plus one mask token)"
            )
        for name, module in (("net", net), ("token_critic", token_critic)):
            if module is None:
                continue
            if getattr(module.attn_layers, "causal", False):
                raise ValueError(f"{name} is causal: use attn_layers=Encoder(...), MaskGIT attends both ways")
            if module.max_seq_len < self.seq_len:
                raise ValueError(f"{name}.max_seq_len={module.max_seq_len} < h*w={self.seq_len}: raise max_seq_len")
        if token_critic is not None:
            if token_critic.num_tokens < self.codebook_size:
                raise ValueError(f"token_critic.num_tokens={token_critic.num_tokens} < codebook_size")
            out = getattr(token_critic.to_logits, "out_features", 1)
            if out != 1:
                raise ValueError(f"token_critic outputs {out} logits per place: build it with logits_dim=1")
        if self_token_critic and token_critic is not None:
            raise ValueError("pass either token_critic or self_token_critic=True, not both")
        if self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes}: must be >= 0 (0 = unconditional)")
        check_schedule(self.schedule)
        if self.positions not in ("sincos", "rope2d"):
            raise ValueError(f"positions={self.positions!r}: choose 'sincos' or 'rope2d'")
        if getattr(net.attn_layers, "need_condition", False) and self.num_classes == 0:
            raise ValueError("the net uses adaptive LayerNorm but the model is unconditional: build the Encoder "
                             "without use_adaptive_layernorm, or give num_classes")
        for name in ("cond_drop_prob", "no_replace_prob", "random_token_prob", "self_cond_train_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if self.no_replace_prob + self.random_token_prob > 1.0:
            raise ValueError("no_replace_prob + random_token_prob must be <= 1: they split the masked places")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing}: must be in [0, 1)")
        if self.critic_loss_weight < 0:
            raise ValueError(f"critic_loss_weight={self.critic_loss_weight}: must be >= 0")
        if self.critic_temperature is not None and self.critic_temperature <= 0:
            raise ValueError(f"critic_temperature={self.critic_temperature}: must be > 0, or None for U(0, 1)")

    def _class_embedding(self, dim: int) -> nn.Embedding | None:
        if self.num_classes == 0:
            return None
        emb = nn.Embedding(self.num_classes + 1, dim)  # the last row is the null class
        nn.init.normal_(emb.weight, std=dim**-0.5)  # about the scale of x-transformers' token embeddings
        return emb

    @property
    def device(self) -> torch.device:
        return self.net.token_emb.emb.weight.device

    # conditioning

    def cond_ids(self, labels: Tensor | None, batch: int, device, drop_prob: float = 0.0) -> Tensor | None:
        """Class ids (b,) with -1 / None mapped to the null class and a `drop_prob` fraction dropped to it.

        None for an unconditional model (whose labels are ignored)."""
        if self.num_classes == 0:
            return None
        if labels is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        ids = labels.to(device=device, dtype=torch.long)
        ids = torch.where(ids < 0, self.null_class, ids)
        if drop_prob > 0:
            ids = torch.where(torch.rand(batch, device=device) < drop_prob, self.null_class, ids)
        return ids

    @staticmethod
    def _prepend(class_emb: nn.Embedding | None, cond: Tensor | None, adaln: bool = False) -> dict:
        if class_emb is None:
            return {}
        if adaln:
            return dict(condition=class_emb(cond))  # (b, dim_condition)
        # we cut the class token off the output ourselves: x-transformers' excise_prepend_embeds=True crashes
        # with return_embeddings=True (UnboundLocalError on `logits`, 2.31.10; pinned in test_upstream.py)
        return dict(prepend_embeds=class_emb(cond)[:, None, :])  # (b, 1, d)

    def _net_kwargs(self, b: int, cond: Tensor | None, self_cond: Tensor | None) -> dict:
        kwargs = self._prepend(self.class_emb, cond, self.adaln)
        if self.pos_emb is None:
            kwargs["rotary_pos_emb"] = (self.rope, None)
            sum_embeds = None
        else:
            sum_embeds = self.pos_emb().expand(b, -1, -1)  # (b, n, emb_dim)
        if self.self_cond and self_cond is None and self.training:
            # none = zeros, which the bias-free projection maps to 0; in training we still run it, so that
            # to_self_cond is in every step's graph (DDP without find_unused_parameters)
            self_cond = torch.zeros(b, self.seq_len, self.dim, device=self.device)
        if self.self_cond and self_cond is not None:
            projected = self.to_self_cond(self_cond)  # (b, n, emb_dim)
            sum_embeds = projected if sum_embeds is None else sum_embeds + projected
        if sum_embeds is not None:
            kwargs["sum_embeds"] = sum_embeds
        return kwargs

    def _generator(self, seq: Tensor, cond: Tensor | None, self_cond: Tensor | None) -> tuple[Tensor, Tensor]:
        kwargs = self._net_kwargs(seq.shape[0], cond, self_cond)
        logits, embeds = self.net(seq, return_logits_and_embeddings=True, **kwargs)
        n = seq.shape[1]  # the last n places: after the class token, if any
        return logits[:, -n:, : self.codebook_size], embeds[:, -n:]  # (b, n, K) without the mask column, (b, n, dim)

    def _critic(self, seq: Tensor, cond: Tensor | None, train_trunk: bool = True) -> Tensor:
        b, n = seq.shape
        if self.critic_head is not None:  # self critic: a head on the generator's embeddings of `seq`
            with nullcontext() if train_trunk else torch.no_grad():
                embeds = self.net(seq, return_embeddings=True, **self._net_kwargs(b, cond, None))
            return rearrange(self.critic_head(embeds[:, -n:]), "b n 1 -> b n")
        out = self.token_critic(
            seq, sum_embeds=self.critic_pos_emb().expand(b, -1, -1),
            **self._prepend(self.critic_class_emb, cond, self.critic_adaln),
        )
        return rearrange(out[:, -n:], "b n 1 -> b n")

    def _check_seq(self, seq: Tensor) -> Tensor:
        if seq.ndim == 3:
            seq = rearrange(seq, "b h w -> b (h w)")
        if seq.ndim != 2 or seq.shape[1] != self.seq_len:
            raise ValueError(f"expected codes (b, {self.seq_len}) or (b, {self.grid[0]}, {self.grid[1]}), "
                             f"got {tuple(seq.shape)}")
        return seq.long()

    def logits(self, seq: Tensor, labels: Tensor | None = None, self_cond: Tensor | None = None):
        """Logits (b, n, K) over the codebook (no mask column) and embeddings (b, n, dim) of seq (b, n).

        seq holds mask_id at masked places; labels (b,) (None, -1 or null_class = unconditional); self_cond:
        embeddings (b, n, dim) from the previous step, or None (ignored unless the model uses self-conditioning)."""
        seq = self._check_seq(seq)
        return self._generator(seq, self.cond_ids(labels, seq.shape[0], seq.device), self_cond)

    def critic_logits(self, seq: Tensor, labels: Tensor | None = None) -> Tensor:
        """(b, n): logit that the code at each place of seq (b, n) (no mask tokens) is wrong."""
        if not self.has_critic:
            raise ValueError("this model has no token critic: build it with token_critic or self_token_critic")
        seq = self._check_seq(seq)
        return self._critic(seq, self.cond_ids(labels, seq.shape[0], seq.device))

    # training pieces

    def random_mask(self, t: Tensor, noise: Tensor) -> Tensor:
        """Mask (b, n): ceil(m(t) n) places per row (at least 1), the ones with the smallest `noise` (b, n)."""
        n = noise.shape[1]
        num = (mask_rate(self.schedule, t) * n).ceil().clamp(1, n)  # (b,)
        rank = noise.argsort(dim=-1).argsort(dim=-1)  # (b, n): a uniformly random permutation per row
        return rank < num[:, None]

    def corrupt(self, codes: Tensor, mask: Tensor) -> Tensor:
        """Model input: masked places become mask_id, or (BERT-style) keep their code / show a random code."""
        if self.no_replace_prob == 0 and self.random_token_prob == 0:
            return torch.where(mask, self.mask_id, codes)
        u = torch.rand(codes.shape, device=codes.device)
        keep = u < self.no_replace_prob
        shuffle = ~keep & (u < self.no_replace_prob + self.random_token_prob)
        random_codes = torch.randint(0, self.codebook_size, codes.shape, device=codes.device)  # never mask_id
        inputs = torch.where(mask & shuffle, random_codes, codes)
        return torch.where(mask & ~keep & ~shuffle, self.mask_id, inputs)

    def critic_batch(self, logits: Tensor, codes: Tensor, mask: Tensor, temperature: Tensor,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The critic's training pair: generated (b, n) = generator samples at masked places, codes elsewhere,
        and labels (b, n) = 1.0 where generated differs from codes. temperature (b,) > 0."""
        sampled = gumbel_sample(logits.detach(), temperature, generator)
        generated = torch.where(mask, sampled, codes)
        return generated, (generated != codes).float()

    def _masked_ce(self, logits: Tensor, codes: Tensor, mask: Tensor, t: Tensor) -> Tensor:
        ce = F.cross_entropy(
            rearrange(logits.float(), "b n k -> (b n) k"), rearrange(codes, "b n -> (b n)"), reduction="none",
            label_smoothing=self.label_smoothing,
        ).view_as(codes)  # (b, n); (b n) k keeps the classes contiguous, much faster than b k n on CPU
        weight = mdlm_weight(self.schedule, t) if self.mdlm_weight else torch.ones_like(t)  # (b,)
        mask = mask.float()
        # mean over the batch's masked places; with MDLM weights this is proportional to the ELBO
        return (ce * mask * weight[:, None]).sum() / mask.sum()

    def _self_cond_pass(self, inputs: Tensor, cond: Tensor | None) -> Tensor | None:
        # one coin per batch from the CPU torch RNG: skips the extra pass when tails, and costs no GPU sync
        if not self.self_cond or torch.rand(()).item() >= self.self_cond_train_prob:
            return None
        with torch.no_grad():
            return self._generator(inputs, cond, None)[1].detach()

    def forward(self, codes: Tensor, labels: Tensor | None = None, *, only_train_generator: bool = False,
                only_train_critic: bool = False) -> Losses:
        """Training losses for codes (b, n) or (b, h, w); critic_loss is None without a critic.

        With only_train_critic the generator runs under no_grad (a self critic then trains its head only)
        and `loss` is the critic's loss; generator_loss is still reported, detached."""
        if only_train_generator and only_train_critic:
            raise ValueError("only_train_generator and only_train_critic exclude each other")
        if only_train_critic and not self.has_critic:
            raise ValueError("only_train_critic needs a token critic")
        codes = self._check_seq(codes)
        b, n, device = *codes.shape, codes.device
        cond = self.cond_ids(labels, b, device, self.cond_drop_prob if self.training else 0.0)  # shared by the critic

        t = torch.rand(b, device=device)
        mask = self.random_mask(t, torch.rand(b, n, device=device))  # (b, n)
        inputs = self.corrupt(codes, mask)

        with torch.no_grad() if only_train_critic else nullcontext():
            logits, _ = self._generator(inputs, cond, self._self_cond_pass(inputs, cond))
            generator_loss = self._masked_ce(logits, codes, mask, t)

        if not self.has_critic or only_train_generator:
            return Losses(generator_loss, generator_loss, None)

        if self.critic_temperature is None:
            temperature = torch.rand(b, device=device).clamp(min=1e-3)
        else:
            temperature = torch.full((b,), self.critic_temperature, device=device)
        generated, critic_labels = self.critic_batch(logits, codes, mask, temperature)
        critic_out = self._critic(generated, cond, train_trunk=not only_train_critic)
        critic_loss = F.binary_cross_entropy_with_logits(critic_out.float(), critic_labels)

        if only_train_critic:
            return Losses(critic_loss, generator_loss.detach(), critic_loss)
        return Losses(generator_loss + self.critic_loss_weight * critic_loss, generator_loss, critic_loss)

    @torch.no_grad()
    def evaluate(self, codes: Tensor, labels: Tensor | None = None,
                 generator: torch.Generator | None = None) -> dict[str, float]:
        """Held-out metrics at random t (from `generator`): plain masked CE "loss", "masked_acc", and with a
        critic "critic_loss" / "critic_acc" on temperature-1 samples. No condition dropout, no BERT corruption;
        a self-conditioned model gets one self-conditioning pass, as at every sampling step after the first."""
        was_training = self.training
        self.eval()
        codes = self._check_seq(codes)
        b, n, device = *codes.shape, codes.device
        cond = self.cond_ids(labels, b, device)

        t = uniform((b,), device, generator)
        mask = self.random_mask(t, uniform((b, n), device, generator))
        inputs = torch.where(mask, self.mask_id, codes)
        self_cond = self._generator(inputs, cond, None)[1] if self.self_cond else None
        logits, _ = self._generator(inputs, cond, self_cond)

        ce = F.cross_entropy(
            rearrange(logits.float(), "b n k -> (b n) k"), rearrange(codes, "b n -> (b n)"), reduction="none"
        ).view_as(codes)
        metrics = {
            "loss": ce[mask].mean().item(),
            "masked_acc": (logits.argmax(dim=-1) == codes)[mask].float().mean().item(),
        }
        if self.has_critic:
            ones = torch.ones(b, device=device)
            generated, critic_labels = self.critic_batch(logits, codes, mask, ones, generator)
            critic_out = self._critic(generated, cond).float()
            metrics["critic_loss"] = F.binary_cross_entropy_with_logits(critic_out, critic_labels).item()
            metrics["critic_acc"] = ((critic_out > 0).float() == critic_labels).float().mean().item()
        self.train(was_training)
        return metrics

    @torch.no_grad()
    def generate(self, batch_size: int | None = None, labels: Tensor | None = None, steps: int = 8,
                 **sampler_kwargs):
        """Sample codes (b, n) with maskgit.sampler; (n,) if neither batch_size nor labels is given.

        sampler_kwargs: SamplerConfig fields (schedule defaults to the training schedule) and sample()'s
        keyword arguments (init_codes, keep, generator, return_trajectory)."""
        from .sampler import SamplerConfig, sample  # lazy: the sampler imports this module

        call_kwargs = {k: sampler_kwargs.pop(k) for k in ("init_codes", "keep", "generator", "return_trajectory")
                       if k in sampler_kwargs}
        sampler_kwargs.setdefault("schedule", self.schedule)
        sample_one = batch_size is None and labels is None
        if batch_size is None:
            batch_size = 1 if labels is None else labels.shape[0]

        was_training = self.training
        self.eval()
        try:
            out = sample(self, batch_size, labels, SamplerConfig(steps=steps, **sampler_kwargs), **call_kwargs)
        finally:
            self.train(was_training)
        if not sample_one:
            return out
        if call_kwargs.get("return_trajectory", False):
            codes, trajectory = out
            return codes[0], [step[0] for step in trajectory]
        return out[0]


def build_maskgit(cfg: MaskGITConfig, *, codebook_size: int, grid: tuple[int, int], num_classes: int) -> MaskGIT:
    """MaskGIT from a config, for a tokenizer with `codebook_size` codes on a `grid` and a dataset's classes."""
    cfg.validate()
    if cfg.class_cond and num_classes < 1:
        raise ValueError("class_cond=True needs a labelled dataset (num_classes >= 1); set class_cond=False")
    seq_len = grid[0] * grid[1]

    def encoder(dim: int, depth: int) -> Encoder:
        adaln = cfg.class_cond and cfg.class_cond_mode == "adaln"
        return Encoder(
            dim=dim, depth=depth, heads=cfg.heads, attn_dim_head=dim // cfg.heads, ff_mult=cfg.ff_mult,
            attn_dropout=cfg.dropout, ff_dropout=cfg.dropout, attn_flash=True,  # flash: PyTorch SDPA
            ff_glu=cfg.ff_glu, ff_swish=cfg.ff_glu, attn_qk_norm=cfg.qk_norm,
            **(dict(use_adaptive_layernorm=True, dim_condition=dim) if adaln else {}),
        )

    net = TransformerWrapper(
        num_tokens=codebook_size + 1, max_seq_len=seq_len, attn_layers=encoder(cfg.dim, cfg.depth),
        use_abs_pos_emb=False,  # MaskGIT adds 2D positions itself
    )
    critic = None
    if cfg.critic == "separate":
        critic = TransformerWrapper(
            num_tokens=codebook_size, max_seq_len=seq_len, logits_dim=1,  # sees no mask tokens
            attn_layers=encoder(cfg.critic_dim or cfg.dim, cfg.critic_depth), use_abs_pos_emb=False,
        )
    return MaskGIT(
        net, grid=grid, codebook_size=codebook_size, num_classes=num_classes if cfg.class_cond else 0,
        schedule=cfg.schedule, cond_drop_prob=cfg.cond_drop_prob, label_smoothing=cfg.label_smoothing,
        mdlm_weight=cfg.mdlm_weight, no_replace_prob=cfg.no_replace_prob, random_token_prob=cfg.random_token_prob,
        self_cond=cfg.self_cond, self_cond_train_prob=cfg.self_cond_train_prob, token_critic=critic,
        self_token_critic=cfg.critic == "self", critic_loss_weight=cfg.critic_loss_weight,
        critic_temperature=cfg.critic_temperature or None, positions=cfg.positions, head_dim=cfg.dim // cfg.heads,
    )
