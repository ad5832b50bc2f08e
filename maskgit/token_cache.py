"""Stage 2 trains on code grids, not pixels: the dataset is encoded once with the tokenizer and cached on disk.

A cache file is keyed on the tokenizer's weights and config, the dataset's content and the split, so it is
rebuilt whenever any of them changes. Training splits are encoded twice, as given and mirrored, so that
horizontal-flip augmentation costs nothing at training time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from core.data import dataset_fingerprint

CACHE_VERSION = 1


def cache_key(vq_run, data: str, image_size: int, split: str, root: str | None, flips: bool) -> str:
    """Digest of everything the cached codes depend on."""
    digest = hashlib.sha256()
    vq_run = Path(vq_run)
    digest.update((vq_run / "config.json").read_bytes())
    with open(vq_run / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    meta = {"version": CACHE_VERSION, "data": dataset_fingerprint(data, image_size, root), "split": split,
            "flips": flips}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def encode_dataset(vq, dataset, *, flips: bool, device, batch_size: int = 256, progress: bool = True):
    """Codes (N, V, h, w) with V = 2 views (as given, mirrored) when `flips`, else 1; labels (N,)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    codes, labels = [], []
    for images, batch_labels in tqdm(loader, desc="encoding dataset", disable=not progress):
        images = images.to(device)
        views = [images, images.flip(-1)] if flips else [images]
        codes.append(torch.stack([vq.encode(v) for v in views], dim=1).cpu())  # (b, V, h, w)
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(codes), torch.cat(labels).long()


def load_or_build(cache_dir, key: str, build) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Cached (codes, labels, class names) for `key`; `build()` makes them when absent or damaged."""
    path = Path(cache_dir) / f"codes-{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as fh:
                classes = json.loads(fh.metadata()["classes"])
                return fh.get_tensor("codes").long(), fh.get_tensor("labels").long(), classes
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            print(f"token cache {path} is unreadable ({err}); rebuilding it")
    codes, labels, classes = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    store = codes.to(torch.int16 if codes.max() < 2**15 else torch.int32)  # codes are small ints
    save_file({"codes": store.contiguous(), "labels": labels.contiguous()}, str(tmp),
              metadata={"classes": json.dumps(classes)})
    os.replace(tmp, path)
    return codes, labels, classes
