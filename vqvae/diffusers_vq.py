"""Adapter for diffusers' `VQModel` (LDM VQ-f4/f8, Kandinsky's MoVQ, aMUSEd's VQ-GAN, ...).

diffusers is an optional dependency (`pip install maskgit-toolkit[pretrained]`); it is imported only here.
The API this relies on (checked against diffusers 0.42.1, `models/autoencoders/vq_model.py` and `vae.py`):

  - `model.encode(x).latents`: encoder + quant_conv, *before* quantization, (b, vq_embed_dim, h, w);
  - `model.quantize(latents)` -> `(z_q, loss, (perplexity, min_encodings, indices))`, indices flat (b*h*w,)
    (VQModel builds its VectorQuantizer with remap=None, sane_index_shape=False);
  - `model.quantize.get_codebook_entry(indices, shape=(b, h, w, d))` -> (b, d, h, w);
  - `model.decode(z, force_not_quantize=True)` skips re-quantizing; but when `config.lookup_from_codebook` is
    True (aMUSEd) `decode` expects the *indices* and a `shape`, and looks them up itself;
  - downsampling f = 2 ** (len(block_out_channels) - 1): every encoder block but the last halves the size.
"""

from __future__ import annotations

from pathlib import Path

from .tokenizer import CONFIG_NAME, Tokenizer, TokenizerSourceError, _check_config, _read_config, sha256_of

# weight files diffusers' from_pretrained reads, in its order of preference
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
INDEX_SUFFIX = ".index.json"


def _import_vqmodel():
    try:
        from diffusers import VQModel
    except ImportError as err:
        raise TokenizerSourceError("loading a diffusers VQModel needs diffusers: pip install 'diffusers>=0.25' "
                                   "(or the toolkit's [pretrained] extra)") from err
    return VQModel


def _weight_files(place) -> list[str]:
    """The weight files of a diffusers model folder / repo that from_pretrained will read (shards included)."""
    import json

    for name in (SAFETENSORS_NAME, SAFETENSORS_NAME + INDEX_SUFFIX, BIN_NAME, BIN_NAME + INDEX_SUFFIX):
        if name in place.names:
            if not name.endswith(INDEX_SUFFIX):
                return [name]
            index = json.loads(Path(place.get(name)).read_text())
            return [name, *sorted(set(index.get("weight_map", {}).values()))]
    raise TokenizerSourceError(f"{place.label} has a diffusers VQModel config.json but no weights "
                               f"({SAFETENSORS_NAME} or {BIN_NAME}); files: {place.names[:10]}")


class DiffusersVQTokenizer(Tokenizer):
    """A diffusers `VQModel`; `pixel_range` is the range the model was trained on ((-1, 1) for most)."""

    kind = "diffusers"

    def __init__(self, model, *, pixel_range=None, source: dict | None = None):
        lo, hi = (-1.0, 1.0) if pixel_range is None else (float(pixel_range[0]), float(pixel_range[1]))
        if not lo < hi:
            raise ValueError(f"pixel_range={pixel_range!r}: need low < high")
        self.model = model.eval()
        self.pixel_range = (lo, hi)
        config = model.config
        self.codebook_size = int(config.num_vq_embeddings)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.embed_dim = int(model.quantize.embedding.weight.shape[1])
        self.source = {**(source or {}), "kind": self.kind, "pixel_range": [lo, hi]}

    @classmethod
    def from_folder(cls, folder, *, device="cpu", pixel_range=None) -> DiffusersVQTokenizer:
        """Load a VQModel saved with `save_pretrained` (config.json + diffusion_pytorch_model.*)."""
        from .tokenizer import _LocalFolder

        return cls.from_files(_LocalFolder(Path(folder)), device=device, pixel_range=pixel_range)

    @classmethod
    def from_files(cls, place, *, device="cpu", pixel_range=None) -> DiffusersVQTokenizer:
        # check everything we can before diffusers is imported or a weight is read
        config_path = place.get(CONFIG_NAME)
        _check_config(_read_config(config_path), place.label, expect="diffusers")
        names = _weight_files(place)
        paths = {name: place.get(name) for name in names}  # Hub: fetched into (or found in) the cache
        VQModel = _import_vqmodel()
        try:
            model = VQModel.from_pretrained(str(config_path.parent))
        except (OSError, ValueError, RuntimeError) as err:
            raise TokenizerSourceError(f"diffusers could not load the VQModel in {place.label}: {err}") from err
        source = {**place.describe(), "weights_sha256": {n: sha256_of(p) for n, p in paths.items()}}
        return cls(model.to(device), pixel_range=pixel_range, source=source)

    def _to_model_range(self, images):
        lo, hi = self.pixel_range
        if (lo, hi) == (-1.0, 1.0):
            return images
        return (images + 1) * ((hi - lo) / 2) + lo

    def _from_model_range(self, images):
        lo, hi = self.pixel_range
        if (lo, hi) == (-1.0, 1.0):
            return images
        return (images - lo) * (2 / (hi - lo)) - 1

    def _encode(self, images):
        latents = self.model.encode(self._to_model_range(images)).latents
        _, _, (_, _, indices) = self.model.quantize(latents)
        b, _, h, w = latents.shape
        return indices.reshape(b, h, w)

    def _decode(self, codes):
        b, h, w = codes.shape
        shape = (b, h, w, self.embed_dim)
        if getattr(self.model.config, "lookup_from_codebook", False):
            out = self.model.decode(codes, force_not_quantize=True, shape=shape).sample
        else:
            quant = self.model.quantize.get_codebook_entry(codes.reshape(-1), shape)
            out = self.model.decode(quant, force_not_quantize=True).sample
        return self._from_model_range(out)


__all__ = ["DiffusersVQTokenizer"]
