"""Run folders on the Hugging Face Hub: fetch one by repo id (cached, revision pinnable, offline from the cache)
and publish one with a model card.

A published run is the run folder itself (config.json, weights, metrics.jsonl, a sample or reconstruction grid)
plus README.md (the model card); a stage-2 run carries its stage-1 tokenizer in `tokenizer/`, and its config
points there with a relative `data.vq_run`, so the repository alone is enough to sample.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .runs import CONFIG_NAME, EMA_WEIGHTS_NAME, METRICS_NAME, WEIGHTS_NAME, RunFolderError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FOLDER = "tokenizer"


class HubError(RuntimeError):
    """A Hub repository could not be fetched or published; the message says why and what to do."""


def looks_like_repo_id(text: str) -> bool:
    """`owner/name` that is not an existing local path."""
    return bool(REPO_ID.match(str(text))) and not Path(text).exists()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    try:
        from huggingface_hub import constants
    except ImportError:
        return env
    return bool(constants.HF_HUB_OFFLINE) or env


def fetch_run(source: str, revision: str | None = None) -> Path:
    """A local run folder for `source`: the path itself, or a Hub repo id downloaded into (or read from) the
    Hugging Face cache. Offline, only the cache is read, and a repo that is not there is one clear error."""
    if not looks_like_repo_id(source):
        return Path(source)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors
    except ImportError as err:
        raise HubError(f"{source!r} is not a local folder, and fetching it from the Hugging Face Hub needs "
                       "huggingface_hub: pip install huggingface_hub") from err
    offline = hub_offline()
    try:
        return Path(snapshot_download(source, revision=revision, local_files_only=offline))
    except errors.RepositoryNotFoundError as err:
        raise HubError(f"{source!r} is neither a local folder nor a Hub repository you can access (check the "
                       "spelling; private repositories need `hf auth login`)") from err
    except errors.RevisionNotFoundError as err:
        raise HubError(f"Hub repo {source!r} has no revision {revision!r}") from err
    except (errors.LocalEntryNotFoundError, OSError) as err:
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub could not be reached ({type(err).__name__})"
        raise HubError(f"Hub repo {source!r}{f' at {revision!r}' if revision else ''} is not in the Hugging Face "
                       f"cache and {why}: run once with network access (HF_HUB_OFFLINE unset), or point HF_HOME / "
                       "HF_HUB_CACHE at a cache that has it") from err


# ----------------------------------------------------------------------------------------------
# Publishing


def _copy_run_files(run_dir: Path, dest: Path) -> list[str]:
    """The files of a run that a user needs to sample or encode with: config, weights, metrics, preview grid."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (CONFIG_NAME, WEIGHTS_NAME, EMA_WEIGHTS_NAME, METRICS_NAME, "reconstructions.png"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
            copied.append(name)
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if grids:  # the latest preview grid
        shutil.copy2(grids[-1], dest / "samples.png")
        copied.append("samples.png")
    return copied


def _last_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def model_card(config: dict, metrics: dict, repo_id: str, files: list[str], tokenizer: dict | None) -> str:
    """README.md for a published run: what it is, how to use it, how it was made, what it measured."""
    stage = config["stage"]
    data = config.get("data", {})
    lines = [
        "---", "library_name: maskgit-toolkit", "tags: [maskgit, vq-vae, image-generation]", "---", "",
        f"# {repo_id}", "",
        ("A stage-2 MaskGIT transformer" if stage == "maskgit" else "A stage-1 VQ tokenizer") +
        f" trained with maskgit-toolkit (preset `{data.get('preset', '?')}`,"
        f" data `{Path(str(data.get('data', '?'))).name}`,"
        f" step {config.get('step', '?')}).", "",
        "## Use", "", "```bash",
    ]
    if stage == "maskgit":
        lines.append(f"python sample.py --checkpoint {repo_id} --out samples --num 64")
    else:
        lines.append(f"python train_maskgit.py --vq {repo_id} --out runs/maskgit")
    lines += ["```", ""]
    command = config.get("data", {}).get("command")
    if command:
        lines += ["## How it was trained", "", "```bash", " ".join(command), "```", ""]
        tokenizer_command = (tokenizer or {}).get("data", {}).get("command")
        if tokenizer_command:
            lines += ["on the tokenizer in `tokenizer/`, trained with", "", "```bash", " ".join(tokenizer_command),
                      "```", ""]
    lines += ["## Configuration", "", "```json", json.dumps({k: config.get(k) for k in ("model", "train")}, indent=1),
              "```", ""]
    if metrics:
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lines += ["## Last evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items()]
        lines.append("")
    if "samples.png" in files:
        lines += ["## Samples", "", "![samples](samples.png)", ""]
    if "reconstructions.png" in files:
        lines += ["## Reconstructions (originals above)", "", "![reconstructions](reconstructions.png)", ""]
    return "\n".join(lines)


def stage_for_upload(run_dir, staging, repo_id: str) -> Path:
    """Write what `publish` uploads into `staging`: the run's files, its tokenizer (stage 2) and README.md."""
    run_dir, staging = Path(run_dir), Path(staging)
    config_path = run_dir / CONFIG_NAME
    if not config_path.is_file():
        raise RunFolderError(f"{run_dir} has no {CONFIG_NAME}: pass a run folder written by train_vq.py or "
                             "train_maskgit.py")
    config = json.loads(config_path.read_text())
    if staging.exists() and any(staging.iterdir()):
        raise HubError(f"{staging} is not empty: pick a new folder")
    files = _copy_run_files(run_dir, staging)
    weights = [n for n in (WEIGHTS_NAME, EMA_WEIGHTS_NAME) if n in files]
    if not weights:
        raise RunFolderError(f"{run_dir} holds no weights yet (no {WEIGHTS_NAME}): publish a run that has saved")
    tokenizer = None
    vq_run = config.get("data", {}).get("vq_run")
    if config.get("stage") == "maskgit" and vq_run:
        vq_dir = Path(vq_run) if Path(vq_run).is_absolute() else run_dir / vq_run
        if not (vq_dir / CONFIG_NAME).is_file():
            raise RunFolderError(f"the tokenizer {vq_dir} that {run_dir} was trained on is missing: restore it")
        _copy_run_files(vq_dir, staging / TOKENIZER_FOLDER)
        tokenizer = json.loads((vq_dir / CONFIG_NAME).read_text())
        config["data"]["vq_run"] = TOKENIZER_FOLDER  # relative: resolved against the run folder when read
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (staging / "README.md").write_text(model_card(config, _last_metrics(run_dir), repo_id, files, tokenizer))
    return staging


def publish(run_dir, repo_id: str, *, private: bool = False, revision: str | None = None,
            message: str | None = None) -> str:
    """Upload a run folder (and its tokenizer) to the Hub as `repo_id`; returns the commit URL."""
    import tempfile

    if not REPO_ID.match(repo_id):
        raise HubError(f"--repo {repo_id!r}: expected owner/name")
    if hub_offline():
        raise HubError(f"cannot publish to {repo_id!r}: HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_for_upload(run_dir, Path(tmp) / "upload", repo_id)
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(staged), repo_id=repo_id, revision=revision,
                                     commit_message=message or f"Upload {Path(run_dir).name}")
        except Exception as err:  # noqa: BLE001 - network, auth, quota: one message for the user
            raise HubError(f"publishing {run_dir} to {repo_id!r} failed ({type(err).__name__}: {err}); check the "
                           "network and `hf auth login`") from err
    return str(getattr(info, "commit_url", info))
