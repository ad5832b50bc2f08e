"""Stage 2: a bidirectional transformer trained as a masked token model over VQ code grids (MaskGIT)."""

from core.runs import Run, RunFolderError, load_weights
from vqvae import load_tokenizer

from .config import MASKGIT_PRESETS, MaskGITConfig, MaskGITTrainConfig
from .model import Losses, MaskGIT, build_maskgit
from .sampler import SamplerConfig, sample

__all__ = ["MASKGIT_PRESETS", "MaskGITConfig", "MaskGITTrainConfig", "Losses", "MaskGIT", "build_maskgit",
           "SamplerConfig", "sample", "STAGE", "load_maskgit"]

STAGE = "maskgit"  # the stage name in a run folder's config.json


def load_maskgit(run_dir, device="cpu", ema: bool = True):
    """(model, tokenizer, run) from a stage-2 run folder alone, both in eval mode.

    The tokenizer comes from the stage-1 folder the run recorded. `ema=False` loads the raw weights."""
    run = Run.open(run_dir, STAGE)
    vq_run = run.tokenizer_path
    if not vq_run.is_dir():
        raise RunFolderError(f"{run.path} was trained on the tokenizer in {vq_run}, which no longer exists: "
                             f"restore it there, or edit data.vq_run in {run.path / 'config.json'}")
    tokenizer = load_tokenizer(vq_run, device=device)
    if (tokenizer.codebook_size, tokenizer.grid_size) != (run.codebook_size, run.grid):
        raise RunFolderError(f"the tokenizer in {vq_run} (codebook {tokenizer.codebook_size}, grid "
                             f"{tokenizer.grid_size}) is not the one {run.path} was trained on")
    model = build_maskgit(run.model_config(MaskGITConfig), codebook_size=run.codebook_size, grid=run.grid,
                          num_classes=run.num_classes)
    load_weights(model, run.weights_path(ema=ema and run.has_ema))
    return model.to(device).eval(), tokenizer, run
