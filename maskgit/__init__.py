"""Stage 2: a bidirectional transformer trained as a masked token model over VQ code grids (MaskGIT)."""

from core.runs import Run, RunFolderError, load_weights
from vqvae.tokenizer import OwnTokenizer, Tokenizer, TokenizerSourceError, tokenizer_from_source

from .config import MASKGIT_PRESETS, MaskGITConfig, MaskGITTrainConfig
from .model import Losses, MaskGIT, build_maskgit
from .sampler import SamplerConfig, sample

__all__ = ["MASKGIT_PRESETS", "MaskGITConfig", "MaskGITTrainConfig", "Losses", "MaskGIT", "build_maskgit",
           "SamplerConfig", "sample", "STAGE", "load_maskgit", "open_tokenizer"]

STAGE = "maskgit"  # the stage name in a run folder's config.json


def open_tokenizer(run: Run, device="cpu") -> Tokenizer:
    """The tokenizer a stage-2 run was trained on: its stage-1 run folder (`data.vq_run`), or a published
    tokenizer recorded by its source (`data.tokenizer`: path or Hub repo at a pinned commit, weights' sha256)."""
    if "tokenizer" in run.data:
        try:
            return tokenizer_from_source(run.data["tokenizer"], device=device)
        except TokenizerSourceError as err:
            raise RunFolderError(f"{run.path} was trained on a tokenizer that cannot be loaded: {err}") from err
    vq_run = run.tokenizer_path
    if not vq_run.is_dir():
        raise RunFolderError(f"{run.path} was trained on the tokenizer in {vq_run}, which no longer exists: "
                             f"restore it there, or edit data.vq_run in {run.path / 'config.json'}")
    return OwnTokenizer.from_run(vq_run, device=device)


def load_maskgit(run_dir, device="cpu", ema: bool = True):
    """(model, tokenizer, run) from a stage-2 run folder alone, both in eval mode.

    The tokenizer is the one the run recorded (`open_tokenizer`). `ema=False` loads the raw weights."""
    run = Run.open(run_dir, STAGE)
    tokenizer = open_tokenizer(run, device)
    grid = tokenizer.grid_for(run.image_size)
    if (tokenizer.codebook_size, grid) != (run.codebook_size, run.grid):
        raise RunFolderError(f"the tokenizer {tokenizer.source.get('path') or tokenizer.source.get('repo_id')} "
                             f"(codebook {tokenizer.codebook_size}, grid {grid}) is not the one {run.path} was "
                             "trained on")
    model = build_maskgit(run.model_config(MaskGITConfig), codebook_size=run.codebook_size, grid=run.grid,
                          num_classes=run.num_classes)
    load_weights(model, run.weights_path(ema=ema and run.has_ema))
    return model.to(device).eval(), tokenizer, run
