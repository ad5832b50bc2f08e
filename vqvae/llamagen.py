"""LlamaGen's image tokenizer, written for this toolkit so its published checkpoints load without LlamaGen's code.

LlamaGen (FoundationVision/LlamaGen, `tokenizer/tokenizer_image/vq_model.py`, checked at commit ce98ec4) is a
taming-style conv VQ-GAN: conv encoder with self-attention at the lowest resolution, a 1x1 `quant_conv` down
to an 8-dim codebook whose entries and inputs are l2-normalised, a 1x1 `post_quant_conv`, and a mirrored
decoder with one more residual block per level. Module names here follow the published state dict
(`encoder.conv_blocks.{i}.res.{j}.conv1.weight`, `quantize.embedding.weight`, ...), so `load_state_dict`
works with strict=True. Inference only: no dropout, losses or codebook-usage bookkeeping (the
`quantize.codebook_used` buffer is kept because published checkpoints carry it).

The defaults are the published `VQ_16` (`vq_ds16_c2i.pt`): f=16, 16384 codes of dim 8. `VQ_8`
(`vq_ds8_c2i.pt`) is ch_mult=(1, 2, 2, 4). Pixels are in [-1, 1] (LlamaGen normalises with mean = std = 0.5).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import Tokenizer, TokenizerSourceError, sha256_of

__all__ = ["LLAMAGEN_VQ8", "LLAMAGEN_VQ16", "LlamaGenTokenizer", "LlamaGenVQ", "check_llamagen_state_dict",
           "infer_llamagen_config", "load_llamagen_weights", "read_llamagen_checkpoint"]

LLAMAGEN_VQ16 = {"ch": 128, "ch_mult": (1, 1, 2, 2, 4), "num_res_blocks": 2, "z_channels": 256,
                 "codebook_size": 16384, "codebook_embed_dim": 8}
LLAMAGEN_VQ8 = {**LLAMAGEN_VQ16, "ch_mult": (1, 2, 2, 4)}
USAGE_BUFFER_LEN = 65536  # length of the `quantize.codebook_used` buffer in upstream checkpoints


def _swish(x):
    # written as upstream writes it (not F.silu), so activations agree bit for bit and codes never flip on ties
    return x * torch.sigmoid(x)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class _ResBlock(nn.Module):
    """norm-swish-conv3x3 twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, dim_in: int, dim_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(dim_in, groups)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.norm2 = _norm(dim_out, groups)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else None

    def forward(self, x):
        residual = self.conv2(_swish(self.norm2(self.conv1(_swish(self.norm1(x))))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + residual


class _SelfAttention(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections q, k, v, proj_out and a residual."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.norm = _norm(dim, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(dim, dim, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        normed = self.norm(x)
        queries = self.q(normed).reshape(b, c, h * w).transpose(1, 2)          # (b, hw, c)
        keys = self.k(normed).reshape(b, c, h * w)                             # (b, c, hw)
        values = self.v(normed).reshape(b, c, h * w)                           # (b, c, hw)
        weights = torch.softmax(torch.bmm(queries, keys) * (c ** -0.5), dim=2)  # (b, hw_q, hw_k)
        out = torch.bmm(values, weights.transpose(1, 2)).reshape(b, c, h, w)   # sum over keys
        return x + self.proj_out(out)


class _Resample(nn.Module):
    """2x down (pad right/bottom by one, 3x3 stride-2 conv) or 2x up (nearest, 3x3 conv)."""

    def __init__(self, dim: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(dim, dim, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: residual blocks, attention after each (lowest resolution only), optional resampling."""

    def __init__(self, dim_in: int, dim_out: int, num_blocks: int, attention: bool, resample: str | None,
                 groups: int):
        super().__init__()
        self.res = nn.ModuleList(_ResBlock(dim_in if j == 0 else dim_out, dim_out, groups) for j in range(num_blocks))
        self.attn = nn.ModuleList(_SelfAttention(dim_out, groups) for _ in range(num_blocks if attention else 0))
        if resample == "down":
            self.downsample = _Resample(dim_out, down=True)
        elif resample == "up":
            self.upsample = _Resample(dim_out, down=False)

    def forward(self, x):
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _middle(dim: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([_ResBlock(dim, dim, groups), _SelfAttention(dim, groups), _ResBlock(dim, dim, groups)])


class _Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, groups, in_channels=3):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            _Level(ch if i == 0 else widths[i - 1], width, num_res_blocks, attention=i == last,
                   resample=None if i == last else "down", groups=groups)
            for i, width in enumerate(widths))
        self.mid = _middle(widths[-1], groups)
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.conv_blocks:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(_swish(self.norm_out(x)))


class _Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, groups, out_channels=3):
        super().__init__()
        widths = [ch * m for m in ch_mult][::-1]  # lowest resolution first
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid = _middle(widths[0], groups)
        self.conv_blocks = nn.ModuleList(
            _Level(widths[max(i - 1, 0)], width, num_res_blocks + 1, attention=i == 0,
                   resample=None if i == last else "up", groups=groups)
            for i, width in enumerate(widths))
        self.norm_out = _norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in self.conv_blocks:
            x = level(x)
        return self.conv_out(_swish(self.norm_out(x)))


class _Codebook(nn.Module):
    """Nearest-neighbour lookup in an (optionally l2-normalised) codebook; module name `quantize` upstream."""

    def __init__(self, size: int, dim: int, l2_norm: bool, usage_buffer: bool):
        super().__init__()
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(size, dim)
        if usage_buffer:  # training-time statistics upstream; kept only so that checkpoints load strictly
            self.register_buffer("codebook_used", torch.zeros(USAGE_BUFFER_LEN))

    def entries(self):
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def codes(self, z, max_elements: int = 1 << 28):
        """Latents (b, d, h, w) -> nearest codes (b, h, w) int64."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        entries = self.entries()
        if self.l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        # squared distances as upstream computes them: |z|^2 + |e|^2 - 2 z.e (same op order, same argmin ties);
        # in row chunks when the (rows, codebook) matrix would be large
        entries_sq = entries.pow(2).sum(dim=1)
        rows = max(1, max_elements // max(1, entries.shape[0]))
        out = []
        for chunk in flat.split(rows):
            dist = chunk.pow(2).sum(dim=1, keepdim=True) + entries_sq - 2 * torch.mm(chunk, entries.t())
            out.append(dist.argmin(dim=1))
        return torch.cat(out).reshape(b, h, w)

    def lookup(self, codes):
        """Codes (b, h, w) -> codebook entries (b, d, h, w)."""
        return self.entries()[codes].permute(0, 3, 1, 2).contiguous()


class LlamaGenVQ(nn.Module):
    """LlamaGen's VQ model (inference). Defaults: the published VQ_16 (`vq_ds16_c2i.pt`).

    ch: width at full resolution; ch_mult: width multipliers per level (f = 2 ** (len(ch_mult) - 1));
    decoder_ch_mult: the decoder's, if different; num_res_blocks: per encoder level (decoder: one more);
    z_channels: encoder output / decoder input width; codebook_size, codebook_embed_dim: the codebook;
    codebook_l2_norm: cosine-similarity codebook (True upstream); norm_groups: GroupNorm groups (32 upstream);
    codebook_usage_buffer: whether the state dict has `quantize.codebook_used` (True upstream).
    """

    def __init__(self, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2, z_channels: int = 256,
                 codebook_size: int = 16384, codebook_embed_dim: int = 8, codebook_l2_norm: bool = True,
                 decoder_ch_mult=None, norm_groups: int = 32, codebook_usage_buffer: bool = True):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        decoder_ch_mult = ch_mult if decoder_ch_mult is None else tuple(int(m) for m in decoder_ch_mult)
        if len(decoder_ch_mult) != len(ch_mult):
            raise ValueError(f"decoder_ch_mult={decoder_ch_mult} must have as many levels as ch_mult={ch_mult}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks={num_res_blocks}: must be >= 1")
        self.config = {"ch": ch, "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks,
                       "z_channels": z_channels, "codebook_size": codebook_size,
                       "codebook_embed_dim": codebook_embed_dim, "codebook_l2_norm": codebook_l2_norm,
                       "decoder_ch_mult": list(decoder_ch_mult), "norm_groups": norm_groups,
                       "codebook_usage_buffer": codebook_usage_buffer}
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.codebook_size = codebook_size
        self.encoder = _Encoder(ch, ch_mult, num_res_blocks, z_channels, norm_groups)
        self.decoder = _Decoder(ch, decoder_ch_mult, num_res_blocks, z_channels, norm_groups)
        self.quantize = _Codebook(codebook_size, codebook_embed_dim, codebook_l2_norm, codebook_usage_buffer)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    def encode_latents(self, images):
        """Images (b, 3, H, W) in [-1, 1] -> pre-quantization latents (b, codebook_embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images):
        """Images (b, 3, H, W) in [-1, 1] -> codes (b, H/f, W/f) int64."""
        return self.quantize.codes(self.encode_latents(images))

    def decode(self, codes):
        """Codes (b, h, w) -> images (b, 3, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))


# ----------------------------------------------------------------------------------------------
# Checkpoints


def read_llamagen_checkpoint(path, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a LlamaGen VQ checkpoint.

    `.pt`-style files are read with `torch.load(weights_only=True)` (plus `argparse.Namespace`, which LlamaGen's
    training checkpoints store under "args"); safetensors files (`.safetensors`, `.sft`) are a bare state dict.
    A pickled dict may be bare or hold the weights under "model" (what the published files and LlamaGen's
    code-extraction scripts use), "ema" or "state_dict"; `checkpoint_key` picks one, default "model" first."""
    path = Path(path)
    if path.suffix in (".safetensors", ".sft"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError and friends
            raise TokenizerSourceError(f"{path} is not a readable safetensors file ({err})") from err
    try:
        safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip), EOFError
        raise TokenizerSourceError(f"{path} cannot be read as a weights-only torch checkpoint ({err}); "
                                   "it is not a LlamaGen VQ checkpoint or holds objects we do not unpickle") from err
    if not isinstance(obj, dict):
        raise TokenizerSourceError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        if checkpoint_key is not None:
            raise TokenizerSourceError(f"{path} is a bare state dict: checkpoint_key={checkpoint_key!r} "
                                       "does not apply")
        return obj
    keys = [checkpoint_key] if checkpoint_key is not None else ["model", "ema", "state_dict"]
    for key in keys:
        if isinstance(obj.get(key), dict):
            return obj[key]
    raise TokenizerSourceError(f"{path} has no state dict under {keys} "
                               f"(top-level keys: {sorted(map(str, obj))[:10]})")


def infer_llamagen_config(state_dict: dict) -> dict:
    """LlamaGenVQ arguments read off a state dict's shapes; VQ_16 defaults for what cannot be read.

    Not inferable: norm_groups, codebook_l2_norm (both defaults match every published checkpoint)."""
    config = dict(LLAMAGEN_VQ16)
    sd = state_dict
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks."))
        blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.conv_blocks.0.res."))
        ch_mult = [sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)]
        dec_mult = [sd[f"decoder.conv_blocks.{levels - 1 - i}.res.0.conv1.weight"].shape[0] // ch
                    for i in range(levels)]
        size, dim = sd["quantize.embedding.weight"].shape
        config.update(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=blocks,
                      z_channels=sd["encoder.conv_out.weight"].shape[0], codebook_size=size, codebook_embed_dim=dim)
        if dec_mult != ch_mult:
            config["decoder_ch_mult"] = tuple(dec_mult)
    except (KeyError, ValueError, IndexError, AttributeError):
        pass  # not LlamaGen-shaped: the strict load below names the keys that differ
    config["codebook_usage_buffer"] = "quantize.codebook_used" in sd
    return config


def check_llamagen_state_dict(model: LlamaGenVQ, state_dict: dict, where="the state dict") -> None:
    """Raise TokenizerSourceError naming the first missing / unexpected / misshapen keys, if any.

    `model` may live on the meta device: only its key names and shapes are used."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing keys (first: {missing[:5]})" if missing else "",
                 f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})" if unexpected else "",
                 f"{len(shapes)} shape mismatches (first: {shapes[:3]})" if shapes else ""]
        raise TokenizerSourceError(f"{where} does not match LlamaGen's VQ architecture "
                                   f"{model.config}: " + "; ".join(p for p in parts if p))


def load_llamagen_weights(model: LlamaGenVQ, state_dict: dict, where="the state dict") -> None:
    """`model.load_state_dict(state_dict, strict=True)`, with an error that names the first mismatches."""
    check_llamagen_state_dict(model, state_dict, where)
    model.load_state_dict(state_dict, strict=True)


class LlamaGenTokenizer(Tokenizer):
    """LlamaGen's VQ tokenizer (our `LlamaGenVQ`), pixels in [-1, 1]."""

    kind = "llamagen"

    def __init__(self, model: LlamaGenVQ, source: dict | None = None):
        self.model = model.eval()
        self.codebook_size = model.codebook_size
        self.downsample = model.downsample
        self.source = {**(source or {}), "kind": self.kind, "config": dict(model.config)}

    @classmethod
    def from_checkpoint(cls, path, *, device="cpu", checkpoint_key=None, config: dict | None = None,
                        source: dict | None = None) -> LlamaGenTokenizer:
        """Load a LlamaGen checkpoint; the architecture is read off the weights, `config` overrides it."""
        path = Path(path)
        state_dict = read_llamagen_checkpoint(path, checkpoint_key)
        arch = {**infer_llamagen_config(state_dict), **(config or {})}
        try:
            with torch.device("meta"):  # names and shapes first: a wrong file fails before any allocation
                probe = LlamaGenVQ(**arch)
        except (TypeError, ValueError) as err:  # bad override, or GroupNorm groups not dividing a width
            raise TokenizerSourceError(f"cannot build LlamaGenVQ({arch}) for {path}: {err}") from err
        check_llamagen_state_dict(probe, state_dict, where=str(path))
        model = LlamaGenVQ(**arch)
        model.load_state_dict(state_dict, strict=True)
        if source is None:
            source = {"location": "local", "path": str(path.resolve())}
        source = {**source, "weights_sha256": {path.name: sha256_of(path)}, "checkpoint_key": checkpoint_key}
        return cls(model.to(device), source)

    def _encode(self, images):
        return self.model.encode(images)

    def _decode(self, codes):
        return self.model.decode(codes)
