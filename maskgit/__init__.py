"""Stage 2: a bidirectional transformer trained as a masked token model over VQ code grids (MaskGIT)."""

from pathlib import Path

from .config import MASKGIT_PRESETS, MaskGITConfig, MaskGITTrainConfig
from .model import Losses, MaskGIT, build_maskgit
from .sampler import SamplerConfig, sample

__all__ = ["MASKGIT_PRESETS", "MaskGITConfig", "MaskGITTrainConfig", "Losses", "MaskGIT", "build_maskgit",
           "SamplerConfig", "sample", "load_maskgit"]


def load_maskgit(run_dir, device="cpu", ema: bool = True):
    """(model, tokenizer, config) from a stage-2 run folder alone, both in eval mode.

    The tokenizer comes from the stage-1 folder the run recorded. `ema=False` loads the raw weights."""
    from vqvae import load_tokenizer
    from vqvae.training import RunFolderError, config_from_dict, load_weights, read_run_config

    run_dir = Path(run_dir)
    config = read_run_config(run_dir, "maskgit")
    vq_run = Path(config["data"]["vq_run"])
    if not vq_run.is_dir():
        raise RunFolderError(f"{run_dir} was trained on the tokenizer in {vq_run}, which no longer exists: "
                             f"restore it there, or edit data.vq_run in {run_dir / 'config.json'}")
    tokenizer = load_tokenizer(vq_run, device=device)
    if [tokenizer.codebook_size, *tokenizer.grid_size] != [config["codebook_size"], *config["grid"]]:
        raise RunFolderError(f"the tokenizer in {vq_run} (codebook {tokenizer.codebook_size}, grid "
                             f"{tokenizer.grid_size}) is not the one {run_dir} was trained on")
    model = build_maskgit(config_from_dict(MaskGITConfig, config["model"]), codebook_size=config["codebook_size"],
                          grid=tuple(config["grid"]), num_classes=config["num_classes"])
    weights = "ema.safetensors" if ema and config.get("ema", False) else "model.safetensors"
    load_weights(model, run_dir / weights)
    return model.to(device).eval(), tokenizer, config
