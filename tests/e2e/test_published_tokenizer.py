"""Stage 2 on a published tokenizer, end to end: train_maskgit.py --vq on a diffusers VQModel folder (and on the
same model from a Hugging Face cache, offline), the run records the tokenizer's source and sample.py needs nothing
else; clear errors before any work for what cannot be used."""

import json

import numpy as np
import pytest

from conftest import fill_hf_cache, tiny_diffusers_vqmodel
from maskgit import load_maskgit, sample_cli
from maskgit import train as train_maskgit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MG = ["--dim", "32", "--depth", "1", "--heads", "2", "--steps", "4", "--batch-size", "8", "--num-eval-images", "8",
      "--eval-every", "4", "--sample-every", "4", "--save-every", "4", "--num-sample-images", "10",
      "--num-workers", "0", "--warmup-steps", "1"]


@pytest.fixture(scope="module")
def vqmodel_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("published_vq")
    tiny_diffusers_vqmodel(0).save_pretrained(folder)
    return folder


def test_train_and_sample_on_a_diffusers_tokenizer(vqmodel_folder, tiny_labelled_images, tmp_path):
    out = tmp_path / "mg"
    train_maskgit.main(["--vq", str(vqmodel_folder), "--data", str(tiny_labelled_images), "--image-size", "16",
                        *MG, "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    tokenizer = config["data"]["tokenizer"]
    assert "vq_run" not in config["data"] and tokenizer["kind"] == "diffusers"
    assert set(tokenizer["weights_sha256"]) == {"diffusion_pytorch_model.safetensors"}
    assert config["grid"] == [8, 8] and config["codebook_size"] == 64
    assert config["data"]["command"][:3] == ["train_maskgit.py", "--vq", str(vqmodel_folder)]  # for the model card
    assert list((out / "token_cache").glob("codes-*"))  # a published tokenizer's cache lives in the run folder
    model, tok, run = load_maskgit(out)
    assert tok.kind == "diffusers" and tok.grid_for(16) == (8, 8)
    samples = tmp_path / "samples"
    sample_cli.main(["--checkpoint", str(out), "--out", str(samples), "--num", "4", "--batch-size", "4"])
    assert np.load(samples / "samples.npz")["arr_0"].shape == (4, 16, 16, 3)
    assert json.loads((samples / "meta.json").read_text())["tokenizer"]["kind"] == "diffusers"


def test_a_changed_tokenizer_is_refused(vqmodel_folder, tiny_labelled_images, tmp_path):
    out = tmp_path / "mg"
    train_maskgit.main(["--vq", str(vqmodel_folder), "--data", str(tiny_labelled_images), "--image-size", "16",
                        *MG, "--out", str(out)])
    tiny_diffusers_vqmodel(1).save_pretrained(vqmodel_folder)  # other weights at the same path
    try:
        with pytest.raises(Exception, match="weights changed"):
            load_maskgit(out)
    finally:
        tiny_diffusers_vqmodel(0).save_pretrained(vqmodel_folder)


def test_hub_tokenizer_offline_from_the_cache(vqmodel_folder, tiny_labelled_images, tmp_path, hf_cache, hf_offline):
    fill_hf_cache(hf_cache, "acme/tiny-vq", {f"vqvae/{p.name}": p.read_bytes() for p in vqmodel_folder.iterdir()})
    out = tmp_path / "mg"
    train_maskgit.main(["--vq", "acme/tiny-vq", "--vq-subfolder", "vqvae", "--data", str(tiny_labelled_images),
                        "--image-size", "16", *MG, "--out", str(out)])
    tokenizer = json.loads((out / "config.json").read_text())["data"]["tokenizer"]
    assert tokenizer["repo_id"] == "acme/tiny-vq" and tokenizer["commit"] and tokenizer["subfolder"] == "vqvae"
    load_maskgit(out)


@pytest.mark.parametrize("extra, message", [
    (["--image-size", "15"], "--image-size 15"),
    ([], "--image-size is required"),
    (["--image-size", "16", "--no-data"], "--data is required"),
])
def test_bad_published_tokenizer_settings_fail_before_work(vqmodel_folder, tiny_labelled_images, tmp_path, capsys,
                                                           extra, message):
    data = [] if "--no-data" in extra else ["--data", str(tiny_labelled_images)]
    extra = [e for e in extra if e != "--no-data"]
    with pytest.raises(SystemExit):
        train_maskgit.main(["--vq", str(vqmodel_folder), *data, *extra, *MG, "--out", str(tmp_path / "x")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "config.json").exists()


def test_a_stage2_folder_is_no_tokenizer(tmp_path, capsys):
    run = tmp_path / "stage2"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"stage": "maskgit"}))
    with pytest.raises(SystemExit):
        train_maskgit.main(["--vq", str(run), "--data", "shapes", *MG, "--out", str(tmp_path / "x")])
    assert "stage-2" in capsys.readouterr().err
