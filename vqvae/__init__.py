"""Stage 1: a VQ-VAE that turns images into fixed-size grids of integer codes and back."""

from core.runs import Run, load_weights

from .config import VQ_PRESETS, VQConfig, VQTrainConfig
from .model import VQVAE, VQLosses, VQOutput

__all__ = ["VQ_PRESETS", "VQConfig", "VQTrainConfig", "VQVAE", "VQLosses", "VQOutput", "STAGE", "load_tokenizer"]

STAGE = "vqvae"  # the stage name in a run folder's config.json


def load_tokenizer(run_dir, device="cpu") -> VQVAE:
    """Rebuild a trained tokenizer, in eval mode, from its stage-1 run folder alone."""
    run = Run.open(run_dir, STAGE)
    model = VQVAE(run.model_config(VQConfig), sync_codebook=False)
    load_weights(model, run.weights_path())
    return model.to(device).eval()
