"""Run folders through the Hugging Face Hub (core.hub, publish.py): what a publish uploads, a published stage-2
run sampled from the cache offline, and the offline errors. No test touches the network: the upload itself is
left to huggingface_hub; everything before it is checked on the folder `publish.py --dry-run` writes."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import fill_hf_cache
from core import publish_cli
from core.hub import HubError, fetch_run, looks_like_repo_id, publish
from maskgit import load_maskgit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def runs(old_runs) -> Path:
    root = old_runs
    config_path = root / "maskgit" / "config.json"
    config = json.loads(config_path.read_text())
    config["data"]["command"] = ["train_maskgit.py", "--vq", "runs/vq", "--out", "runs/maskgit"]
    config_path.write_text(json.dumps(config))
    return root


def test_dry_run_writes_a_self_contained_repository(runs, tmp_path):
    upload = tmp_path / "upload"
    publish_cli.main(["--run", str(runs / "maskgit"), "--repo", "you/tiny-maskgit", "--dry-run", str(upload)])
    names = {p.relative_to(upload).as_posix() for p in upload.rglob("*") if p.is_file()}
    assert {"README.md", "config.json", "model.safetensors", "ema.safetensors", "metrics.jsonl",
            "tokenizer/config.json", "tokenizer/model.safetensors"} <= names
    assert json.loads((upload / "config.json").read_text())["data"]["vq_run"] == "tokenizer"
    card = (upload / "README.md").read_text()
    assert "python sample.py --checkpoint you/tiny-maskgit" in card
    assert "train_maskgit.py --vq runs/vq --out runs/maskgit" in card  # the exact command, from config.json
    assert "| eval_masked_acc |" in card  # the last evaluation
    shutil.rmtree(runs / "vq")  # the upload does not depend on the original tokenizer folder
    model, tokenizer, run = load_maskgit(upload)
    assert run.tokenizer_path == upload / "tokenizer"
    codes = model.generate(labels=torch.arange(2), steps=2, generator=torch.Generator().manual_seed(0))
    assert tokenizer.decode(codes.view(2, *run.grid)).shape == (2, 3, 16, 16)


def test_a_published_run_samples_offline_from_the_cache(runs, tmp_path, hf_cache, hf_offline):
    upload = tmp_path / "upload"
    publish_cli.main(["--run", str(runs / "maskgit"), "--repo", "you/tiny-maskgit", "--dry-run", str(upload)])
    fill_hf_cache(hf_cache, "you/tiny-maskgit",
                  {p.relative_to(upload).as_posix(): p.read_bytes() for p in upload.rglob("*") if p.is_file()})
    assert looks_like_repo_id("you/tiny-maskgit")
    folder = fetch_run("you/tiny-maskgit")
    model, tokenizer, run = load_maskgit(folder)
    assert run.num_classes == 10 and run.has_ema
    with pytest.raises(HubError, match=r"'you/not-there'.*not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        fetch_run("you/not-there")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        publish(runs / "maskgit", "you/tiny-maskgit")


def test_publish_refuses_what_cannot_be_used(runs, tmp_path, capsys):
    (runs / "vq" / "model.safetensors").unlink()
    with pytest.raises(SystemExit):
        publish_cli.main(["--run", str(runs / "vq"), "--repo", "you/vq", "--dry-run", str(tmp_path / "a")])
    assert "holds no weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        publish_cli.main(["--run", str(tmp_path), "--repo", "you/x", "--dry-run", str(tmp_path / "b")])
    assert "no config.json" in capsys.readouterr().err
