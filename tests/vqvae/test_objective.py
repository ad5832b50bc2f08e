"""Stage 1's VQGAN objective (vqvae/objective.py) and its new metrics: what each update may touch, when D runs,
the adaptive weight on the real model, LPIPS plumbing with local random weights, SSIM's closed form."""

import dataclasses

import pytest
import torch
import torchvision

from vqvae.config import VQConfig, VQTrainConfig
from vqvae.metrics import rfid, ssim
from vqvae.model import VQVAE
from vqvae.objective import (Discriminator, frozen, generator_losses, load_perceptual, perceptual_if_present,
                             perceptual_paths)
from vqvae.perceptual import HEADS_FILENAME, VGG16_FILENAME, PerceptualWeightsError

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = VQConfig(image_size=16, channels=8, max_channels=16, norm_groups=4, num_res_blocks=1, latent_dim=4,
                 codebook_size=32, kmeans_iters=2)
GAN = VQTrainConfig(disc_weight=0.5, disc_start=3, disc_channels=8, disc_layers=2, lecam_weight=0.01, r1_weight=1.0)


def setup(cfg=GAN, seed=0):
    torch.manual_seed(seed)
    model, disc = VQVAE(MODEL, sync_codebook=False), Discriminator(cfg)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return model, disc, images


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_discriminator_is_idle_before_its_start_step():
    model, disc, images = setup()
    before = generator_losses(model(images), images, GAN, step=2, perceptual=None, discriminator=disc,
                              last_layer=model.last_layer)
    assert before.gan.item() == 0 and before.gan_weight.item() == 0
    torch.testing.assert_close(before.total, before.recon + before.quant)
    after = generator_losses(model(images), images, GAN, step=3, perceptual=None, discriminator=disc,
                             last_layer=model.last_layer)
    assert after.gan.item() != 0 and after.gan_weight.item() > 0


def test_generator_update_leaves_the_discriminator_unchanged():
    model, disc, images = setup()
    d_before = snapshot(disc)
    losses = generator_losses(model(images), images, GAN, step=5, perceptual=None, discriminator=disc,
                              last_layer=model.last_layer)
    losses.total.backward()
    assert all(p.grad is None for p in disc.parameters()), "the generator's backward reached D"
    assert all(p.requires_grad for p in disc.parameters()), "frozen() must restore D's flags"
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert all(torch.equal(d_before[k], v) for k, v in disc.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_discriminator_update_leaves_the_tokenizer_unchanged():
    model, disc, images = setup()
    recon = model(images).recon  # a training forward moves the EMA codebook itself: snapshot after it
    m_before = snapshot(model)
    losses = disc(images, recon)
    losses.total.backward()
    assert all(p.grad is None for p in model.parameters()), "D's backward reached the tokenizer"
    torch.optim.AdamW(disc.parameters(), lr=1e-2).step()
    assert all(torch.equal(m_before[k], v) for k, v in model.state_dict().items())
    assert losses.r1.item() > 0 and losses.lecam.item() >= 0
    torch.testing.assert_close(losses.total, losses.gan + GAN.lecam_weight * losses.lecam + GAN.r1_weight * losses.r1)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_decoders_last_layer():
    model, disc, images = setup()
    model(images)  # k-means seeds the codebook; in eval mode it then stays put, so two forwards agree
    model.eval()
    out = model(images)
    losses = generator_losses(out, images, GAN, step=5, perceptual=None, discriminator=disc,
                              last_layer=model.last_layer)
    # by hand: the two gradients at the last conv's weight, on a fresh forward of the same model and batch
    out2 = model(images)
    nll = out2.losses.recon
    with frozen(disc):
        g = -disc.logits(out2.recon).mean()  # hinge generator loss
    (g_nll,) = torch.autograd.grad(nll, model.last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(g, model.last_layer)
    expected = g_nll.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(losses.gan_weight, expected)
    torch.testing.assert_close(losses.total, losses.recon + losses.quant + 0.5 * expected * losses.gan)
    fixed = dataclasses.replace(GAN, disc_adaptive=False)
    assert generator_losses(model(images), images, fixed, step=5, perceptual=None, discriminator=disc,
                            last_layer=model.last_layer).gan_weight.item() == 1.0


@pytest.fixture(scope="module")
def random_lpips_folder(tmp_path_factory):
    """A --perceptual-weights folder with a random torchvision VGG16 and random LPIPS heads (no download)."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), folder / VGG16_FILENAME)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(heads, folder / HEADS_FILENAME)
    return folder


def test_perceptual_weights_from_a_local_folder(random_lpips_folder):
    assert perceptual_paths(str(random_lpips_folder)) == (random_lpips_folder / VGG16_FILENAME,
                                                          random_lpips_folder / HEADS_FILENAME)
    lpips = load_perceptual(str(random_lpips_folder))
    model, _, images = setup()
    cfg = dataclasses.replace(GAN, perceptual_weight=2.0, disc_weight=0.0)
    losses = generator_losses(model(images), images, cfg, step=0, perceptual=lpips, discriminator=None,
                              last_layer=model.last_layer)
    assert losses.perceptual.item() > 0
    torch.testing.assert_close(losses.total, losses.recon + losses.quant + 2.0 * losses.perceptual)
    assert lpips(images, images).item() == 0
    assert perceptual_if_present(str(random_lpips_folder)) is not None


def test_missing_perceptual_weights_are_a_clear_error_and_eval_skips_them(tmp_path, monkeypatch):
    with pytest.raises(PerceptualWeightsError, match="not found"):
        load_perceptual(str(tmp_path / "nowhere.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    assert perceptual_if_present(None) is None  # never downloads for evaluation


def test_ssim_of_flat_images_matches_the_closed_form():
    # uniform images a and b (on [0, 1]): every window has zero variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.01, 0.02, 0.01**2  # dark enough that C1 matters: 0.833 with it, 0.8 without
    x, y = torch.full((2, 3, 32, 32), a * 2 - 1), torch.full((2, 3, 32, 32), b * 2 - 1)
    assert ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-3)
    noisy = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ssim(noisy, noisy) == pytest.approx(1.0, abs=1e-5)


def test_rfid_is_skipped_without_cached_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    x = torch.zeros(4, 3, 16, 16)
    assert rfid(x, x) is None
