"""Published tokenizers behind one interface: equal to upstream, loadable offline, and clear about bad input.

No network: diffusers models are built small and random here; LlamaGen's upstream outputs come from a fixture
made by tests/fixtures/make_llamagen_reference.py with LlamaGen's own code.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model

from conftest import HF_COMMIT, fill_hf_cache, tiny_diffusers_vqmodel
from vqvae.llamagen import LLAMAGEN_VQ16, LlamaGenTokenizer, LlamaGenVQ, infer_llamagen_config, load_llamagen_weights
from vqvae.tokenizer import OwnTokenizer, Tokenizer, TokenizerSourceError, load_tokenizer_from, sha256_of

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REFERENCE = FIXTURES / "llamagen_tiny_reference.sft"
LAYOUT = FIXTURES / "llamagen_published_layout.json"


# ----------------------------------------------------------------------------------------------
# LlamaGen


@pytest.fixture(scope="module")
def reference():
    """The fixture's tensors ('state' is the upstream state dict) and the architecture it was made with."""
    with safe_open(str(REFERENCE), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a mapping
        config = json.loads(fh.metadata()["config"])
    out = {k: v for k, v in tensors.items() if not k.startswith("state/")}
    out["state"] = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
    out["config"] = config
    return out


def test_llamagen_matches_upstream(reference):
    model = LlamaGenVQ(**reference["config"]).eval()
    model.load_state_dict(reference["state"], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_latents(reference["images"]), reference["latents"], rtol=0, atol=1e-6)
        assert torch.equal(model.encode(reference["images"]), reference["codes"])
        torch.testing.assert_close(model.decode(reference["codes"]), reference["decoded"], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.decode(reference["random_codes"]), reference["random_decoded"],
                                   rtol=0, atol=1e-5)


def test_llamagen_defaults_are_the_published_vq16_layout():
    layout = json.loads(LAYOUT.read_text())["layouts"]["VQ_16"]
    with torch.device("meta"):
        model = LlamaGenVQ()
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == layout  # what vq_ds16_c2i.pt holds under "model"
    assert (model.downsample, model.codebook_size) == (16, 16384)
    inferred = infer_llamagen_config(state)
    assert {k: inferred[k] for k in LLAMAGEN_VQ16} == LLAMAGEN_VQ16 and inferred["codebook_usage_buffer"]


@pytest.mark.parametrize("layout", ["model", "ema", "bare", "training"])
def test_llamagen_checkpoint_through_load_tokenizer_from(reference, tmp_path, layout):
    state = reference["state"]
    checkpoint = {"model": {"model": state}, "ema": {"ema": state}, "bare": state,
                  "training": {"model": state, "steps": 7, "args": argparse.Namespace(lr=1e-4)}}[layout]
    path = tmp_path / "vq_tiny.pt"
    torch.save(checkpoint, path)
    tok = load_tokenizer_from(path, llamagen_config={"norm_groups": 4})  # groups: the one thing weights don't tell
    assert isinstance(tok, LlamaGenTokenizer) and isinstance(tok, Tokenizer)
    assert tok.model.config == {**reference["config"], "ch_mult": [1, 1, 2], "decoder_ch_mult": [1, 1, 2]}
    assert (tok.codebook_size, tok.downsample, tok.grid_for(24)) == (64, 4, (6, 6))
    assert torch.equal(tok.encode(reference["images"]), reference["codes"])
    torch.testing.assert_close(tok.decode(reference["codes"]), reference["decoded"].clamp(-1, 1), rtol=0, atol=1e-5)
    source = json.loads(json.dumps(tok.source))
    assert source["kind"] == "llamagen" and source["location"] == "local" and source["filename"] == "vq_tiny.pt"
    assert source["weights_sha256"] == {"vq_tiny.pt": sha256_of(path)}


def test_llamagen_safetensors_folder_is_detected(reference, tmp_path):
    save_file(reference["state"], str(tmp_path / "model.safetensors"))  # a bare state dict, e.g. a Hub export
    tok = load_tokenizer_from(tmp_path, llamagen_config={"norm_groups": 4})
    assert tok.kind == "llamagen" and torch.equal(tok.encode(reference["images"]), reference["codes"])


def test_llamagen_wrong_architecture(reference, tmp_path):
    state = dict(reference["state"])
    state["encoder.conv_in.weight_renamed"] = state.pop("encoder.conv_in.weight")
    path = tmp_path / "renamed.pt"
    torch.save({"model": state}, path)
    with pytest.raises(TokenizerSourceError, match=r"missing keys .*encoder\.conv_in\.weight.*unexpected keys"):
        load_tokenizer_from(path, llamagen_config={"norm_groups": 4})
    model = LlamaGenVQ(**{**reference["config"], "codebook_embed_dim": 4})  # shapes that differ
    with pytest.raises(TokenizerSourceError, match=r"shape mismatches .*quantize\.embedding\.weight"):
        load_llamagen_weights(model, reference["state"])
    torch.save({"model": {"net.weight": torch.zeros(3)}}, tmp_path / "other.pt")  # some other model entirely
    with pytest.raises(TokenizerSourceError, match=r"does not match LlamaGen's VQ architecture.*missing keys"):
        load_tokenizer_from(tmp_path / "other.pt")


def test_image_size_not_divisible(reference, tmp_path):
    torch.save(reference["state"], tmp_path / "vq.pt")
    tok = load_tokenizer_from(tmp_path / "vq.pt", llamagen_config={"norm_groups": 4})
    with pytest.raises(ValueError, match=r"image size 30 .* multiple of 4, e\.g\. 28 or 32"):
        tok.grid_for(30)
    with pytest.raises(ValueError, match=r"height 30 .* multiple of 4"):
        tok.encode(torch.zeros(1, 3, 30, 24))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        tok.decode(torch.full((1, 2, 2), 64))


# ----------------------------------------------------------------------------------------------
# diffusers VQModel


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers_vq")
    model = tiny_diffusers_vqmodel(0)
    model.save_pretrained(folder)
    return folder, model


def _images(n=2, size=16, seed=3):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _diffusers_reference(model, images):
    """diffusers' own encode -> quantize -> decode: (codes, decoded from the codes, decoded from the latents)."""
    with torch.no_grad():
        latents = model.encode(images).latents
        quantized, _, (_, _, indices) = model.quantize(latents)
        b, d, h, w = latents.shape
        codes = indices.reshape(b, h, w)
        if model.config.lookup_from_codebook:  # aMUSEd's pipelines decode indices this way
            from_codes = model.decode(codes, force_not_quantize=True, shape=(b, h, w, d)).sample
        else:
            from_codes = model.decode(quantized, force_not_quantize=True).sample
        return codes, from_codes, model.decode(latents).sample  # the last one quantizes inside decode()


def test_diffusers_matches_diffusers(diffusers_folder):
    folder, model = diffusers_folder
    tok = load_tokenizer_from(folder)
    assert tok.kind == "diffusers" and (tok.codebook_size, tok.downsample, tok.grid_for(16)) == (64, 2, (8, 8))
    images = _images()
    codes, decoded, decoded_requantized = _diffusers_reference(model, images)
    assert len(codes.unique()) >= 5
    assert torch.equal(tok.encode(images), codes)
    out = tok.decode(codes)
    torch.testing.assert_close(out, decoded.clamp(-1, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, decoded_requantized.clamp(-1, 1), rtol=0, atol=1e-5)
    source = json.loads(json.dumps(tok.source))
    assert source["weights_sha256"] == {"diffusion_pytorch_model.safetensors":
                                        sha256_of(folder / "diffusion_pytorch_model.safetensors")}
    assert source["pixel_range"] == [-1.0, 1.0] and source["path"] == str(folder.resolve())


def test_diffusers_lookup_from_codebook_and_pixel_range(tmp_path):
    model = tiny_diffusers_vqmodel(1, lookup_from_codebook=True)  # aMUSEd-style: decode() takes indices
    model.save_pretrained(tmp_path)
    tok = load_tokenizer_from(tmp_path, pixel_range=(0, 1))
    images = _images()
    codes, decoded, decoded_requantized = _diffusers_reference(model, (images + 1) / 2)
    assert torch.equal(tok.encode(images), codes)
    out = tok.decode(codes)
    torch.testing.assert_close(out, (decoded * 2 - 1).clamp(-1, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, (decoded_requantized * 2 - 1).clamp(-1, 1), rtol=0, atol=1e-5)


COMMIT = HF_COMMIT


@pytest.fixture
def hub_cache(tmp_path, hf_cache, diffusers_folder, reference):
    """A Hugging Face cache (HF_HUB_CACHE) holding 'acme/tiny-vq' (the diffusers model under vqvae/) and a
    'FoundationVision/LlamaGen' with the tiny LlamaGen model as vq_ds16_c2i.pt beside another checkpoint."""
    cache = hf_cache
    fill_hf_cache(cache, "acme/tiny-vq", {
        **{f"vqvae/{n}": (diffusers_folder[0] / n).read_bytes() for n in ("config.json",
                                                                          "diffusion_pytorch_model.safetensors")},
        "README.md": b"tiny test model\n"})
    torch.save({"model": reference["state"]}, tmp_path / "vq.pt")
    fill_hf_cache(cache, "FoundationVision/LlamaGen", {"vq_ds16_c2i.pt": (tmp_path / "vq.pt").read_bytes(),
                                                     "c2i_B_256.pt": b"not a tokenizer"})
    return cache


@pytest.fixture
def offline_cache(hub_cache, hf_offline):
    """hub_cache, and HF_HUB_OFFLINE=1."""
    return hub_cache


def test_hub_repo_offline_from_cache(offline_cache, diffusers_folder, reference):
    _, model = diffusers_folder
    images = _images()
    codes, decoded, _ = _diffusers_reference(model, images)
    for revision in (None, COMMIT):
        tok = load_tokenizer_from("acme/tiny-vq", subfolder="vqvae", revision=revision)
        assert torch.equal(tok.encode(images), codes)
        torch.testing.assert_close(tok.decode(codes), decoded.clamp(-1, 1), rtol=0, atol=1e-5)
        source = json.loads(json.dumps(tok.source))
        assert {k: source[k] for k in ("location", "repo_id", "subfolder", "commit", "revision")} == {
            "location": "hub", "repo_id": "acme/tiny-vq", "subfolder": "vqvae", "commit": COMMIT,
            "revision": revision}
    with pytest.raises(TokenizerSourceError, match=r"subfolders \['vqvae'\]: pass subfolder="):
        load_tokenizer_from("acme/tiny-vq")
    tok = load_tokenizer_from("FoundationVision/LlamaGen", llamagen_config={"norm_groups": 4})  # the default file
    assert tok.kind == "llamagen" and tok.source["filename"] == "vq_ds16_c2i.pt"
    assert torch.equal(tok.encode(reference["images"]), reference["codes"])


def test_hub_repo_offline_not_cached(offline_cache):
    with pytest.raises(TokenizerSourceError, match=r"'acme/not-cached'.*not in the Hugging Face cache.*HF_HUB_OFFL"):
        load_tokenizer_from("acme/not-cached")


def test_hub_unreachable_falls_back_to_cache(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    tok = load_tokenizer_from("acme/tiny-vq", subfolder="vqvae")
    assert tok.kind == "diffusers" and tok.source["commit"] == COMMIT
    with pytest.raises(TokenizerSourceError, match=r"not in the Hugging Face cache .*could not be reached.*no route"):
        load_tokenizer_from("acme/not-cached")


# ----------------------------------------------------------------------------------------------
# Our own tokenizer, and sources that are not tokenizers


def test_own_tokenizer(tmp_path):
    from vqvae import VQVAE, VQConfig

    cfg = VQConfig(image_size=16, channels=16, max_channels=32, num_res_blocks=1, norm_groups=8, quantizer="fsq",
                   fsq_levels=(4, 4, 4))
    torch.manual_seed(0)
    model = VQVAE(cfg, sync_codebook=False).eval()
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"stage": "vqvae", "format_version": 1,
                                                      "model": dataclasses.asdict(cfg)}))
    tok = load_tokenizer_from(tmp_path)
    assert isinstance(tok, OwnTokenizer) and (tok.codebook_size, tok.downsample, tok.grid_for(32)) == (64, 4, (8, 8))
    images = _images(size=16)
    codes = tok.encode(images)
    assert torch.equal(codes, model.encode(images))
    torch.testing.assert_close(tok.decode(codes), model.decode(codes).clamp(-1, 1), rtol=0, atol=0)
    assert tok.source["weights_sha256"] == {"model.safetensors": sha256_of(tmp_path / "model.safetensors")}


def test_not_tokenizers(tmp_path):
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    (stage2 / "config.json").write_text(json.dumps({"stage": "maskgit", "format_version": 1, "model": {}}))
    with pytest.raises(TokenizerSourceError, match=r"stage-2 \(MaskGIT transformer\) run, not a tokenizer"):
        load_tokenizer_from(stage2)
    kl = tmp_path / "kl"
    kl.mkdir()
    (kl / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0"}))
    with pytest.raises(TokenizerSourceError, match=r"diffusers 'AutoencoderKL' \(a continuous-latent VAE.*VQModel"):
        load_tokenizer_from(kl)
    vq = tmp_path / "vq"
    vq.mkdir()
    (vq / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(TokenizerSourceError, match=r"kind='own' but its config.json is of kind 'diffusers'"):
        load_tokenizer_from(vq, kind="own")
    with pytest.raises(TokenizerSourceError, match=r"a diffusers VQModel config.json but no weights"):
        load_tokenizer_from(vq)
    with pytest.raises(TokenizerSourceError, match=r"does not exist"):
        load_tokenizer_from(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"kind='vqgan'"):
        load_tokenizer_from(kl, kind="vqgan")
