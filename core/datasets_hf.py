"""Hugging Face `datasets` as an image source: `--data hf:NAME_OR_PATH[?option=value&...]` (docs/data.md).

    hf:/data/my_saved_dataset                  a folder written by Dataset(Dict).save_to_disk
    hf:imagenet-1k?test_split=validation       a Hub dataset (downloaded and prepared into the HF cache once)
    hf:/data/parquet_folder?image=img&label=none

Options: `split` (training split, default 'train'), `test_split` (held-out split; default: 'validation' or
'test' when the dataset has one, else `hash`: the rows whose sha1 of the row number is in the lowest 10% of
the training split, the rule of image folders), `image` (image column; default the first Image column),
`label` (label column; default 'label' or the first ClassLabel column; 'none' for unlabelled), `config`
(the dataset's configuration name).

Rows are read from the library's memory-mapped Arrow files (map-style datasets: random access is what the
step-seeded order needs); images are decoded by us, per item, in the DataLoader workers, with the same
preprocessing as image folders. `datasets` is optional: it is imported only for hf: sources.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.parse
from pathlib import Path

import numpy as np

from .data import (CONTENT_HASH_LIMIT, HF_PREFIX, StreamingDataset, split_mask_from_hashes)

OPTIONS = ("split", "test_split", "image", "label", "config")
HF_VERSION = 1  # bump when this source's rules change


class HFSourceError(ValueError):
    """An hf: source that cannot be used (bad syntax, missing package, offline, unknown column...)."""


def parse_spec(data: str) -> tuple[str, dict]:
    """'hf:PATH?k=v&...' -> (PATH, options), unknown options refused."""
    if not data.startswith(HF_PREFIX):
        raise HFSourceError(f"{data!r} is not an hf: source")
    body = data[len(HF_PREFIX):]
    path, _, query = body.partition("?")
    if not path:
        raise HFSourceError(f"{data!r}: name the dataset, e.g. hf:imagenet-1k or hf:/path/to/saved_dataset")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as err:
        raise HFSourceError(f"{data!r}: options must be ?key=value&key=value ({err})") from None
    options = dict(pairs)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise HFSourceError(f"{data!r}: unknown option(s) {unknown}; known: {list(OPTIONS)}")
    return path, options


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise HFSourceError("--data hf:... needs the Hugging Face `datasets` package: pip install datasets "
                            "(or pip install 'maskgit-toolkit[hf]')") from err
    return datasets


def _offline() -> bool:
    flags = [os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_error(name: str, err: Exception) -> HFSourceError:
    if _offline():
        return HFSourceError(
            f"hf:{name}: the Hub dataset {name!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
            f"forbids downloading it ({type(err).__name__}: {err}). Download it once with network access (unset "
            f"HF_HUB_OFFLINE), set HF_HOME / HF_DATASETS_CACHE to where it was downloaded, or pass a local copy "
            f"as hf:/path/to/folder (written by save_to_disk)")
    return HFSourceError(
        f"hf:{name}: could not load the Hub dataset {name!r} ({type(err).__name__}: {err}). Check the name and "
        f"your network; on a machine without network set HF_HUB_OFFLINE=1 to use the local Hugging Face cache "
        f"only, or pass a local copy as hf:/path/to/folder")


def _load_splits(path: str, options: dict) -> tuple[dict, str]:
    """{split name: datasets.Dataset} of the source (lazily memory-mapped), and a description for messages."""
    datasets = _import_datasets()
    local = Path(path).expanduser()
    config = options.get("config") or None
    if local.exists():
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            try:
                loaded = datasets.load_from_disk(str(local))
            except Exception as err:
                raise HFSourceError(f"hf:{path}: cannot read the saved dataset ({type(err).__name__}: {err})") from err
        else:
            try:
                loaded = datasets.load_dataset(str(local), name=config)
            except Exception as err:
                raise HFSourceError(f"hf:{path}: cannot load the folder with datasets.load_dataset "
                                    f"({type(err).__name__}: {err})") from err
        if isinstance(loaded, datasets.Dataset):
            return {options.get("split", "train"): loaded}, str(local)
        return dict(loaded), str(local)
    try:
        builder = datasets.load_dataset_builder(path, name=config)
        names = list(builder.info.splits or [])
        wanted = [options.get("split", "train")]
        test = options.get("test_split")
        if test and test != "hash":
            wanted.append(test)
        elif not test:
            wanted += [n for n in ("validation", "test") if n in names][:1]
        splits = {name: datasets.load_dataset(path, name=config, split=name) for name in wanted}
    except HFSourceError:
        raise
    except Exception as err:  # ConnectionError (offline), DatasetNotFoundError, FileNotFoundError, ...
        raise _hub_error(path, err) from err
    return splits, path


class HFDataset(StreamingDataset):
    """Rows of one split of a Hugging Face dataset, images decoded on demand."""

    source_kind = "hf"

    def __init__(self, spec: str, hf, split_name: str, image_column: str, rows: np.ndarray | None,
                 labels: np.ndarray, classes: list[str], image_size: int, split: str, **kwargs):
        super().__init__(labels, classes, image_size, name=f"{spec} [{split_name}{'' if rows is None else ' hash'}"
                                                             f" -> {split}]", **kwargs)
        self.spec, self.split_name, self.image_column, self.split = spec, split_name, image_column, split
        self._hf = hf  # image column only, decode=False: {"bytes", "path"} per row
        self._rows = rows  # rows of the Hugging Face split (None: all, in order)

    def _row(self, j: int) -> int:
        return int(self._rows[j]) if self._rows is not None else int(j)

    def _open(self, j: int):
        cell = self._hf[self._row(j)][self.image_column]
        if cell is None:
            raise ValueError("no image in this row")
        if cell.get("bytes") is not None:
            return io.BytesIO(cell["bytes"])
        return cell["path"]

    def item_name(self, j: int) -> str:
        return f"{self.spec} {self.split_name}[{self._row(j)}]"

    def fingerprint(self) -> str:
        rows = "all" if self._rows is None else hashlib.sha1(self._rows.tobytes()).hexdigest()
        return f"hf|v{HF_VERSION}|{self.spec}|{self.split_name}|{rows}|{_dataset_digest(self._hf)}"

    def _select(self, rows: np.ndarray) -> HFDataset:
        composed = rows if self._rows is None else self._rows[rows]
        return HFDataset(self.spec, self._hf, self.split_name, self.image_column, composed, self._labels[rows],
                         self.classes, self.image_size, self.split, crop=self.crop, crop_scale=self.crop_scale)


def _dataset_digest(hf) -> str:
    """The library's fingerprint plus the Arrow files: size, mtime, inode, and content (all, or head and tail)."""
    h = hashlib.sha1(str(getattr(hf, "_fingerprint", "")).encode())
    files = [Path(f["filename"]) for f in hf.cache_files]
    stats = [f.stat() for f in files]
    full = sum(st.st_size for st in stats) <= CONTENT_HASH_LIMIT
    for f, st in zip(files, stats):
        h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}:{'' if full else st.st_ino}".encode())
        with open(f, "rb") as fh:
            if full:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, st.st_size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def _columns(spec: str, hf, options: dict) -> tuple[str, str | None]:
    datasets = _import_datasets()
    features = hf.features
    image = options.get("image")
    if image is None:
        image = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        if image is None:
            raise HFSourceError(f"{spec}: no Image column among {list(features)}; name it with ?image=COLUMN")
    elif image not in features:
        raise HFSourceError(f"{spec}: no column {image!r}; columns: {list(features)}")
    label = options.get("label")
    if label is None:
        if "label" in features:
            label = "label"
        else:
            label = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    elif label.lower() == "none":
        label = None
    elif label not in features:
        raise HFSourceError(f"{spec}: no label column {label!r}; columns: {list(features)} (or ?label=none)")
    return image, label


def _labels(spec: str, hf, label: str | None, classes: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """int32 labels of every row and the class names (from a ClassLabel, integers, or sorted strings)."""
    datasets = _import_datasets()
    if label is None:
        return np.full(len(hf), -1, dtype=np.int32), []
    feature = hf.features[label]
    values = np.asarray(hf.with_format("numpy", columns=[label])[label])
    if isinstance(feature, datasets.ClassLabel):
        return values.astype(np.int32), list(feature.names)
    if values.dtype.kind in "iu":
        names = classes if classes is not None else [str(i) for i in range(int(values.max(initial=-1)) + 1)]
        return values.astype(np.int32), names
    names = classes if classes is not None else sorted({str(v) for v in values.tolist()})
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup.get(str(v), -1) for v in values.tolist()], dtype=np.int32), names


def load_hf(data: str, image_size: int, split: str, **kwargs) -> HFDataset:
    """One split ('train' or 'test') of an hf: source as a streamed dataset."""
    path, options = parse_spec(data)
    splits, where = _load_splits(path, options)
    datasets = _import_datasets()
    train_name = options.get("split", "train")
    if train_name not in splits:
        raise HFSourceError(f"{data}: no split {train_name!r} in {where}; splits: {sorted(splits)} (?split=NAME)")
    test_name = options.get("test_split")
    if test_name is None:
        test_name = next((n for n in ("validation", "test") if n in splits and n != train_name), "hash")
    if test_name != "hash" and test_name not in splits:
        raise HFSourceError(f"{data}: no split {test_name!r} in {where}; splits: {sorted(splits)} "
                            f"(?test_split=NAME, or ?test_split=hash for 10% of the training split)")
    train = splits[train_name]
    image, label = _columns(data, train, options)
    classes = _labels(data, train, label, None)[1] if label else []
    name = train_name if (split == "train" or test_name == "hash") else test_name
    hf = splits[name]
    if image not in hf.features:
        raise HFSourceError(f"{data}: split {name!r} has no column {image!r}")
    labels, _ = _labels(data, hf, label if label in hf.features else None, classes)
    if label and label not in hf.features:
        labels = np.full(len(hf), -1, dtype=np.int32)
    rows = None
    if test_name == "hash":
        u = np.fromiter((int.from_bytes(hashlib.sha1(str(r).encode()).digest()[:8], "big") / 2**64
                         for r in range(len(hf))), dtype=np.float64, count=len(hf))
        rows = np.flatnonzero(split_mask_from_hashes(u, split)).astype(np.int64)
        labels = labels[rows]
    hf = hf.select_columns([image]).cast_column(image, datasets.Image(decode=False))
    if len(labels) == 0:
        raise ValueError(f"{data}: the {split!r} split ({name}) has no rows")
    return HFDataset(data, hf, name, image, rows, labels, classes, image_size, split, **kwargs)


def hf_fingerprint(data: str) -> str:
    """Digest of an hf: source's content (both splits), for dataset_fingerprint."""
    parts = [load_hf(data, 1, split).fingerprint() for split in ("train", "test")]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
