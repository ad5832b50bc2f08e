"""Tokenizer quality measures: PSNR, SSIM, rFID, and codebook usage."""

from pathlib import Path

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


@torch.no_grad()
def ssim(x, y) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, the usual constants) of (b, 3, H, W) images in [-1, 1], on [0, 1].

    torchmetrics' implementation; see tests/vqvae/test_metrics.py for the closed-form check."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = (t.float().clamp(-1, 1) * 0.5 + 0.5 for t in (x, y))
    return structural_similarity_index_measure(x, y, data_range=1.0).item()


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads into torch hub's cache


def inception_weights_present() -> bool:
    """Whether torch-fidelity's Inception weights are in torch hub's cache (rFID never triggers a download)."""
    import torch.hub

    return (Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE).is_file()


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@torch.no_grad()
def rfid(originals, recon) -> float | None:
    """Reconstruction FID (torch-fidelity, Inception features) between two (b, 3, H, W) batches in [-1, 1];
    None when the Inception weights are not cached on this machine or torch-fidelity is not installed."""
    if not inception_weights_present():
        return None
    try:
        import torch_fidelity
    except ImportError:
        return None
    metrics = torch_fidelity.calculate_metrics(input1=_Uint8Images(recon), input2=_Uint8Images(originals), fid=True,
                                               verbose=False, cuda=torch.cuda.is_available())
    return float(metrics["frechet_inception_distance"])
