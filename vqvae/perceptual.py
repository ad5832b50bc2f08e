"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, as a frozen loss module.

Same computation as the `lpips` package's `LPIPS(net="vgg", version="0.1")` (see docs/gan_losses.md):
  1. scale inputs in [-1, 1]: (x - shift) / scale, shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450)
  2. VGG16 `features` up to relu5_3; taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
     (torchvision `features` indices 3, 8, 15, 22, 29; 64, 128, 256, 512, 512 channels)
  3. per tap: unit-normalise each position's feature vector over channels (eps 1e-10), squared difference,
     1x1 conv head (no bias, 1 output channel), spatial mean
  4. sum over the 5 taps -> one distance per image

Weights, loaded only with `torch.load(..., weights_only=True)` (plain tensors, nothing else unpickled):
  * VGG16: a torchvision state dict (`vgg16-397923af.pth`, or only its `features.*` entries), from a local file
    or through torch hub's cache / download (`torchvision.models.VGG16_Weights.IMAGENET1K_V1`).
  * the five linear heads: a local file or the file bundled with the `lpips` pip package,
    `lpips/weights/v0.1/vgg.pth` (keys `lin0.model.1.weight` .. `lin4.model.1.weight`).
Missing weights raise `PerceptualWeightsError` saying what to download and where to put it.
"""

import importlib.util
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["LPIPS", "PerceptualWeightsError", "bundled_heads_path", "CLI_OPTION", "VGG16_FILENAME",
           "HEADS_FILENAME"]

CLI_OPTION = "--perceptual-weights"  # the command-line option that will take a local VGG16 file
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # = VGG16_Weights.IMAGENET1K_V1.url
VGG16_FILENAME = "vgg16-397923af.pth"
HEADS_FILENAME = "vgg.pth"  # inside the lpips package: lpips/weights/v0.1/vgg.pth

# VGG16 configuration "D": conv widths, "M" = 2x2 max pool. Module indices match torchvision's `features`.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_HEAD_KEY = re.compile(r"^(?:lin|lins\.|heads\.)([0-4])\.(?:model\.\d+\.)?weight$")


class PerceptualWeightsError(RuntimeError):
    """LPIPS weights missing, unreadable or of the wrong shape; the message says what to get and where."""


def bundled_heads_path() -> Path | None:
    """Path of the VGG heads file shipped with the `lpips` pip package, or None when it is not installed.

    Located without importing `lpips` (no side effects)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "weights" / "v0.1" / HEADS_FILENAME
        if path.is_file():
            return path
    return None


def _load_tensors(path, what: str) -> dict[str, torch.Tensor]:
    """torch.load(path, weights_only=True) of a flat {name: tensor} mapping, errors as PerceptualWeightsError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PerceptualWeightsError(f"{what}: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        raise PerceptualWeightsError(f"{what}: cannot read {path} as a plain tensor state dict "
                                     f"(torch.load weights_only=True): {err}") from err
    return _check_mapping(obj, f"{what} ({path})")


def _check_mapping(obj, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PerceptualWeightsError(f"{what}: expected a state dict {{name: tensor}}, got {type(obj).__name__}")
    return dict(obj)


def _vgg_download_help() -> str:
    from torchvision.models import VGG16_Weights

    url = VGG16_Weights.IMAGENET1K_V1.url  # VGG16_URL in the torchvision versions we know
    filename = url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return (f"Download {url} (torchvision's VGG16_Weights.IMAGENET1K_V1, file {filename}, 528 MB) "
            f"on a machine with internet access and either put it at {cached} (torch hub's cache: "
            f"torch.hub.get_dir()/checkpoints, set by $TORCH_HOME) or pass its path with {CLI_OPTION} "
            f"(LPIPS.from_files(vgg_path=...)).")


def _download_vgg16(progress: bool) -> dict[str, torch.Tensor]:
    from torchvision.models import VGG16_Weights

    try:
        obj = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=progress, check_hash=True, weights_only=True,
                                                         map_location="cpu")
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as err:  # URLError is an OSError
        raise PerceptualWeightsError(f"LPIPS: cannot get the VGG16 ImageNet weights ({type(err).__name__}: "
                                     f"{err}). {_vgg_download_help()}") from err
    return _check_mapping(obj, "VGG16 weights")


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 trunk, frozen: images (b, 3, H, W) in [-1, 1], H, W >= 16.

    `LPIPS()` builds the architecture with random weights; use `LPIPS.from_files(...)` for the real metric.
    All parameters have requires_grad=False and the module always stays in eval mode (`train()` is a no-op),
    so it can sit inside a model that is switched to training. Gradients do flow to the *inputs*, which is what
    a perceptual loss needs.

    forward(input, target, reduction="mean"): "none" -> per-image distances (b,); "mean" -> their mean (0-dim);
    "sum" -> their sum. Identical images give 0. The distance is symmetric.
    State dict: `features.{i}.weight/bias` (torchvision VGG16 names) and `heads.{k}.weight` (k = 0..4).
    """

    MIN_SIZE = 16  # relu5_3 comes after 4 max pools: 16 px -> 1x1, smaller -> empty

    def __init__(self):
        super().__init__()
        layers, width = [], 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(width, v, 3, padding=1), nn.ReLU(inplace=True)]
                width = v
        self.features = nn.Sequential(*layers)  # torchvision's vgg16().features[:30]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        """Stays in eval mode whatever `mode` is (frozen metric)."""
        return super().train(False)

    @classmethod
    def from_files(cls, vgg_path=None, heads_path=None, *, progress: bool = False) -> "LPIPS":
        """LPIPS with real weights.

        vgg_path: a torchvision VGG16 state dict file (e.g. `vgg16-397923af.pth`; only `features.*` is used, so a
            features-only dict works too). None: torchvision's VGG16_Weights.IMAGENET1K_V1 through torch hub
            (cached in torch.hub.get_dir()/checkpoints, downloaded if absent; `progress` shows a bar).
        heads_path: a file with the 5 linear heads, in the `lpips` package's layout (`lin{k}.model.1.weight`) or
            this module's (`heads.{k}.weight`). None: the file bundled with `pip install lpips`.
        Raises PerceptualWeightsError when a file is missing, unreadable, or does not fit, or the download fails.
        """
        model = cls()
        if vgg_path is None:
            vgg = _download_vgg16(progress)
            source = f"torch hub's {VGG16_FILENAME}"
        else:
            vgg = _load_tensors(vgg_path, "VGG16 weights")
            source = str(vgg_path)
        model.load_vgg(vgg, source)

        if heads_path is None:
            heads_path = bundled_heads_path()
            if heads_path is None:
                raise PerceptualWeightsError(
                    f"LPIPS linear heads not found: pass heads_path, or `pip install lpips`, whose package ships "
                    f"them as lpips/weights/v0.1/{HEADS_FILENAME} (7 kB; used when heads_path is None)")
        model.load_heads(_load_tensors(heads_path, "LPIPS heads"), str(heads_path))
        return model

    def load_vgg(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy the VGG16 conv weights from a torchvision VGG16 state dict (`features.*` keys; others ignored)."""
        feats = {}
        for key, value in state_dict.items():
            index = key.split(".")[1] if key.startswith("features.") else ""
            if index.isdigit() and int(index) < len(self.features):  # keeps features.0-29; classifier.* is ignored
                feats[key[len("features."):]] = value
        try:
            self.features.load_state_dict(feats, strict=True)
        except RuntimeError as err:
            raise PerceptualWeightsError(f"VGG16 weights from {source} do not fit torchvision's vgg16 `features` "
                                         f"layout: {err}") from err

    def load_heads(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy the five 1x1 head weights from a state dict in the lpips layout or this module's."""
        found: dict[int, torch.Tensor] = {}
        for key, value in state_dict.items():
            m = _HEAD_KEY.match(key)
            if m is None:
                continue
            k = int(m.group(1))
            if k in found and not torch.equal(found[k], value):
                raise PerceptualWeightsError(f"LPIPS heads from {source}: conflicting entries for head {k}")
            found[k] = value
        for k, c in enumerate(_CHANNELS):
            if k not in found or tuple(found[k].shape) != (1, c, 1, 1):
                got = tuple(found[k].shape) if k in found else "missing"
                raise PerceptualWeightsError(f"LPIPS heads from {source}: head {k} must have shape (1, {c}, 1, 1) "
                                             f"(key lin{k}.model.1.weight or heads.{k}.weight), got {got}")
        with torch.no_grad():
            for k, head in enumerate(self.heads):
                head.weight.copy_(found[k])

    def forward(self, input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if input.shape != target.shape or input.ndim != 4 or input.shape[1] != 3:
            raise ValueError(f"expected two (b, 3, H, W) images of the same shape, got {tuple(input.shape)} and "
                             f"{tuple(target.shape)}")
        if min(input.shape[-2:]) < self.MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {self.MIN_SIZE}x{self.MIN_SIZE} px, "
                             f"got {tuple(input.shape[-2:])}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
        b = input.shape[0]
        # one trunk pass for both images
        h = (torch.cat([input, target]) - self.shift) / self.scale
        dist = 0.0
        taps = iter(zip(_TAPS, self.heads))
        tap, head = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == tap:
                # vector_norm, not sqrt(sum(h**2)): same value, but a zero gradient (not NaN) where all channels are 0
                f = h / (torch.linalg.vector_norm(h, dim=1, keepdim=True) + 1e-10)
                dist = dist + head((f[:b] - f[b:]).pow(2)).mean(dim=(1, 2, 3))
                tap, head = next(taps, (None, None))
        if reduction == "mean":
            return dist.mean()
        if reduction == "sum":
            return dist.sum()
        return dist
