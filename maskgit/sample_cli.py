"""`sample.py`: sample images from a trained stage-2 run: a PNG folder and an npz for FID, a preview grid, and
every setting.

    python sample.py --checkpoint runs/maskgit --out samples/mg --num 50000 --cfg 1.0
    accelerate launch --multi_gpu --num_processes 8 sample.py --checkpoint runs/maskgit --out samples/mg --num 50000
    python sample.py --checkpoint runs/maskgit --out samples/edit --num 16 --init-image x.png --mask-box 8,8,24,24

writes OUT/images/000000.png ... (lossless, at training resolution; file name = sample index), OUT/samples.npz
(`arr_0` uint8 (N, H, W, 3), and `labels` (N,) for a class-conditional model), OUT/grid.png (one row per class)
and OUT/meta.json (checkpoint, step and every setting). meta.json is written last: while OUT/INCOMPLETE exists
(sampling runs, or stopped early: a full disk, a kill) the folder is not a finished sample set.

Sample i lies in batch i // batch_size, and batch b draws from its own generator seeded by (seed, b); processes
take batches round-robin. The output therefore depends on the seed, the settings and the batch size, but not on
the number of processes. With several processes OUT must be one folder that all of them can write to.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap, write_array
from PIL import Image
from tqdm.auto import tqdm

from core.accel import make_accelerator
from core.cli import check_out_path, finite_float, fail
from core.images import save_image_grid, to_uint8
from core.lock import locked_folder
from core.hub import HubError, fetch_run
from core.runs import DISK_FULL_ERRNOS, Run, RunFolderError, atomic_write_text, is_disk_full

from . import STAGE, load_maskgit
from .config import MaskGITConfig
from .editing import box_mask, cell_pixels, image_mask, keep_mask, token_mask
from .sampler import CFG_SCHEDULES, STRATEGIES, CompiledSampler, SamplerConfig, sample
from .schedules import SCHEDULES
from .tune import MEASURED, setting_text

DEFAULTS = SamplerConfig()
TMP_ARRAY = ".samples.tmp.npy"  # filled row by row by every process, then stored into samples.npz
INCOMPLETE = "INCOMPLETE"  # present while OUT is being written, and left behind when sampling stopped early
GRID_WIDTH = 8  # images per row of the preview grids


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("`: ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="stage-2 run folder written by train_maskgit.py, or a Hub repo id (owner/name) published "
                        "with publish.py")
    p.add_argument("--revision", help="with a Hub repo id: the branch, tag or commit to use (default: main)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (part of the seed rule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="cls", metavar="C",
                   help="'all' (balanced: sample i gets class i %% C; the default for a conditional model), a class "
                        "name, or a class index")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--trajectory", action="store_true",
                   help="also write OUT/trajectory.png: the state after each step of the first (up to) 8 samples")
    p.add_argument("--overwrite", action="store_true", help="replace PNGs an earlier run left in OUT/images")
    p.add_argument("--cpu", action="store_true", help="sample on the CPU even when a GPU is present")
    s = p.add_argument_group("sampler (maskgit.sampler.SamplerConfig)")
    s.add_argument("--steps", type=int, default=DEFAULTS.steps, help="decoding steps = transformer passes")
    s.add_argument("--sampler", dest="strategy", choices=STRATEGIES, default=DEFAULTS.strategy,
                   help="which drawn tokens to keep each step: most confident, judged right by the critic, "
                        "or next in Halton order")
    s.add_argument("--schedule", choices=SCHEDULES, help="mask schedule (default: the one the model trained with)")
    s.add_argument("--temperature", type=finite_float,
                   help="softmax temperature at the first step (<= 0: argmax; default: the run's measured "
                        f"default, else {DEFAULTS.temperature:g})")
    s.add_argument("--temperature-end", type=finite_float, help="temperature at the last step, linearly annealed "
                                                         "(default: = --temperature, constant)")
    s.add_argument("--choice-temperature", type=finite_float,
                   help="Gumbel noise on the confidences, annealed to 0 (default: the run's measured default, else "
                        f"{DEFAULTS.choice_temperature:g})")
    s.add_argument("--critic-noise", type=finite_float, default=DEFAULTS.critic_noise,
                   help="Gumbel noise on the critic's scores (--sampler critic), annealed to 0")
    s.add_argument("--top-k", type=int, default=DEFAULTS.top_k, help="draw among the k likeliest codes only")
    s.add_argument("--top-p", type=finite_float, default=DEFAULTS.top_p, help="nucleus sampling mass")
    s.add_argument("--cfg", type=finite_float,
                   help="classifier-free guidance scale w: cond + w (cond - uncond); 0 = off (default: the run's "
                        f"measured default, else {DEFAULTS.cfg:g})")
    s.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default=DEFAULTS.cfg_schedule,
                   help="constant w, or linear from 0 at the first step to w at the last")
    s.add_argument("--remask", action=argparse.BooleanOptionalAction,
                   help="let later steps re-mask tokens drawn earlier (default: the run's measured default, else "
                        "off; never with --sampler halton)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer forward (GPU; off by default: whether it pays is measured by "
                        "bench/gpu_check.py; on the CPU sampling runs eagerly, with a note)")
    s.add_argument("--cuda-graphs", action="store_true",
                   help="replay each batch's whole fixed-shape run from a CUDA graph captured once (GPU; same codes "
                        "for the same seed up to rounding; off by default, measured by bench/gpu_check.py; on the "
                        "CPU, or when editing or writing a trajectory, sampling runs eagerly, with a note)")
    e = p.add_argument_group("editing: regenerate part of an image")
    e.add_argument("--init-image", type=Path, metavar="PATH", help="image to edit, at exactly the training resolution")
    region = e.add_mutually_exclusive_group()
    region.add_argument("--mask-box", metavar="X0,Y0,X1,Y1",
                        help="x0,y0,x1,y1: pixel box to regenerate (x1, y1 exclusive)")
    region.add_argument("--mask-image", type=Path, metavar="PATH",
                        help="lossless mask picture of the same size: non-zero pixels are regenerated")
    e.add_argument("--invert-mask", action="store_true", help="regenerate outside the region instead (outpainting)")
    args = p.parse_args(argv)
    args.command = ["sample.py", *(sys.argv[1:] if argv is None else map(str, argv))]  # for meta.json
    return args


def check_args(args) -> None:
    """Argument problems that need no model."""
    check_out_path(args.out)
    for flag, value in (("--num", args.num), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    if (args.mask_box or args.mask_image) and not args.init_image:
        fail(f"{'--mask-box' if args.mask_box else '--mask-image'} marks a region of --init-image: pass --init-image")
    if args.init_image and not (args.mask_box or args.mask_image):
        fail("--init-image needs --mask-box x0,y0,x1,y1 or --mask-image PATH: the region to regenerate")
    if args.invert_mask and not args.init_image:
        fail("--invert-mask needs --init-image and a region (--mask-box or --mask-image)")


def measured_defaults(args, run: Run) -> tuple[dict, str]:
    """{cfg, temperature, choice_temperature, remask} to sample with, and where they came from: the command line,
    else the defaults the run measured at the end of training (config.json "sampling", maskgit.tune; runs from
    before the choice temperature or re-masking joined the measurement recorded none), else SamplerConfig's."""
    measured = run.config.get("sampling") or {}
    kinds = {"remask": bool}
    values = {name: getattr(args, name) if getattr(args, name) is not None else
              kinds.get(name, float)(measured.get(name, getattr(DEFAULTS, name))) for name in MEASURED}
    if run.config.get("num_classes", 0) == 0 and args.cfg is None:
        values["cfg"] = DEFAULTS.cfg  # guidance needs classes
    if args.strategy == "halton" and args.remask is None:
        values["remask"] = False  # the fixed order takes nothing back; the measurement used the confidence order
    if measured and any(getattr(args, name) is None for name in MEASURED):
        source = (f"measured at the end of training ({measured.get('metric', 'FD')} on held-out data at "
                  f"{measured.get('steps', '?')} steps; see config.json \"sampling\")")
    elif measured:
        source = "given on the command line"
    else:
        source = "built-in defaults (this run recorded no measured ones)"
    return values, source


def sampler_config(args, run: Run) -> SamplerConfig:
    """SamplerConfig from the command line (its own validation applies); the schedule defaults to the model's,
    guidance, temperature, choice temperature and re-masking to the run's measured defaults."""
    values, source = measured_defaults(args, run)
    try:
        config = SamplerConfig(
            steps=args.steps, strategy=args.strategy, schedule=args.schedule or run.model["schedule"],
            temperature=values["temperature"],
            temperature_end=values["temperature"] if args.temperature_end is None else args.temperature_end,
            choice_temperature=values["choice_temperature"], critic_noise=args.critic_noise, top_k=args.top_k,
            top_p=args.top_p, cfg=values["cfg"], cfg_schedule=args.cfg_schedule, remask=values["remask"],
        )
    except ValueError as err:
        fail(f"sampler setting: {err}")
    print(f"sampling with {setting_text(values)}: {source}")
    return config


def read_run(path) -> Run:
    """The stage-2 run, with the settings sampling reads from it checked before any work starts."""
    try:
        run = Run.open(path, STAGE)
        for name in ("image_size", "grid", "classes", "num_classes", "codebook_size", "tokenizer_source"):
            getattr(run, name)  # raises RunFolderError when the value is missing, of the wrong type or out of range
        run.model_config(MaskGITConfig)
        return run
    except (RunFolderError, KeyError, TypeError, ValueError) as err:
        fail(f"--checkpoint: {err}")


def check_model_fits(cfg: SamplerConfig, run: Run, checkpoint) -> None:
    """Settings the trained model cannot serve."""
    if cfg.strategy == "critic" and run.model.get("critic", "none") == "none":
        fail(f"--sampler critic needs a token critic, but {checkpoint} was trained without one (critic 'none'): "
             "use --sampler confidence or halton, or train a model with --critic self")
    if cfg.cfg > 0 and not run.num_classes:
        fail(f"--cfg {cfg.cfg} needs a class-conditional model; this one is unconditional: use --cfg 0")


def resolve_labels(cls: str | None, run: Run, num: int) -> tuple[torch.Tensor | None, str]:
    """Labels (num,) int64 (None for an unconditional model) and the rule that made them, for meta.json."""
    num_classes, names = run.num_classes, run.classes
    if not num_classes:
        if cls is not None:
            fail(f"--class {cls}: the model is unconditional (trained with --class-cond false), it takes no class")
        return None, "unconditional"
    if cls is None or cls == "all":
        return torch.arange(num) % num_classes, f"balanced: sample i has class i % {num_classes}"
    if cls in names:  # a name first: class folders may be named by numbers ("0", "1", ..., "10" sorts before "2")
        index = names.index(cls)
    elif cls.lstrip("-").isdigit():
        index = int(cls)
        if not 0 <= index < num_classes:
            fail(f"--class {index} is out of range: the model has {num_classes} classes, 0..{num_classes - 1}")
    else:
        fail(f"--class {cls!r} is no class of this model: use 'all', an index 0..{num_classes - 1}, or one of {names}")
    return torch.full((num,), index), f"every sample: class {index} ({names[index]!r})"


def read_picture(path: Path, size: int, what: str) -> np.ndarray:
    """uint8 (H, W, 3) pixels of an image file that must be size x size."""
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS and refuses twice that: refuse both, before decoding
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                pixels = np.array(im.convert("RGB"))  # a writable copy
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        fail(f"{what} {path}: refusing to decode it, its size is too large to be safe ({err}); the model works "
             f"at {size}x{size} pixels: resize or crop the image to that first")
    except (OSError, ValueError) as err:
        fail(f"{what} {path}: cannot read it as an image ({err})")
    if pixels.shape[:2] != (size, size):
        fail(f"{what} {path} is {pixels.shape[1]}x{pixels.shape[0]} pixels, but the model works at {size}x{size}: "
             f"resize or crop it to {size}x{size} first (sample.py does not resize)")
    return pixels


def parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        fail(f"--mask-box {text!r}: expected four integers x0,y0,x1,y1 (pixels, x1 and y1 exclusive)")
    return x0, y0, x1, y1


def edit_request(args, run: Run) -> tuple[np.ndarray, torch.Tensor] | None:
    """(init image uint8 (H, W, 3), keep (h*w,) bool) for --init-image, checked before any model is loaded."""
    if not args.init_image:
        return None
    size = run.image_size
    pixels = read_picture(args.init_image, size, "--init-image")
    try:
        if args.mask_box:
            region = box_mask(parse_box(args.mask_box), size, size)
        else:
            region = image_mask(torch.from_numpy(read_picture(args.mask_image, size, "--mask-image")))
    except ValueError as err:
        fail(f"{'--mask-box' if args.mask_box else '--mask-image'}: {err}")
    keep = keep_mask(token_mask(region, run.grid), args.invert_mask)  # (h*w,)
    if keep.all():
        fail("the region covers no pixel to regenerate" + (" (with --invert-mask it covers the whole image)"
                                                           if args.invert_mask else ""))
    return pixels, keep


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix new PNGs with an earlier run's (extra files would skew FID) unless told to replace them."""
    old = next((out / "images").glob("*.png"), None) if (out / "images").is_dir() else None
    if old is not None and not overwrite:
        fail(f"{out / 'images'} already holds PNG files from an earlier run: pick a new --out or pass --overwrite")


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The CPU generator of batch `batch`: a function of (seed, batch) only, whichever process draws it."""
    digest = hashlib.sha256(f"sample.py/{seed}/{batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def batch_rows(num: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, num)) for start in range(0, num, batch_size)]


@torch.no_grad()
def decode(tokenizer, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Codes (b, h*w) -> images (b, 3, H, W) in [-1, 1]."""
    return tokenizer.decode(codes.view(len(codes), *grid)).clamp(-1, 1)


def png_name(index: int, num: int) -> str:
    return f"{index:0{max(6, len(str(num - 1)))}d}.png"


def write_pngs(pixels: np.ndarray, rows: range, folder: Path, num: int, pool: ThreadPoolExecutor) -> None:
    """uint8 (b, H, W, 3) as lossless PNGs named by global sample index (PIL frees the GIL while compressing)."""
    list(pool.map(lambda i: Image.fromarray(pixels[i - rows.start]).save(folder / png_name(i, num)), rows))


def write_trajectory(tokenizer, model, states: list[torch.Tensor], path: Path) -> None:
    """Rows = the first (up to) 8 samples, columns = steps; masked tokens are painted as mid-grey cells."""
    states = torch.stack([s[:GRID_WIDTH] for s in states], dim=1)  # (m, steps, n)
    m, steps, n = states.shape
    masked = states.reshape(m * steps, n) == model.mask_id  # (m*steps, n)
    images = decode(tokenizer, states.reshape(m * steps, n).masked_fill(masked, 0), model.grid)  # any code will do
    f = images.shape[-1] // model.grid[1]
    grey = cell_pixels(masked.view(-1, *model.grid), f)[:, None]  # (m*steps, 1, H, W)
    save_image_grid(images.masked_fill(grey, 0.0).cpu(), path, nrow=steps)  # 0 is mid-grey in [-1, 1]


def grid_layout(labels: torch.Tensor | None, num: int) -> tuple[list[int], int]:
    """Sample indices for the preview grid and its row length: the first k of each class, one row per class."""
    if labels is None or len(labels.unique()) == 1:
        return list(range(min(num, GRID_WIDTH * GRID_WIDTH))), GRID_WIDTH
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in labels.unique().tolist()]
    k = min(GRID_WIDTH, min(map(len, per_class)))
    return [i for rows in per_class for i in rows[:k]], k


def write_npz(array_path: Path, labels: torch.Tensor | None, path: Path) -> None:
    """samples.npz from the .npy on disk (copied in chunks, never loaded whole), plus the labels; then drop the .npy."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(array_path, arcname="arr_0.npy")
            if labels is not None:
                with zf.open("labels.npy", "w", force_zip64=True) as fh:
                    write_array(fh, labels.numpy().astype(np.int64))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    array_path.unlink()


def sample_all(args, accelerator, model, tokenizer, cfg, labels, edit, array) -> None:
    """This process's batches (every num_processes-th), each written to its PNGs and its rows of `array`."""
    device = accelerator.device
    rows_of = batch_rows(args.num, args.batch_size)
    rank, world = accelerator.process_index, accelerator.num_processes
    init_codes = keep = None
    if edit is not None:
        image = torch.from_numpy(edit[0]).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1  # (1, 3, H, W)
        init_codes, keep = tokenizer.encode(image).flatten(1), edit[1][None].to(device)  # (1, n) each
    progress = tqdm(total=args.num, unit="img", desc="sample", disable=not accelerator.is_main_process)
    draw = CompiledSampler(args.compile, args.cuda_graphs) if args.compile or args.cuda_graphs else sample
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for first in range(0, len(rows_of), world):  # one round: batches first .. first + world - 1
            batch = first + rank
            if batch < len(rows_of):
                rows = rows_of[batch]
                trajectory = args.trajectory and batch == 0
                out = draw(model, len(rows), None if labels is None else labels[rows.start:rows.stop].to(device),
                           cfg, init_codes=init_codes, keep=keep, generator=batch_generator(args.seed, batch),
                           return_trajectory=trajectory)
                codes, states = out if trajectory else (out, None)
                pixels = to_uint8(decode(tokenizer, codes, model.grid)).cpu().numpy()  # (b, H, W, 3)
                array[rows.start:rows.stop] = pixels
                write_pngs(pixels, rows, args.out / "images", args.num, pool)
                if states is not None:
                    write_trajectory(tokenizer, model, states, args.out / "trajectory.png")
            progress.update(sum(len(r) for r in rows_of[first:first + world]))
    progress.close()
    array.flush()


def write_summary(args, run: Run, cfg: SamplerConfig, labels, label_rule: str, array, num_processes: int) -> None:
    """grid.png, samples.npz and meta.json, by the main process once every process is done."""
    indices, nrow = grid_layout(labels, args.num)
    grid = torch.from_numpy(np.ascontiguousarray(array[indices])).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(grid, args.out / "grid.png", nrow=nrow)
    meta = {
        "checkpoint": str(Path(args.checkpoint).resolve()), "step": run.step,
        "ema": not args.no_ema and run.has_ema, "tokenizer": run.tokenizer_source,
        "sampler": dataclasses.asdict(cfg), "seed": args.seed, "num": args.num, "batch_size": args.batch_size,
        "num_processes": num_processes, "labels": label_rule, "classes": run.classes,
        "seed_rule": "batch b = samples b*batch_size.. draws from torch.Generator().manual_seed(first 63 bits of "
                     "sha256('sample.py/{seed}/{b}')) (see sample.batch_generator)",
        "image_size": run.image_size, "grid": list(run.grid),
        "edit": None if not args.init_image else {
            "init_image": str(args.init_image.resolve()), "mask_box": args.mask_box,
            "mask_image": str(args.mask_image.resolve()) if args.mask_image else None, "invert": args.invert_mask},
        "torch": torch.__version__, "command": args.command,
    }
    write_npz(args.out / TMP_ARRAY, labels, args.out / "samples.npz")
    atomic_write_text(args.out / "meta.json", json.dumps(meta, indent=2) + "\n")  # last: the folder is complete
    (args.out / INCOMPLETE).unlink(missing_ok=True)


def open_array(accelerator, out: Path, shape: tuple) -> np.ndarray:
    """The (N, H, W, 3) uint8 .npy on disk every process writes its rows into; created by the main process."""
    path = out / TMP_ARRAY
    if accelerator.is_main_process:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / INCOMPLETE).write_text("sample.py is writing this folder, or stopped before it finished: it is a "
                                      "complete sample set only once this file is gone and meta.json exists\n")
        (out / "meta.json").unlink(missing_ok=True)  # an earlier run's (only with --overwrite)
        for stale in (out / "images").glob("*.png"):  # only with --overwrite (check_out)
            stale.unlink()
        open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        reserve(path)
    accelerator.wait_for_everyone()
    return open_memmap(path, mode="r+")


def reserve(path: Path) -> None:
    """Allocate a file's blocks now: a memory-mapped write to a full disk would kill the process (SIGBUS) later."""
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as err:
            if err.errno in DISK_FULL_ERRNOS:
                raise
            # the file system cannot preallocate (EOPNOTSUPP, EINVAL): write as before


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    try:
        args.checkpoint = fetch_run(args.checkpoint, args.revision)  # a Hub repo id: its cached snapshot
    except HubError as err:
        fail(f"--checkpoint: {err}")
    run = read_run(args.checkpoint)
    cfg = sampler_config(args, run)
    check_model_fits(cfg, run, args.checkpoint)
    labels, label_rule = resolve_labels(args.cls, run, args.num)
    edit = edit_request(args, run)
    check_out(args.out, args.overwrite)
    with locked_folder(args.out):  # one sampling run per --out folder (core.lock)
        try:
            sample_to(args, run, cfg, labels, label_rule, edit)
        except Exception as err:
            if not is_disk_full(err):
                raise
            for partial in (args.out / TMP_ARRAY, args.out / ".samples.npz.tmp"):  # give the space back
                partial.unlink(missing_ok=True)
            fail(f"no space left on device while writing samples to {args.out} ({type(err).__name__}: {err}): the "
                 f"output is incomplete, as {args.out / INCOMPLETE} says (no meta.json was written); free some "
                 "space, then sample again with --overwrite", code=1)


def sample_to(args, run: Run, cfg: SamplerConfig, labels, label_rule: str, edit) -> None:
    """Load the model and write every output file (the checks of `main` passed)."""
    accelerator = make_accelerator(args.out, mixed_precision="no", grad_accum=1, cpu=args.cpu)
    try:
        model, tokenizer, run = load_maskgit(args.checkpoint, accelerator.device, ema=not args.no_ema)
    except RunFolderError as err:
        fail(f"--checkpoint: {err}")
    size = run.image_size
    array = open_array(accelerator, args.out, (args.num, size, size, 3))
    sample_all(args, accelerator, model, tokenizer, cfg, labels, edit, array)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_summary(args, run, cfg, labels, label_rule, array, accelerator.num_processes)
        print(f"wrote {args.num} samples to {args.out / 'images'}, {args.out / 'samples.npz'} and "
              f"{args.out / 'grid.png'}")
    accelerator.wait_for_everyone()

