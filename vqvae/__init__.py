"""Stage 1: a VQ-VAE that turns images into fixed-size grids of integer codes and back."""

from pathlib import Path

from .config import VQ_PRESETS, VQConfig, VQTrainConfig
from .model import VQVAE, VQLosses, VQOutput

__all__ = ["VQ_PRESETS", "VQConfig", "VQTrainConfig", "VQVAE", "VQLosses", "VQOutput", "load_tokenizer"]


def load_tokenizer(run_dir, device="cpu") -> VQVAE:
    """Rebuild a trained tokenizer, in eval mode, from its stage-1 run folder alone."""
    from .training import WEIGHTS_NAME, config_from_dict, load_weights, read_run_config

    config = read_run_config(run_dir, "vqvae")
    model = VQVAE(config_from_dict(VQConfig, config["model"]), sync_codebook=False)
    load_weights(model, Path(run_dir) / WEIGHTS_NAME)
    return model.to(device).eval()
