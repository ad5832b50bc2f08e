"""GAN losses, regularisers and PatchDiscriminator (vqvae/gan.py); LPIPS (vqvae/perceptual.py).

Loss values are checked against closed forms written out here; LPIPS against the `lpips` package
(skipped when it is not installed: `pip install lpips`)."""

import math
import os
import sys
import urllib.request
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from vqvae.gan import (LeCAMEMA, PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, lecam_loss,
                       nonsaturating_d_loss, nonsaturating_g_loss, r1_penalty)
from vqvae.perceptual import LPIPS, PerceptualWeightsError, bundled_heads_path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- adversarial losses -----------------------------------------------------------------------------------------

def test_hinge_losses_closed_form():
    real, fake = t(2.0, 0.5, -1.0), t(-2.0, 0.0, 0.5, 1.5)
    # relu(1 - real) = [0, 0.5, 2]  -> mean 2.5 / 3;  relu(1 + fake) = [0, 1, 1.5, 2.5] -> mean 5 / 4; halved
    expected = 0.5 * (2.5 / 3 + 5 / 4)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert hinge_d_loss(real, fake).ndim == 0
    # a confident, correct discriminator pays nothing
    assert hinge_d_loss(t(1.0, 3.0), t(-1.0, -5.0)).item() == 0.0
    # generator: -mean(fake) = -(1 - 3) / 2 = 1
    assert hinge_g_loss(t(1.0, -3.0)).item() == pytest.approx(1.0)
    # maps of any shape: (b, 1, h, w) logits, real and fake maps of different sizes
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 0.5), torch.full((2, 1, 2, 2), 0.5)).item() == pytest.approx(
        0.5 * (0.5 + 1.5))


def test_nonsaturating_losses_closed_form():
    ln3 = math.log(3.0)
    real, fake = t(0.0, ln3), t(0.0, -ln3)
    # softplus(-0) = ln 2, softplus(-ln 3) = ln(1 + 1/3) = ln(4/3): both means are (ln 2 + ln 4/3) / 2; halved sum
    expected = 0.5 * ((math.log(2) + math.log(4 / 3)) / 2 + (math.log(2) + math.log(4 / 3)) / 2)
    assert nonsaturating_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)
    assert nonsaturating_d_loss(torch.zeros(5), torch.zeros(7)).item() == pytest.approx(math.log(2), rel=1e-6)
    # generator: softplus(-ln 3) = ln(4/3); softplus(-0) = ln 2
    assert nonsaturating_g_loss(t(ln3)).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    assert nonsaturating_g_loss(t(ln3, 0.0)).item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, rel=1e-6)
    # numerically stable for large logits
    assert torch.isfinite(nonsaturating_d_loss(t(-100.0), t(100.0)))
    assert nonsaturating_d_loss(t(-100.0), t(100.0)).item() == pytest.approx(100.0, rel=1e-5)


# --- adaptive weight --------------------------------------------------------------------------------------------

def tiny_decoder():
    """z -> h = W0 z -> y = W1 h with W0 = W1 = identity (2x2), z = (1, 2): h = y = (1, 2)."""
    w0 = nn.Parameter(torch.eye(2))
    w1 = nn.Parameter(torch.eye(2))
    z = t(1.0, 2.0)
    h = w0 @ z
    return w1, h, w1 @ h


def test_adaptive_weight_closed_form():
    w1, h, y = tiny_decoder()
    target, a = t(0.0, 0.0), t(3.0, 4.0)
    rec_loss = 0.5 * (y - target).pow(2).sum()  # d/dW1 = (y - target) h^T = [[1, 2], [2, 4]]: norm |y||h| = 5
    g_loss = -(a * y).sum()                    # d/dW1 = -a h^T:              norm |a||h| = 5 sqrt(5)
    weight = adaptive_weight(rec_loss, g_loss, w1)
    assert weight.item() == pytest.approx(5.0 / (5.0 * math.sqrt(5.0) + 1e-4), rel=1e-6)
    assert weight.ndim == 0 and not weight.requires_grad
    assert w1.grad is None  # autograd.grad: nothing accumulated
    (rec_loss + weight * g_loss).backward()  # graph retained for the real backward
    # d/dW1 of rec + weight * g = (y - target - weight * a) h^T
    expected = torch.outer(y.detach() - target - weight * a, h.detach())
    torch.testing.assert_close(w1.grad, expected)


def test_adaptive_weight_clamped_and_eps():
    w1, _, y = tiny_decoder()
    rec_loss, g_loss = y.sum(), 1e-12 * y.sum()  # tiny GAN gradient: ratio ~ 1 / eps -> clamped
    assert adaptive_weight(rec_loss, g_loss, w1, max_weight=100.0).item() == 100.0
    # g gradient exactly zero: |grad rec| / eps; grad rec = [[1, 2], [1, 2]], norm sqrt(10)
    w1, _, y = tiny_decoder()
    zero_g = 0.0 * y.sum()
    assert adaptive_weight(y.sum(), zero_g, w1, max_weight=1e9).item() == pytest.approx(math.sqrt(10) / 1e-4,
                                                                                         rel=1e-5)


def test_adaptive_weight_without_grad_raises():
    w1, _, y = tiny_decoder()
    rec_loss, g_loss = y.pow(2).sum(), -y.sum()
    with torch.no_grad():  # evaluation: there is no gradient to balance
        with pytest.raises(RuntimeError, match="autograd"):
            adaptive_weight(rec_loss, g_loss, w1)
    with pytest.raises(RuntimeError, match="rec_loss does not require grad"):
        adaptive_weight(rec_loss.detach(), g_loss, w1)
    frozen = torch.eye(2)
    with pytest.raises(RuntimeError, match="does not require grad"):
        adaptive_weight(rec_loss, g_loss, frozen)
    other = nn.Parameter(torch.ones(2))  # not in the graph
    with pytest.raises(RuntimeError, match="does not depend on last_layer_weight"):
        adaptive_weight(rec_loss, g_loss, other)


# --- regularisers -----------------------------------------------------------------------------------------------

def test_r1_linear_discriminator_gives_squared_weight_norm():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3 * 4 * 4))
    images = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = images.flatten(1) @ w  # D(x) = w . x: gradient w for every image
    penalty = r1_penalty(logits, images)
    assert penalty.item() == pytest.approx(w.detach().pow(2).sum().item(), rel=1e-5)
    penalty.backward()  # create_graph: d ||w||^2 / dw = 2 w
    torch.testing.assert_close(w.grad, 2 * w.detach())
    # a patch map: D(x) = per-pixel c . x (1x1 conv, c in R^3); sum over the 16 positions -> grad c at each pixel:
    # ||grad||^2 = 16 |c|^2
    c = t(1.0, -2.0, 0.5)
    conv_logits = torch.einsum("bchw,c->bhw", images, c)[:, None]
    assert r1_penalty(conv_logits, images).item() == pytest.approx(16 * (1 + 4 + 0.25), rel=1e-5)
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(logits, images.detach())


def test_r1_through_patch_discriminator():
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, num_layers=2)
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    penalty = r1_penalty(disc(images), images)
    assert penalty.item() > 0
    penalty.backward()
    # the weights are penalised (biases after the last GroupNorm only move the logits or LeakyReLU's
    # piecewise-constant slope pattern: no effect on the input gradient)
    for name, p in disc.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_lecam_closed_form():
    real, fake = t(1.0, -1.0, 3.0), t(0.5, -2.0)
    # relu(real - ema_fake) = [1, 0, 3] -> squares mean 10/3; relu(ema_real - fake) = [0, 2.5] -> squares mean 3.125
    assert lecam_loss(real, fake, 0.5, 0.0).item() == pytest.approx(10 / 3 + 3.125, rel=1e-6)
    # tensors as EMAs are constants: gradient only reaches the logits
    ema_real, ema_fake = torch.tensor(0.5, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    real.requires_grad_()
    lecam_loss(real, fake, ema_real, ema_fake).backward()
    assert ema_real.grad is None and ema_fake.grad is None
    torch.testing.assert_close(real.grad, t(2 * 1.0, 0.0, 2 * 3.0) / 3)  # d/dr mean(relu(r)^2) = 2 relu(r) / n
    # MaskBit variant: batch means
    assert lecam_loss(real.mean(), fake.mean(), 0.5, 0.0).item() == pytest.approx(1.0 + 1.25**2, rel=1e-6)


def test_lecam_ema_buffers():
    ema = LeCAMEMA(decay=0.9)
    assert dict(ema.named_buffers()).keys() == {"ema_real", "ema_fake"}
    assert ema.ema_real.item() == 0.0 and ema.ema_fake.item() == 0.0
    real, fake = t(0.0, 2.0), t(-1.0, -0.5)  # means 1.0 and -0.75
    ema.update(real, fake)
    assert ema.ema_real.item() == pytest.approx(0.1) and ema.ema_fake.item() == pytest.approx(-0.075)
    ema.update(real, fake)
    assert ema.ema_real.item() == pytest.approx(0.9 * 0.1 + 0.1 * 1.0)
    assert ema.ema_fake.item() == pytest.approx(0.9 * -0.075 + 0.1 * -0.75)

    # forward: loss against the averages before this batch, then one update (training mode only)
    before = (ema.ema_real.item(), ema.ema_fake.item())
    out = ema(real, fake)
    assert out.item() == pytest.approx(lecam_loss(real, fake, *before).item())
    assert ema.ema_real.item() == pytest.approx(0.9 * before[0] + 0.1 * 1.0)
    ema.eval()
    frozen = ema.ema_real.item()
    ema(real, fake)
    assert ema.ema_real.item() == frozen

    # checkpoints with the model state; decay 0.999 by default
    restored = LeCAMEMA()
    assert restored.decay == 0.999
    restored.load_state_dict(ema.state_dict())
    assert restored.ema_real.item() == ema.ema_real.item() and restored.ema_fake.item() == ema.ema_fake.item()


# --- PatchDiscriminator -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [16, 32, 64, 256])
def test_patch_discriminator_shapes(size):
    torch.manual_seed(0)
    disc = PatchDiscriminator()  # defaults: 64 channels, 3 layers, GroupNorm
    with torch.no_grad():
        logits = disc(torch.randn(1 if size == 256 else 2, 3, size, size))
    assert logits.shape == (1 if size == 256 else 2, 1, size // 8, size // 8)
    assert torch.isfinite(logits).all()


def test_patch_discriminator_sizes_and_receptive_field():
    disc = PatchDiscriminator(channels=8, num_layers=3)
    assert disc(torch.randn(1, 3, 8, 8)).shape == (1, 1, 1, 1)  # minimum size: one logit
    assert disc(torch.randn(1, 3, 32, 48)).shape == (1, 1, 4, 6)
    assert disc(torch.randn(1, 3, 20, 20)).shape == (1, 1, 2, 2)  # 20 -> 10 -> 5 -> 2
    with pytest.raises(ValueError, match="at least 8x8"):
        disc(torch.randn(1, 3, 7, 64))
    with pytest.raises(ValueError, match="shape"):
        disc(torch.randn(1, 1, 32, 32))
    assert PatchDiscriminator(channels=8, num_layers=2)(torch.randn(1, 3, 4, 4)).shape == (1, 1, 1, 1)
    assert [PatchDiscriminator.receptive_field(n) for n in (1, 2, 3, 4)] == [16, 34, 70, 142]
    assert PatchDiscriminator.min_input_size(3) == 8

    # the receptive field, measured: input pixels that one central logit depends on (no GroupNorm, whose
    # statistics would mix in every pixel)
    torch.manual_seed(0)
    images = torch.randn(1, 3, 128, 128, requires_grad=True)
    PatchDiscriminator(channels=8, num_layers=3, norm="none")(images)[0, 0, 8, 8].backward()
    rows = images.grad.abs().sum(dim=(0, 1, 3)).nonzero()
    cols = images.grad.abs().sum(dim=(0, 1, 2)).nonzero()
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


def test_patch_discriminator_options_and_init():
    torch.manual_seed(0)
    default = PatchDiscriminator()
    convs = [m for m in default.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert sum(isinstance(m, nn.GroupNorm) for m in default.modules()) == 3
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert convs[3].weight.std().item() == pytest.approx(0.02, rel=0.05)  # N(0, 0.02) init, 2M weights
    assert PatchDiscriminator(channels=64, num_layers=5).main[-1].in_channels == 512  # width capped at 8x

    batch = PatchDiscriminator(channels=8, norm="batch")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) == 2 + 1
    plain = PatchDiscriminator(channels=8, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="instance")

    sn = PatchDiscriminator(channels=8, spectral_norm=True)
    sn_convs = [m for m in sn.modules() if isinstance(m, nn.Conv2d)]
    assert len(sn_convs) == 5 and all(parametrize.is_parametrized(c, "weight") for c in sn_convs)
    sn.train()
    for _ in range(20):  # power iteration converges: largest singular value of the used weight ~ 1
        sn(torch.randn(1, 3, 16, 16))
    w = sn_convs[1].weight.flatten(1)
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=0.05)
    assert not any(parametrize.is_parametrized(m, "weight") for m in default.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("norm,spectral", [("group", False), ("batch", False), ("none", True)])
def test_patch_discriminator_gradients(norm, spectral):
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, norm=norm, spectral_norm=spectral)
    real, fake = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    # (not the hinge loss: with all logits inside (-1, 1), as at init, its gradient on the output bias is 0)
    nonsaturating_d_loss(disc(real), disc(fake)).backward()
    for name, p in disc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# --- LPIPS ------------------------------------------------------------------------------------------------------

class NotATensor:
    pass


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """A random (seeded) torchvision VGG16 saved like the real weights file (features.* only, to keep the file
    small), and random non-negative heads saved in the lpips package's layout."""
    import torchvision

    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).state_dict()
    vgg = {k: v for k, v in vgg.items() if k.startswith("features.")}
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, folder / "vgg16.pth")
    torch.save(heads, folder / "heads.pth")
    return folder / "vgg16.pth", folder / "heads.pth", vgg


@pytest.fixture(scope="module")
def upstream(lpips_files):
    """The lpips package's model with the same random VGG16 trunk (heads loaded by each test)."""
    lpips = pytest.importorskip("lpips", reason="the lpips package is not installed (pip install lpips)")
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    vgg = lpips_files[2]
    trunk = {}
    for name, _ in model.net.named_parameters():  # slice{k}.{i}.weight: i is torchvision's features index
        _, index, kind = name.split(".")
        trunk[name] = vgg[f"features.{index}.{kind}"]
    model.net.load_state_dict(trunk, strict=True)
    return model.eval()


def images(seed, shape=(3, 3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def test_lpips_matches_upstream_package(lpips_files, upstream):
    vgg_path, heads_path, _ = lpips_files
    upstream.load_state_dict(torch.load(heads_path, weights_only=True), strict=False)
    ours = LPIPS.from_files(vgg_path, heads_path)
    for shape in [(3, 3, 32, 32), (2, 3, 48, 32)]:
        x, y = images(1, shape), images(2, shape)
        with torch.no_grad():
            expected = upstream(x, y).flatten()
            got = ours(x, y, reduction="none")
        assert got.shape == (shape[0],)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x, y), expected.mean(), rtol=1e-5, atol=1e-6)


def test_lpips_bundled_heads_match_upstream(lpips_files, upstream):
    path = bundled_heads_path()
    assert path is not None and path.parts[-4:] == ("lpips", "weights", "v0.1", "vgg.pth")
    upstream.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"), strict=False)
    ours = LPIPS.from_files(lpips_files[0])  # heads from the installed package
    x, y = images(3), images(4)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y, reduction="none"), upstream(x, y).flatten(), rtol=1e-5, atol=1e-6)


def test_lpips_properties(lpips_files):
    vgg_path, heads_path, _ = lpips_files
    model = LPIPS.from_files(vgg_path, heads_path)
    assert all(not p.requires_grad for p in model.parameters())
    model.train()
    assert not any(m.training for m in model.modules())

    x, y = images(5), images(6)
    assert model(x, x.clone(), reduction="none").abs().max().item() < 1e-6  # identical images: 0
    d = model(x, y, reduction="none")
    assert (d > 0).all()
    torch.testing.assert_close(model(y, x, reduction="none"), d)  # symmetric
    assert model(x, y, reduction="sum").item() == pytest.approx(d.sum().item(), rel=1e-6)

    x.requires_grad_()
    model(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in model.parameters())
    z = images(7).requires_grad_()  # gradient at identical images: finite (zero difference)
    model(z, z.detach().clone()).backward()
    assert torch.isfinite(z.grad).all()

    with pytest.raises(ValueError, match="16x16"):
        model(images(0, (1, 3, 8, 8)), images(1, (1, 3, 8, 8)))
    with pytest.raises(ValueError, match="same shape"):
        model(images(0, (1, 3, 32, 32)), images(1, (1, 3, 32, 16)))


def test_lpips_missing_or_bad_files(lpips_files, tmp_path):
    vgg_path, heads_path, vgg = lpips_files
    missing = tmp_path / "nowhere" / "vgg16-397923af.pth"
    with pytest.raises(PerceptualWeightsError, match="file not found") as err:
        LPIPS.from_files(missing, heads_path)
    assert str(missing) in str(err.value)
    with pytest.raises(PerceptualWeightsError, match="LPIPS heads") as err:
        LPIPS.from_files(vgg_path, tmp_path / "heads-missing.pth")
    assert "heads-missing.pth" in str(err.value)

    pickled = tmp_path / "object.pth"  # arbitrary pickled objects are refused (weights_only=True)
    torch.save({"x": NotATensor()}, pickled)
    with pytest.raises(PerceptualWeightsError, match="weights_only"):
        LPIPS.from_files(vgg_path, pickled)
    wrong = tmp_path / "wrong.pth"
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, 8, 1, 1) for k in range(5)}, wrong)
    with pytest.raises(PerceptualWeightsError, match="head 0 must have shape"):
        LPIPS.from_files(vgg_path, wrong)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in vgg.items() if not k.startswith("features.28.")}, partial)
    with pytest.raises(PerceptualWeightsError, match="features"):
        LPIPS.from_files(partial, heads_path)


def test_lpips_heads_without_lpips_package(lpips_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # as if `pip install lpips` had not been run
    assert bundled_heads_path() is None
    with pytest.raises(PerceptualWeightsError, match="pip install lpips") as err:
        LPIPS.from_files(lpips_files[0])
    assert "lpips/weights/v0.1/vgg.pth" in str(err.value) and "heads_path" in str(err.value)


def test_lpips_download_failure_names_the_file(lpips_files, tmp_path, monkeypatch):
    """No vgg_path: torchvision's download through torch hub. Offline it must fail with instructions."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    # Make sure nothing is downloaded even where there is internet: send urllib through a closed local port.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    urllib.request.install_opener(urllib.request.build_opener())  # an opener that reads the proxy settings now
    try:
        with pytest.raises(PerceptualWeightsError) as err:
            LPIPS.from_files(None, lpips_files[1])
    finally:
        urllib.request.install_opener(None)
    message = str(err.value)
    assert "vgg16-397923af.pth" in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert os.path.join(str(home), "hub", "checkpoints") in message
    assert "--perceptual-weights" in message
    assert not list((home / "hub" / "checkpoints").glob("*"))  # no partial download left behind
