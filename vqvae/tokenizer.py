"""One interface for every image tokenizer stage 2 can train on: ours, diffusers' VQModel, LlamaGen's VQ.

A `Tokenizer` turns images (b, 3, H, W) in [-1, 1] into code grids (b, H/f, W/f) int64 and back. Adapters
convert to whatever pixel range the wrapped model expects, so callers only ever see [-1, 1].

    from vqvae.tokenizer import load_tokenizer_from

    tok = load_tokenizer_from("runs/vq")                                  # our stage-1 run folder
    tok = load_tokenizer_from("path/to/diffusers_vqmodel")                # a diffusers VQModel folder
    tok = load_tokenizer_from("vq_ds16_c2i.pt")                           # a LlamaGen VQ checkpoint
    tok = load_tokenizer_from("FoundationVision/LlamaGen")                # Hub: vq_ds16_c2i.pt
    tok = load_tokenizer_from("owner/name", subfolder="vqvae", revision="<commit>")
    codes = tok.encode(images)            # (b, h, w) int64 in [0, tok.codebook_size)
    images = tok.decode(codes)            # (b, 3, h*f, w*f) float in [-1, 1]
    json.dumps(tok.source)                # where the weights came from, with their sha256

A tokenizer is deliberately not an `nn.Module`: assigning it to a stage-2 model must not add its weights to
that model's state dict or optimizer. The wrapped module is `tok.model`. See docs/tokenizers.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "KINDS",
    "OwnTokenizer",
    "Tokenizer",
    "TokenizerSourceError",
    "load_tokenizer_from",
    "sha256_of",
    "tokenizer_from_source",
]

KINDS = ("own", "diffusers", "llamagen")
CONFIG_NAME = "config.json"
OWN_WEIGHTS_NAME = "model.safetensors"          # the weights file of our stage-1 run folders
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".sft")
# Hub repositories that hold several checkpoints, and the tokenizer to take when no `filename` is given.
DEFAULT_HUB_FILES = {"FoundationVision/LlamaGen": "vq_ds16_c2i.pt"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class TokenizerSourceError(ValueError):
    """A tokenizer source that cannot be used: missing, of the wrong kind, not cached offline, or mismatched."""


def sha256_of(path) -> str:
    """Hex sha256 of a file's bytes (the same digest `sha256sum` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer(ABC):
    """Images (b, 3, H, W) in [-1, 1] <-> codes (b, H/f, W/f) int64 in [0, codebook_size).

    Subclasses set `model`, `codebook_size`, `downsample` and `source`, and implement `_encode` / `_decode` in
    the wrapped model's own terms; this base class checks shapes, dtypes and devices, runs without gradients,
    and clamps decoded images to [-1, 1].
    """

    kind: str = "?"
    model: nn.Module
    codebook_size: int
    downsample: int
    source: dict

    # ---- the interface

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) float in [-1, 1] -> codes (b, H/f, W/f) int64, on the tokenizer's device."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"encode expects images of shape (b, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"encode expects float images in [-1, 1], got dtype {images.dtype}")
        height, width = images.shape[-2:]
        grid = (self._side(height, "height"), self._side(width, "width"))
        param = next(self.model.parameters())
        codes = self._encode(images.to(device=param.device, dtype=param.dtype))
        if tuple(codes.shape) != (images.shape[0], *grid):  # a wrapped model that disagrees with `downsample`
            raise RuntimeError(f"{self.kind} tokenizer returned codes of shape {tuple(codes.shape)}, "
                               f"expected {(images.shape[0], *grid)}")
        return codes.long()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (b, h, w) integer -> images (b, 3, h*f, w*f) float32 in [-1, 1], on the tokenizer's device."""
        if not torch.is_tensor(codes) or codes.ndim != 3:
            shape = tuple(codes.shape) if torch.is_tensor(codes) else type(codes).__name__
            raise ValueError(f"decode expects codes of shape (b, h, w), got {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"decode expects integer codes, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        images = self._decode(codes.to(self.device, torch.long))
        return images.float().clamp(-1.0, 1.0)

    def grid_for(self, image_size: int) -> tuple[int, int]:
        """The code grid (h, w) of square `image_size` images; ValueError if f does not divide the size."""
        side = self._side(image_size, "image size")
        return side, side

    def eval(self) -> Tokenizer:
        self.model.eval()
        return self

    def to(self, device) -> Tokenizer:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(codebook_size={self.codebook_size}, downsample={self.downsample}, "
                f"source={self.source!r})")

    # ---- for subclasses

    @abstractmethod
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (b, 3, H, W) in [-1, 1], on the model's device and dtype -> codes (b, H/f, W/f)."""

    @abstractmethod
    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (b, h, w) int64 on the model's device -> images (b, 3, h*f, w*f), nominally in [-1, 1]."""

    def _side(self, size, what: str) -> int:
        f = self.downsample
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{what} must be a positive int, got {size!r}")
        if size % f:
            below, above = size // f * f, (size // f + 1) * f
            valid = f"{below} or {above}" if below else f"{above}"
            raise ValueError(f"{what} {size} cannot be tiled by the {f}x downsampling of this {self.kind} tokenizer: "
                             f"use a multiple of {f}, e.g. {valid}")
        return size // f


class OwnTokenizer(Tokenizer):
    """Our stage-1 `vqvae.VQVAE`, loaded from its run folder with `vqvae.load_tokenizer`."""

    kind = "own"

    def __init__(self, model: nn.Module, source: dict | None = None):
        self.model = model.eval()
        self.codebook_size = int(model.codebook_size)
        self.downsample = int(model.cfg.downsample)
        self.source = source if source is not None else {"kind": self.kind}

    @classmethod
    def from_run(cls, run_dir, *, device="cpu", source: dict | None = None) -> OwnTokenizer:
        """Load the tokenizer of a stage-1 run folder (config.json with "stage": "vqvae", model.safetensors)."""
        from . import load_tokenizer

        run_dir = Path(run_dir)
        _check_config(_read_config(run_dir / CONFIG_NAME), run_dir, expect="own")
        try:
            model = load_tokenizer(run_dir, device=device)
        except (RuntimeError, OSError, ValueError) as err:  # RunFolderError is a RuntimeError
            raise TokenizerSourceError(f"cannot load our stage-1 tokenizer from {run_dir}: {err}") from err
        weights = run_dir / OWN_WEIGHTS_NAME
        if source is None:
            source = {"kind": cls.kind, "location": "local", "path": str(run_dir.resolve())}
        source = {**source, "kind": cls.kind, "weights_sha256": {OWN_WEIGHTS_NAME: sha256_of(weights)}}
        return cls(model, source)

    def _encode(self, images):
        return self.model.encode(images)

    def _decode(self, codes):
        return self.model.decode(codes)


# ----------------------------------------------------------------------------------------------
# Finding the tokenizer a source names


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerSourceError(f"{path} cannot be read as JSON ({err})") from err
    if not isinstance(config, dict):
        raise TokenizerSourceError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def _check_config(config: dict, where, expect: str | None = None) -> str | None:
    """The adapter kind a config.json stands for ("own" / "diffusers"), None if unrecognised.

    Raises TokenizerSourceError for configs we recognise as something that is not a VQ tokenizer, or (with
    `expect`) as another kind than expected."""
    kind = None
    if "stage" in config:
        stage = config["stage"]
        if stage == "maskgit":
            raise TokenizerSourceError(
                f"{where} is a stage-2 (MaskGIT transformer) run, not a tokenizer: pass the stage-1 tokenizer it was "
                "trained on (a run folder whose config.json has \"stage\": \"vqvae\"), or a published VQ model")
        if stage != "vqvae":
            raise TokenizerSourceError(f"{where} is a {stage!r} run of this toolkit; a tokenizer is a 'vqvae' run")
        kind = "own"
    elif "_class_name" in config:
        name = config["_class_name"]
        if name != "VQModel":
            what = ("a continuous-latent VAE with no codebook, so it yields no discrete codes"
                    if str(name).startswith("AutoencoderKL") else "not a vector-quantized autoencoder")
            raise TokenizerSourceError(
                f"{where} holds a diffusers {name!r} ({what}); only diffusers 'VQModel' tokenizers are supported")
        kind = "diffusers"
    if expect is not None and kind != expect:
        found = {"own": "one of our stage-1 runs", "diffusers": "a diffusers VQModel"}.get(kind, "unrecognised")
        raise TokenizerSourceError(f"{where} was loaded as kind={expect!r}, but its config.json is {found}")
    return kind


def _is_llamagen_safetensors(path: Path) -> bool:
    """Whether a safetensors file has LlamaGen VQ keys (reads the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
    except Exception:  # noqa: BLE001 - not a readable safetensors file: then it is not LlamaGen either
        return False
    return {"quantize.embedding.weight", "encoder.conv_in.weight", "quant_conv.weight"} <= keys


class _LocalFolder:
    """Files of a local folder, by name."""

    def __init__(self, root: Path):
        self.root = root
        self.names = sorted(p.name for p in root.iterdir() if p.is_file())
        self.label = str(root)

    def get(self, name: str) -> Path:
        return self.root / name

    def describe(self) -> dict:
        return {"location": "local", "path": str(self.root.resolve())}


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _hub_errors():
    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub < 0.23 kept them in utils
        from huggingface_hub import utils as errors
    return errors


class _HubRepo:
    """Files of a Hugging Face Hub repository (at `revision`, under `subfolder`), from the Hub or its cache.

    Offline (HF_HUB_OFFLINE=1), or when the Hub cannot be reached, the listing and the files come from the
    local cache (HF_HUB_CACHE / HF_HOME) only; nothing is downloaded until a file is asked for."""

    def __init__(self, repo_id: str, revision: str | None, subfolder: str | None):
        self.repo_id, self.revision = repo_id, revision
        self.subfolder = subfolder.strip("/") if subfolder else None
        self.label = f"Hub repo {repo_id!r}" + (f" (subfolder {self.subfolder!r})" if self.subfolder else "") + \
            (f" at revision {revision!r}" if revision else "")
        self.commit = None
        try:
            import huggingface_hub  # noqa: F401
        except ImportError as err:
            raise TokenizerSourceError(f"{repo_id!r} is not a local path, and loading from the Hugging Face Hub "
                                       "needs huggingface_hub: pip install huggingface_hub") from err
        self.local_only = _hub_offline()
        files = self._list_files()
        prefix = f"{self.subfolder}/" if self.subfolder else ""
        below = [f[len(prefix):] for f in files if f.startswith(prefix)]
        self.names = sorted(n for n in below if "/" not in n)
        # folders holding a config.json, to suggest a `subfolder` when the top level has no tokenizer
        self.config_folders = sorted(n.rsplit("/", 1)[0] for n in below if n.endswith("/" + CONFIG_NAME))

    def _list_files(self) -> list[str]:
        errors = _hub_errors()
        reason = "HF_HUB_OFFLINE is set, so nothing may be downloaded"
        if not self.local_only:
            from huggingface_hub import HfApi

            try:
                return list(HfApi().list_repo_files(self.repo_id, revision=self.revision))
            except errors.RevisionNotFoundError as err:
                raise TokenizerSourceError(f"{self.label}: revision {self.revision!r} does not exist") from err
            except errors.RepositoryNotFoundError as err:  # also gated / private without a token
                raise TokenizerSourceError(
                    f"{self.repo_id!r} is neither a local file or folder nor a Hub repository you can access "
                    "(check the spelling; private or gated repos need `hf auth login`)") from err
            except Exception as err:  # noqa: BLE001 - network down, Hub error: fall back to the cache
                reason = f"the Hub could not be reached ({type(err).__name__}: {err})"
                self.local_only = True
        from huggingface_hub import constants, snapshot_download

        try:
            folder = Path(snapshot_download(self.repo_id, revision=self.revision, local_files_only=True))
        except (errors.LocalEntryNotFoundError, FileNotFoundError, OSError) as err:
            raise TokenizerSourceError(
                f"{self.label} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}: run once "
                "with network access (HF_HUB_OFFLINE unset) to download it, point HF_HUB_CACHE / HF_HOME at a cache "
                "that has it, or pass a local folder or file") from err
        self.commit = folder.name
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())

    def get(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download

        errors = _hub_errors()
        try:
            path = Path(hf_hub_download(self.repo_id, name, subfolder=self.subfolder, revision=self.revision,
                                        local_files_only=self.local_only))
        except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as err:
            raise TokenizerSourceError(f"{self.label}: {name} is not in the Hugging Face cache and HF_HUB_OFFLINE "
                                       "is set (or the Hub is unreachable)") from err
        except errors.EntryNotFoundError as err:
            raise TokenizerSourceError(f"{self.label} has no file {name!r}") from err
        parts = path.parts
        if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
            self.commit = parts[parts.index("snapshots") + 1]
        return path

    def describe(self) -> dict:
        return {"location": "hub", "repo_id": self.repo_id, "revision": self.revision, "subfolder": self.subfolder,
                "commit": self.commit}


def _pick_kind(place, *, kind: str | None, filename: str | None) -> tuple[str, str | None]:
    """(adapter kind, LlamaGen checkpoint file name or None) for a folder or Hub repo."""
    if kind == "llamagen" or filename is not None:
        if kind not in (None, "llamagen"):
            raise TokenizerSourceError(f"filename={filename!r} names a LlamaGen checkpoint, but kind={kind!r}")
        return "llamagen", filename or _pick_checkpoint(place)
    config = _read_config(place.get(CONFIG_NAME)) if CONFIG_NAME in place.names else None
    found = _check_config(config, place.label) if config is not None else None
    if kind is not None:
        if found is not None and found != kind:
            raise TokenizerSourceError(f"{place.label} was asked for as kind={kind!r} but its config.json is of "
                                       f"kind {found!r}")
        return kind, None
    if found is not None:
        return found, None
    # no config.json we know: a LlamaGen checkpoint?
    if "model.safetensors" in place.names and isinstance(place, _LocalFolder) and \
            _is_llamagen_safetensors(place.get("model.safetensors")):
        return "llamagen", "model.safetensors"
    if any(n.endswith(CHECKPOINT_SUFFIXES[:4]) for n in place.names) or \
            (isinstance(place, _HubRepo) and place.repo_id in DEFAULT_HUB_FILES):
        return "llamagen", _pick_checkpoint(place)
    hint = ""
    if place.config_folders:
        hint = f"; config.json files lie in the subfolders {place.config_folders[:5]}: pass subfolder=..."
    elif "model.safetensors" in place.names:
        hint = "; if model.safetensors is a LlamaGen VQ export, pass kind='llamagen'"
    what = "an unrecognised config.json" if config is not None else "no config.json"
    raise TokenizerSourceError(f"{place.label} is not a tokenizer this toolkit can load: it has {what} and no "
                               f"LlamaGen .pt/.pth checkpoint (files: {place.names[:10]}){hint}")


def _pick_checkpoint(place) -> str:
    candidates = [n for n in place.names if n.endswith(CHECKPOINT_SUFFIXES)]
    default = DEFAULT_HUB_FILES.get(getattr(place, "repo_id", None))
    if default is not None and default in place.names:
        return default
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise TokenizerSourceError(f"{place.label} holds no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})")
    raise TokenizerSourceError(f"{place.label} holds several checkpoints {candidates[:10]}: pass filename=... "
                               "to say which one is the VQ tokenizer")


def load_tokenizer_from(
    source,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    kind: str | None = None,
    device="cpu",
    filename: str | None = None,
    pixel_range: tuple[float, float] | None = None,
    checkpoint_key: str | None = None,
    llamagen_config: dict | None = None,
) -> Tokenizer:
    """Load a tokenizer, in eval mode on `device`, from a local path or a Hugging Face Hub repository.

    `source` is one of:
      - a stage-1 run folder of this toolkit (config.json with "stage": "vqvae")            -> OwnTokenizer
      - a diffusers VQModel folder (config.json with "_class_name": "VQModel")              -> DiffusersVQTokenizer
      - a LlamaGen VQ checkpoint file (.pt/.pth/.ckpt/.bin, or .safetensors/.sft state dict) -> LlamaGenTokenizer
      - a Hub repo id "owner/name" whose files (at `revision`, under `subfolder`) are one of the above;
        HF_HUB_OFFLINE=1 restricts it to the local cache.
    `kind` ("own", "diffusers", "llamagen") skips detection. `filename` picks a LlamaGen checkpoint in a folder or
    repo. `pixel_range` is the range a diffusers model expects (default (-1, 1); aMUSEd's VQ takes (0, 1)).
    `checkpoint_key` picks "model" / "ema" / "state_dict" in a LlamaGen checkpoint; `llamagen_config` overrides
    architecture arguments of `vqvae.llamagen.LlamaGenVQ` that a state dict cannot tell (norm_groups,
    codebook_l2_norm). Every problem with the source raises TokenizerSourceError (a ValueError).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {KINDS} (or None to detect it)")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or a Hub repo id, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_file():
        if subfolder is not None or revision is not None:
            raise TokenizerSourceError(f"subfolder / revision apply to folders / Hub repos; {path} is a file")
        if kind not in (None, "llamagen") or not path.name.endswith(CHECKPOINT_SUFFIXES):
            raise TokenizerSourceError(
                f"{path} is a file: only LlamaGen VQ checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}) are loaded "
                "from a file; our runs and diffusers models are folders")
        kind, place, name = "llamagen", _LocalFolder(path.parent), path.name
    elif path.is_dir():
        if revision is not None:
            raise TokenizerSourceError(f"revision={revision!r} applies to Hub repos; {path} is a local folder")
        root = path / subfolder if subfolder else path
        if not root.is_dir():
            raise TokenizerSourceError(f"{root} is not a folder")
        place = _LocalFolder(root)
        kind, name = _pick_kind(place, kind=kind, filename=filename)
    elif _HUB_ID.match(str(source)) and not str(source).startswith((".", "~", os.sep)):
        place = _HubRepo(str(source), revision, subfolder)
        kind, name = _pick_kind(place, kind=kind, filename=filename)
    else:
        raise TokenizerSourceError(f"{source} does not exist, and it is not a Hub repo id of the form 'owner/name'")
    if pixel_range is not None and kind != "diffusers":
        raise TokenizerSourceError(f"pixel_range applies to diffusers models; {place.label} is of kind {kind!r}")
    if (checkpoint_key is not None or llamagen_config) and kind != "llamagen":
        raise TokenizerSourceError(f"checkpoint_key / llamagen_config apply to LlamaGen checkpoints; "
                                   f"{place.label} is of kind {kind!r}")

    if kind == "own":
        place.get(CONFIG_NAME)
        place.get(OWN_WEIGHTS_NAME)
        return OwnTokenizer.from_run(place.get(CONFIG_NAME).parent, device=device, source=place.describe())
    if kind == "diffusers":
        from .diffusers_vq import DiffusersVQTokenizer

        return DiffusersVQTokenizer.from_files(place, device=device, pixel_range=pixel_range)
    from .llamagen import LlamaGenTokenizer

    checkpoint = place.get(name)
    if not checkpoint.is_file():
        raise TokenizerSourceError(f"{place.label} has no file {name!r}")
    return LlamaGenTokenizer.from_checkpoint(checkpoint, device=device, checkpoint_key=checkpoint_key,
                                             config=llamagen_config,
                                             source={**place.describe(), "filename": name})


def tokenizer_from_source(source: dict, *, device="cpu") -> Tokenizer:
    """Load again the tokenizer a `Tokenizer.source` record describes (as a stage-2 run stores it), pinned to the
    Hub commit it was first loaded at, and check that its weights are byte for byte the same (sha256)."""
    if not isinstance(source, dict) or "kind" not in source:
        raise TokenizerSourceError(f"not a tokenizer source record: {source!r}")
    kind = source["kind"]
    hub = source.get("location") == "hub"
    where = source.get("repo_id") if hub else source.get("path")
    if not where:
        raise TokenizerSourceError(f"the tokenizer record names no path or repo: {source!r}")
    options = {"kind": kind, "device": device, "filename": source.get("filename")}
    if hub:
        options |= {"subfolder": source.get("subfolder"), "revision": source.get("commit") or source.get("revision")}
    if kind == "diffusers" and source.get("pixel_range"):
        options["pixel_range"] = tuple(source["pixel_range"])
    if kind == "llamagen":
        options |= {"checkpoint_key": source.get("checkpoint_key"), "llamagen_config": source.get("config")}
    tokenizer = load_tokenizer_from(where, **options)
    if source.get("weights_sha256") and tokenizer.source.get("weights_sha256") != source["weights_sha256"]:
        raise TokenizerSourceError(f"the tokenizer at {where} is not the one recorded: its weights changed "
                                   f"(recorded sha256 {source['weights_sha256']}, now "
                                   f"{tokenizer.source.get('weights_sha256')})")
    return tokenizer
