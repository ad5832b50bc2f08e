"""Stage-1 tokenizer: shapes, round trips, training signal, config checks, metrics, upstream behaviour we rely on."""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vqvae.config import VQ_PRESETS, VQConfig, VQTrainConfig
from vqvae.metrics import codebook_stats, psnr
from vqvae.model import VQVAE, build_quantizer

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def small_config(**overrides) -> VQConfig:
    base = dict(
        image_size=16, downsample=4, channels=8, max_channels=16, num_res_blocks=1, norm_groups=4,
        latent_dim=8, codebook_size=32, fsq_levels=(5, 3, 3),
    )
    return VQConfig(**(base | overrides))


def random_images(b=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def codebook_buffers(model):
    return {k: v.clone() for k, v in model.quantizer.state_dict().items()}


def train_steps(model, images, steps, lr=1e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(images)
        opt.zero_grad()
        out.losses.total.backward()
        opt.step()
        losses.append(out.losses.total.item())
    return losses


# ----------------------------------------------------------------------------------------------
# shapes and round trips


@pytest.mark.parametrize("quantizer", ["vq", "fsq", "lfq"])
@pytest.mark.parametrize("downsample", [2, 4, 8])
def test_shapes_and_code_range(quantizer, downsample):
    torch.manual_seed(0)
    model = VQVAE(small_config(quantizer=quantizer, downsample=downsample))
    x = random_images(b=3)
    out = model(x)
    side = 16 // downsample
    assert model.grid_size == (side, side)
    assert model.codebook_size == (5 * 3 * 3 if quantizer == "fsq" else 32)
    assert out.recon.shape == x.shape and out.recon.dtype == torch.float32
    assert out.codes.shape == (3, side, side) and out.codes.dtype == torch.int64
    assert 0 <= out.codes.min() and out.codes.max() < model.codebook_size
    codes = model.encode(x)
    assert codes.shape == (3, side, side) and codes.dtype == torch.int64
    assert model.decode(codes).shape == x.shape
    # a fully convolutional tokenizer also takes other sizes that are multiples of f
    assert model.encode(random_images(b=1, size=32)).shape == (1, 2 * side, 2 * side)


@pytest.mark.parametrize("quantizer", ["vq", "fsq", "lfq"])
def test_decode_of_encode_equals_eval_forward(quantizer):
    torch.manual_seed(0)
    model = VQVAE(small_config(quantizer=quantizer))
    x = random_images()
    train_steps(model, x, steps=2)  # seeded codebook, non-trivial weights
    model.eval()
    out = model(x)
    codes = model.encode(x)
    assert torch.equal(codes, out.codes)
    torch.testing.assert_close(model.decode(codes), out.recon, rtol=1e-5, atol=1e-6)
    assert out.losses.quant.item() == 0.0  # no quantizer loss in eval
    assert out.losses.total.item() == pytest.approx(((out.recon - x) ** 2).mean().item(), rel=1e-5)


def test_codebook_updates_only_in_training_forward():
    torch.manual_seed(0)
    model = VQVAE(small_config(quantizer="vq"))
    x, y = random_images(seed=1), random_images(seed=2)
    model(x)  # seeds the codebook
    before = codebook_buffers(model)
    model.encode(y)  # training mode, but encode must not touch the codebook
    assert all(torch.equal(before[k], v) for k, v in codebook_buffers(model).items())
    model.eval()
    model(y)
    assert all(torch.equal(before[k], v) for k, v in codebook_buffers(model).items())
    model.train()
    model(y)
    after = codebook_buffers(model)
    assert not torch.equal(before["_codebook.embed"], after["_codebook.embed"])


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_loss_positive_and_falls_when_overfitting_one_batch(quantizer):
    torch.manual_seed(0)
    model = VQVAE(small_config(quantizer=quantizer))
    x = random_images(b=4, seed=3)
    losses = train_steps(model, x, steps=80, lr=3e-3)
    assert all(loss > 0 for loss in losses)
    assert losses[-1] < losses[0] / 2, losses


def test_state_dict_round_trip_gives_same_codes():
    torch.manual_seed(0)
    model = VQVAE(small_config(quantizer="vq"))
    x = random_images()
    train_steps(model, x, steps=2)
    clone = VQVAE(small_config(quantizer="vq"))
    clone.load_state_dict(model.state_dict())  # carries the k-means "initted" flag and the EMA codebook
    assert torch.equal(clone.encode(x), model.encode(x))


# ----------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(downsample=3), "downsample"),
        (dict(downsample=1), "downsample"),
        (dict(image_size=36, downsample=8), "image_size"),
        (dict(codebook_size=1), "codebook_size"),
        (dict(fsq_levels=(8, 2, 8)), "fsq_levels"),
        (dict(fsq_levels=()), "fsq_levels"),
        (dict(quantizer="rvq"), "quantizer"),
        (dict(quantizer="lfq", codebook_size=48), "power of 2"),
        (dict(recon_loss="lpips"), "recon_loss"),
        (dict(channels=24, norm_groups=32), "channels"),
        (dict(channels=64, max_channels=32), "max_channels"),
        (dict(codebook_decay=1.0), "codebook_decay"),
        (dict(commitment_weight=-1.0), "commitment_weight"),
    ],
)
def test_model_config_rejects_bad_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        VQConfig(**overrides)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(steps=0), "steps"),
        (dict(batch_size=10, grad_accum=3), "batch_size"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(lr_schedule="step"), "lr_schedule"),
        (dict(lr=0.0), "lr"),
        (dict(keep_last=0), "keep_last"),
    ],
)
def test_train_config_rejects_bad_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        VQTrainConfig(**overrides)


def test_validate_catches_edits_after_construction():
    cfg = VQConfig()
    cfg.downsample = 6
    with pytest.raises(ValueError, match="downsample"):
        VQVAE(cfg)


def test_presets_are_valid_and_field_names_unique():
    model_fields = {f.name for f in dataclasses.fields(VQConfig)}
    train_fields = {f.name for f in dataclasses.fields(VQTrainConfig)}
    assert not model_fields & train_fields  # the CLI exposes both as --field-name
    for name, (model_cfg, train_cfg) in VQ_PRESETS.items():
        model_cfg.validate()
        train_cfg.validate()
    tiny = VQ_PRESETS["tiny"][0]
    assert (tiny.image_size, tiny.downsample) == (32, 4)
    from_json = VQConfig(quantizer="fsq", fsq_levels=[8, 5, 5, 5])  # JSON gives lists
    assert from_json.fsq_levels == (8, 5, 5, 5) and from_json.effective_codebook_size == 1000


# ----------------------------------------------------------------------------------------------
# metrics


def test_psnr_matches_closed_form_for_constant_offsets():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g) * 1.5 - 1  # in [-1, 0.5] so the offsets never clip
    offsets = torch.tensor([0.1, 0.02])  # on the [0, 1] scale, i.e. twice that on [-1, 1]
    y = x + 2 * offsets.view(2, 1, 1, 1)
    expected = sum(10 * math.log10(1 / d**2) for d in offsets.tolist()) / 2  # per image, then mean
    assert psnr(y, x) == pytest.approx(expected, rel=1e-4)
    assert psnr(x, x) == 100.0


def test_codebook_stats_against_hand_computed_histograms():
    k, K = 16, 64
    usage, perplexity = codebook_stats(torch.arange(k).repeat(5), K)  # uniform over k codes
    assert usage == pytest.approx(k / K)
    assert perplexity == pytest.approx(k)
    usage, perplexity = codebook_stats(torch.tensor([[3, 3], [5, 7]]), 8)  # p = (1/2, 1/4, 1/4)
    assert usage == pytest.approx(3 / 8)
    assert perplexity == pytest.approx(2**1.5)  # exp(H), H = 1.5 bits
    # out-of-range indices (FSQ on non-finite latents) are left out rather than crashing the evaluation
    usage, perplexity = codebook_stats(torch.tensor([3, 3, 5, 7, -9, 8]), 8)
    assert usage == pytest.approx(3 / 8) and perplexity == pytest.approx(2**1.5)
    usage, perplexity = codebook_stats(torch.tensor([-1, 99]), 8)
    assert usage == 0.0 and math.isnan(perplexity)


# ----------------------------------------------------------------------------------------------
# vector-quantize-pytorch behaviour we rely on (see docs/upstream.md); an upstream change should fail here


def test_upstream_vector_quantize_contract():
    torch.manual_seed(0)
    vq = build_quantizer(small_config(quantizer="vq", latent_dim=4, codebook_size=8), sync_codebook=False)
    assert vq._codebook.use_ddp is False  # our explicit sync_codebook reaches the codebook
    assert not bool(vq._codebook.initted)
    z = torch.randn(2, 10, 4, requires_grad=True)  # (b, h*w, d)
    quantized, indices, loss = vq(z)
    assert bool(vq._codebook.initted)  # k-means seeding happened on the first call
    assert quantized.shape == z.shape and indices.shape == (2, 10) and indices.dtype == torch.int64
    assert loss.item() > 0  # commitment loss in training
    quantized.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # gradients reach the encoder

    frozen = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 10, 4), freeze_codebook=True)
    assert all(torch.equal(frozen[k], v) for k, v in vq.state_dict().items())  # encode() relies on this

    vq.eval()
    z = torch.randn(2, 10, 4)
    quantized, indices, loss = vq(z)
    assert loss.item() == 0.0
    assert torch.equal(vq.get_output_from_indices(indices), quantized)
    nearest = torch.cdist(z, vq.codebook[None].expand(2, -1, -1)).argmin(-1)  # independent nearest neighbour
    assert torch.equal(indices, nearest)
    assert all(torch.equal(frozen[k], v) for k, v in vq.state_dict().items())  # no update in eval


def test_upstream_fsq_contract():
    levels = (5, 4, 3)
    fsq = build_quantizer(small_config(quantizer="fsq", fsq_levels=levels), sync_codebook=False)
    assert fsq.codebook_size == 5 * 4 * 3
    z = torch.randn(2, 50, 3) * 3  # (b, h*w, d), large enough to hit every level
    quantized, indices = fsq(z)
    assert quantized.shape == z.shape and indices.shape == (2, 50)
    assert 0 <= indices.min() and indices.max() < fsq.codebook_size
    assert torch.equal(fsq.indices_to_codes(indices), quantized)
    # every channel takes at most L values in [-1, 1]
    for c, level in enumerate(levels):
        assert quantized[..., c].unique().numel() <= level
    assert quantized.abs().max() <= 1.0
    # all codes are distinct points: the implicit codebook is a bijection of the indices
    all_codes = fsq.indices_to_codes(torch.arange(fsq.codebook_size)[None])[0]
    assert all_codes.unique(dim=0).shape[0] == fsq.codebook_size


def test_model_decides_codebook_sync_at_construction():
    assert VQVAE(small_config()).quantizer._codebook.use_ddp is False  # no process group here
    assert VQVAE(small_config(), sync_codebook=True).quantizer._codebook.use_ddp is True


# ----------------------------------------------------------------------------------------------
# several processes


DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from accelerate import Accelerator
    from vqvae.config import VQConfig
    from vqvae.model import VQVAE

    accelerator = Accelerator(cpu=True)
    cfg = VQConfig(image_size=16, channels=8, max_channels=16, num_res_blocks=1, norm_groups=4,
                   latent_dim=4, codebook_size=16, dead_code_threshold=1.0)
    result = {"num_processes": accelerator.num_processes}
    for name, sync in [("auto", None), ("off", False)]:
        torch.manual_seed(0)
        model = VQVAE(cfg, sync_codebook=sync)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model, opt = accelerator.prepare(model, opt)
        g = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data per process
        for _ in range(3):
            loss = model(torch.rand(4, 3, 16, 16, generator=g) * 2 - 1).losses.total
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        vqvae = accelerator.unwrap_model(model)
        books = accelerator.gather(vqvae.quantizer.codebook[None])  # (processes, K, d)
        weights = accelerator.gather(next(vqvae.decoder.parameters()).detach()[None])
        result[name] = dict(
            sync=vqvae.sync_codebook,
            books_equal=bool(torch.equal(books[0], books[1])),
            weights_equal=bool(torch.allclose(weights[0], weights[1])),
        )
    if accelerator.is_main_process:
        print("RESULT " + json.dumps(result))
    accelerator.free_memory()  # drop both DDP wrappers (their gloo reducers) before the process group goes
    accelerator.end_training()  # destroys the process group, as the scripts do: gloo can abort at exit otherwise
    """
)


def free_port() -> int:
    # accelerate's default rendezvous port 29500 collides with any other launch running at the same time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_codebook_stays_in_sync_across_two_processes(tmp_path):
    script = tmp_path / "vq_two_processes.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # --multi_gpu with no GPU gives two gloo CPU processes (DistributedType.MULTI_CPU)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["num_processes"] == 2
    assert result["auto"] == dict(sync=True, books_equal=True, weights_equal=True)
    # without the all-reduce each process's last EMA update uses only its own data: the test has teeth
    assert result["off"]["sync"] is False and result["off"]["books_equal"] is False
