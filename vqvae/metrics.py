"""Tokenizer quality measures: reconstruction PSNR and codebook usage."""

import torch
from einops import reduce


@torch.no_grad()
def psnr(x, y, max_db: float = 100.0):
    """Mean over images of the PSNR in dB of (b, c, H, W) images in [-1, 1], measured on the [0, 1] scale.

    Both inputs are clamped to [-1, 1] first (what would be saved as pixels); identical images give `max_db`.
    """
    x, y = (t.float().clamp(-1, 1) * 0.5 + 0.5 for t in (x, y))
    mse = reduce((x - y) ** 2, "b ... -> b", "mean")  # per image, so one bad image cannot hide in the batch
    return (-10 * torch.log10(mse)).clamp(max=max_db).mean().item()


@torch.no_grad()
def codebook_stats(codes, codebook_size: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity = exp(entropy of the code histogram)) over all `codes`.

    Codes outside [0, codebook_size) are left out: FSQ turns non-finite latents (a diverged run) into such
    indices, and the evaluation that reports the divergence must not crash on them. None valid: (0, nan).
    """
    codes = codes.flatten().long()
    codes = codes[(codes >= 0) & (codes < codebook_size)]
    if codes.numel() == 0:
        return 0.0, float("nan")
    counts = torch.bincount(codes, minlength=codebook_size).double()
    usage = (counts > 0).sum().item() / codebook_size
    probs = counts / counts.sum()
    entropy = -(probs * probs.clamp(min=1e-30).log()).sum()  # 0 * log 0 counts as 0
    return usage, entropy.exp().item()
