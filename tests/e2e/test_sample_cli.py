"""sample.py end to end on tiny trained runs, and the editing helpers (maskgit/editing.py) it builds on."""

import json
import subprocess
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import launch_args, run_script
from maskgit import MaskGITConfig, SamplerConfig, build_maskgit, load_maskgit, sample
import maskgit.train
import vqvae.train
from core.runs import Run
from maskgit import sample_cli as cli
from maskgit.editing import box_mask, cell_pixels, image_mask, keep_mask, token_mask
from core.data import SHAPES_CLASSES, make_shapes
from core.images import to_uint8

SIZE, F = 16, 4  # training resolution and tokenizer factor of the tiny runs: 4x4 code grids
VQ_ARGS = ["--image-size", SIZE, "--channels", 16, "--max-channels", 32, "--norm-groups", 8, "--num-res-blocks", 1,
           "--latent-dim", 8, "--codebook-size", 64, "--kmeans-iters", 2, "--steps", 20, "--batch-size", 16,
           "--num-eval-images", 16, "--eval-every", 20, "--save-every", 20, "--num-workers", 0]
MG_ARGS = ["--steps", 10, "--dim", 32, "--depth", 1, "--heads", 2, "--batch-size", 16, "--num-eval-images", 16,
           "--eval-every", 10, "--sample-every", 10, "--save-every", 10, "--num-sample-images", 10, "--num-workers", 0]
NUM, BATCH, STEPS = 23, 8, 4  # a last batch smaller than the others, and more batches than processes




def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A tokenizer and two stage-2 runs on 40 labelled 16px shapes, trained in this process (seconds):
    class-conditional without a critic, and unconditional with a self critic."""
    root = tmp_path_factory.mktemp("sample_cli")
    images, labels = make_shapes(40, SIZE)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / "data" / SHAPES_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    vqvae.train.main(["--data", str(root / "data"), "--out", str(root / "vq"), *map(str, VQ_ARGS)])
    train_maskgit = maskgit.train
    train_maskgit.main(["--vq", str(root / "vq"), "--out", str(root / "cond"), *map(str, MG_ARGS)])
    train_maskgit.main(["--vq", str(root / "vq"), "--out", str(root / "uncond"), *map(str, MG_ARGS),
                        "--class-cond", "false", "--critic", "self"])
    init = root / "init.png"
    Image.fromarray(images[3].permute(1, 2, 0).numpy()).save(init)
    return {"root": root, "vq": root / "vq", "cond": root / "cond", "uncond": root / "uncond", "init": init}


def sample_args(run: Path, out: Path, *extra) -> list[str]:
    return ["--checkpoint", str(run), "--out", str(out), "--num", str(NUM), "--batch-size", str(BATCH),
            "--steps", str(STEPS), *map(str, extra)]


@pytest.fixture(scope="module")
def first(runs, tmp_path_factory) -> Path:
    """One in-process run of the conditional model (with --trajectory), shared by several tests."""
    out = tmp_path_factory.mktemp("first") / "out"
    cli.main(sample_args(runs["cond"], out, "--trajectory"))
    return out


def load_npz(out: Path) -> dict:
    with np.load(out / "samples.npz") as data:
        return {k: data[k] for k in data.files}


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def grid_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) of a torchvision image grid of 16px images with 2px padding."""
    return cols * (SIZE + 2) + 2, rows * (SIZE + 2) + 2


# ------------------------------------------------------------------------------------------- outputs


@pytest.mark.slow
def test_npz_holds_uint8_images_and_balanced_labels(first):
    data = load_npz(first)
    assert set(data) == {"arr_0", "labels"}
    assert data["arr_0"].shape == (NUM, SIZE, SIZE, 3) and data["arr_0"].dtype == np.uint8
    assert data["labels"].dtype == np.int64 and data["labels"].shape == (NUM,)
    counts = np.bincount(data["labels"], minlength=10)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1
    assert (data["labels"] == np.arange(NUM) % 10).all()  # the documented rule
    assert data["arr_0"].std() > 0  # decoded images, not an untouched buffer
    assert not (first / cli.TMP_ARRAY).exists()


@pytest.mark.slow
def test_sampling_defaults_are_the_runs_measured_ones_unless_given(runs, tmp_path, capsys):
    """sample.py takes cfg, temperature, choice temperature and re-masking from the run's config.json "sampling"
    (measured at the end of training), says so, and lets the command line override each; a run without them uses
    the built-in ones."""
    config = json.loads((runs["cond"] / "config.json").read_text())
    measured = config["sampling"]
    key = ("cfg", "temperature", "choice_temperature", "remask")
    # the tiny preset's grid: guidance 1, 2 x temperature 1 x choice temperature 4.5 x re-masking on
    assert [tuple(s[k] for k in key) for s in measured["scores"]] == [(w, 1.0, 4.5, True) for w in (1.0, 2.0)]
    assert tuple(measured[k] for k in key) in {tuple(s[k] for k in key) for s in measured["scores"]}

    def sampler_used(run, *extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        cli.main(["--checkpoint", str(run), "--out", str(out), "--num", "2", "--batch-size", "2", "--steps", "2",
                  *extra])
        return json.loads((out / "meta.json").read_text())["sampler"], capsys.readouterr().out

    sampler, err = sampler_used(runs["cond"])
    assert (sampler["cfg"], sampler["temperature"]) == (measured["cfg"], measured["temperature"])
    assert "measured at the end of training" in err
    sampler, err = sampler_used(runs["cond"], "--cfg", "0.5")
    assert (sampler["cfg"], sampler["temperature"]) == (0.5, measured["temperature"])
    assert sampler["choice_temperature"] == measured["choice_temperature"]
    sampler, err = sampler_used(runs["cond"], "--cfg", "0.5", "--temperature", "0.9")
    assert (sampler["cfg"], sampler["temperature"]) == (0.5, 0.9) and "measured at the end of training" in err
    assert sampler["choice_temperature"] == measured["choice_temperature"]
    assert sampler["remask"] == measured["remask"]
    sampler, err = sampler_used(runs["cond"], "--cfg", "0.5", "--temperature", "0.9", "--choice-temperature", "1.5",
                                "--remask" if not measured["remask"] else "--no-remask")
    assert (sampler["cfg"], sampler["temperature"], sampler["choice_temperature"]) == (0.5, 0.9, 1.5)
    assert sampler["remask"] != measured["remask"] and "given on the command line" in err

    old = tmp_path / "old_run"
    old.mkdir()
    for f in runs["cond"].iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    del config["sampling"]
    (old / "config.json").write_text(json.dumps(config))
    sampler, err = sampler_used(old)
    assert (sampler["cfg"], sampler["temperature"], sampler["choice_temperature"]) == (
        SamplerConfig().cfg, SamplerConfig().temperature, SamplerConfig().choice_temperature)
    assert "built-in defaults" in err
    # a run measured before the choice temperature and re-masking joined the grid: its cfg and temperature, the
    # sampler's choice temperature and re-masking
    del measured["choice_temperature"], measured["remask"]
    config["sampling"] = measured
    (old / "config.json").write_text(json.dumps(config))
    sampler, err = sampler_used(old)
    assert (sampler["cfg"], sampler["temperature"], sampler["choice_temperature"], sampler["remask"]) == (
        measured["cfg"], measured["temperature"], SamplerConfig().choice_temperature, SamplerConfig().remask)
    # re-masking measured on: used, said, and left out for the fixed halton order (which takes nothing back)
    config["sampling"] = {**measured, "remask": True}
    (old / "config.json").write_text(json.dumps(config))
    sampler, err = sampler_used(old)
    assert sampler["remask"] is True and ", remask: measured at the end of training" in err
    sampler, err = sampler_used(old, "--sampler", "halton")
    assert sampler["remask"] is False and sampler["strategy"] == "halton"
    sampler, err = sampler_used(old, "--no-remask")
    assert sampler["remask"] is False and sampler["cfg"] == measured["cfg"]


@pytest.mark.slow
def test_pngs_are_named_by_index_and_equal_the_npz(first):
    names = sorted(p.name for p in (first / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(NUM)]
    arr = load_npz(first)["arr_0"]
    for i, name in enumerate(names):
        assert np.array_equal(read_png(first / "images" / name), arr[i])


@pytest.mark.slow
def test_meta_records_the_settings(first, runs):
    meta = json.loads((first / "meta.json").read_text())
    assert meta["checkpoint"] == str(runs["cond"].resolve())
    assert meta["step"] == 10 and meta["ema"] is True
    measured = json.loads((runs["cond"] / "config.json").read_text())["sampling"]  # recorded by train_maskgit
    expected = SamplerConfig(steps=STEPS, cfg=measured["cfg"], temperature=measured["temperature"],
                             temperature_end=measured["temperature"],
                             choice_temperature=measured["choice_temperature"], remask=measured["remask"])
    assert meta["sampler"] == {f.name: getattr(expected, f.name) for f in fields(SamplerConfig)}
    assert (meta["seed"], meta["num"], meta["batch_size"], meta["num_processes"]) == (0, NUM, BATCH, 1)
    assert "i % 10" in meta["labels"] and meta["torch"] == torch.__version__
    assert meta["command"][:3] == ["sample.py", "--checkpoint", str(runs["cond"])]


@pytest.mark.slow
def test_grid_has_one_row_per_class(first):
    # 23 balanced samples over 10 classes: every class has at least 2, so 10 rows of 2
    with Image.open(first / "grid.png") as im:
        assert im.size == grid_size(rows=10, cols=2)


@pytest.mark.slow
def test_trajectory_shows_each_step_and_ends_at_the_samples(first):
    traj = read_png(first / "trajectory.png")
    assert traj.shape[:2][::-1] == grid_size(rows=min(8, BATCH), cols=STEPS)
    arr = load_npz(first)["arr_0"]
    cell = SIZE + 2
    for row in range(min(8, BATCH)):
        frames = [traj[2 + row * cell:2 + row * cell + SIZE, 2 + s * cell:2 + s * cell + SIZE] for s in range(STEPS)]
        cells = frames[0].reshape(SIZE // F, F, SIZE // F, F, 3).transpose(0, 2, 1, 3, 4).reshape(-1, F * F * 3)
        grey = (cells == 128).all(-1)  # mid-grey cells = tokens still masked after the first step
        assert 0 < grey.sum() < len(grey)
        # the last state is the finished sample (torchvision rounds a hair differently from to_uint8)
        assert np.abs(frames[-1].astype(int) - arr[row]).max() <= 1


@pytest.mark.slow
def test_same_seed_reproduces_other_seed_differs_and_old_pngs_are_protected(first, runs, tmp_path):
    out = tmp_path / "again"
    cli.main(sample_args(runs["cond"], out))  # no --trajectory: asking for it must not change the samples
    assert np.array_equal(load_npz(out)["arr_0"], load_npz(first)["arr_0"])
    with pytest.raises(SystemExit):
        cli.main(sample_args(runs["cond"], out, "--seed", 1))
    cli.main(sample_args(runs["cond"], out, "--seed", 1, "--overwrite", "--num", 5))  # the last --num counts
    other = load_npz(out)["arr_0"]
    assert len(other) == 5 == len(list((out / "images").glob("*.png")))  # the 23 old PNGs are gone
    assert not np.array_equal(other, load_npz(first)["arr_0"][:5])


@pytest.mark.slow
def test_two_processes_cover_every_index_once_like_one_process(first, runs, tmp_path):
    out = tmp_path / "two"
    proc = run_script([*launch_args(2), "sample.py", *sample_args(runs["cond"], out, "--trajectory")])
    check(proc)
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(NUM)]
    two, one = load_npz(out), load_npz(first)
    assert np.array_equal(two["arr_0"], one["arr_0"]) and np.array_equal(two["labels"], one["labels"])
    for i in range(NUM):
        assert np.array_equal(read_png(out / "images" / names[i]), one["arr_0"][i])
    assert json.loads((out / "meta.json").read_text())["num_processes"] == 2
    assert read_png(out / "trajectory.png").shape == read_png(first / "trajectory.png").shape


@pytest.mark.slow
def test_unconditional_model_with_critic(runs, tmp_path):
    out = tmp_path / "uncond"
    cli.main(sample_args(runs["uncond"], out, "--sampler", "critic", "--num", 10))
    data = load_npz(out)
    assert set(data) == {"arr_0"} and data["arr_0"].shape == (10, SIZE, SIZE, 3)
    with Image.open(out / "grid.png") as im:
        assert im.size == grid_size(rows=2, cols=8)  # 8 wide: 8 + 2
    meta = json.loads((out / "meta.json").read_text())
    assert meta["labels"] == "unconditional" and meta["sampler"]["strategy"] == "critic"


@pytest.mark.slow
def test_class_by_name_or_index(runs, tmp_path):
    cli.main(sample_args(runs["cond"], tmp_path / "name", "--class", "star", "--num", 3))
    cli.main(sample_args(runs["cond"], tmp_path / "index", "--class", SHAPES_CLASSES_SORTED.index("star"),
                         "--num", 3))
    by_name, by_index = load_npz(tmp_path / "name"), load_npz(tmp_path / "index")
    assert (by_name["labels"] == SHAPES_CLASSES_SORTED.index("star")).all()
    assert np.array_equal(by_name["arr_0"], by_index["arr_0"])


SHAPES_CLASSES_SORTED = sorted(SHAPES_CLASSES)  # class folders are sorted by name


# ------------------------------------------------------------------------------------------- bad input


BAD_INPUT = {
    "stage-1 folder": (lambda r: ["--checkpoint", r["vq"]], "stage-1"),
    "missing folder": (lambda r: ["--checkpoint", r["root"] / "nowhere"], "is not a folder"),
    "class index": (lambda r: ["--class", 10], "--class 10 is out of range"),
    "class name": (lambda r: ["--class", "dragon"], "'dragon' is no class"),
    "class on unconditional": (lambda r: ["--checkpoint", r["uncond"], "--class", 0], "unconditional"),
    "cfg on unconditional": (lambda r: ["--checkpoint", r["uncond"], "--cfg", 1], "class-conditional"),
    "critic": (lambda r: ["--sampler", "critic"], "needs a token critic"),
    "box outside": (lambda r: ["--init-image", r["init"], "--mask-box", "8,8,17,12"], "within the 16x16 image"),
    "empty box": (lambda r: ["--init-image", r["init"], "--mask-box", "4,4,4,9"], "non-empty"),
    "box syntax": (lambda r: ["--init-image", r["init"], "--mask-box", "1,2,3"], "four integers"),
    "box without image": (lambda r: ["--mask-box", "0,0,4,4"], "pass --init-image"),
    "image without region": (lambda r: ["--init-image", r["init"]], "needs --mask-box"),
    "image size": (lambda r: ["--init-image", r["root"] / "big.png", "--mask-box", "0,0,4,4"],
                   "is 20x12 pixels, but the model works at 16x16"),
    "num": (lambda r: ["--num", 0], "--num must be >= 1"),
    "steps": (lambda r: ["--steps", 0], "--steps must be >= 1"),
    "top-p": (lambda r: ["--top-p", 1.5], "top_p=1.5"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_clearly_before_any_work(case, runs, tmp_path, capsys):
    Image.new("RGB", (20, 12)).save(runs["root"] / "big.png")
    extra, message = BAD_INPUT[case]
    out = tmp_path / "out"
    argv = ["--checkpoint", str(runs["cond"]), "--out", str(out), *map(str, extra(runs))]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()  # failed before creating anything


# ------------------------------------------------------------------------------------------- editing


@pytest.mark.slow
@pytest.mark.parametrize("region", ["box", "inverted box", "mask image"])
def test_edit_keeps_the_codes_outside_the_region(runs, tmp_path, region):
    out = tmp_path / "edit"
    box = (0, 0, 6, 6)  # cells of rows and columns 0-1 (x, y < 8) overlap it
    picture = Image.new("L", (SIZE, SIZE))
    picture.paste(255, box)
    picture.save(tmp_path / "mask.png")
    flags = {"box": ["--mask-box", "0,0,6,6"], "inverted box": ["--mask-box", "0,0,6,6", "--invert-mask"],
             "mask image": ["--mask-image", tmp_path / "mask.png"]}[region]
    invert = region == "inverted box"
    cli.main(sample_args(runs["cond"], out, "--init-image", runs["init"], *flags, "--num", 6, "--batch-size", 4,
                         "--cfg", 0, "--temperature", 1, "--choice-temperature", SamplerConfig().choice_temperature,
                         "--no-remask"))
    # (the SamplerConfig defaults, redone below, rather than the run's measured ones)
    pngs = np.stack([read_png(out / "images" / f"{i:06d}.png") for i in range(6)])

    # redo the run by hand from the documented rules (seed per batch, balanced labels, keep = cells off the box)
    model, vq, _ = load_maskgit(runs["cond"])
    x = torch.from_numpy(read_png(runs["init"])).permute(2, 0, 1)[None].float() / 127.5 - 1
    init = vq.encode(x).flatten(1)  # (1, 16)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    in_box = ((rows < 2) & (cols < 2)).flatten()
    keep = in_box if invert else ~in_box
    config = SamplerConfig(steps=STEPS, schedule="cosine")
    expected = []
    for batch, start in enumerate(range(0, 6, 4)):
        labels = torch.arange(start, min(start + 4, 6)) % 10
        codes = sample(model, len(labels), labels, config, init_codes=init, keep=keep[None],
                       generator=cli.batch_generator(0, batch))
        assert (codes[:, keep] == init[:, keep]).all()
        expected.append(to_uint8(vq.decode(codes.view(-1, 4, 4)).clamp(-1, 1)).numpy())
    assert np.array_equal(pngs, np.concatenate(expected))
    assert len({p.tobytes() for p in pngs}) > 1  # variations, not one image six times


def test_box_to_tokens_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    for f, side in ((4, 16), (8, 32), (2, 6)):
        h = side // f
        for _ in range(50):
            x0, x1 = sorted(torch.randperm(side + 1, generator=g)[:2].tolist())
            y0, y1 = sorted(torch.randperm(side + 1, generator=g)[:2].tolist())
            tokens = token_mask(box_mask((x0, y0, x1, y1), side, side), (h, h))
            # cell (r, c) covers pixels [r f, (r+1) f) x [c f, (c+1) f): it overlaps the box iff the ranges do
            r = torch.arange(h)
            expect = ((r * f < y1) & ((r + 1) * f > y0))[:, None] & ((r * f < x1) & ((r + 1) * f > x0))[None, :]
            assert torch.equal(tokens, expect), (f, x0, y0, x1, y1)


def test_box_is_checked():
    for box in [(0, 0, 17, 4), (-1, 0, 4, 4), (3, 0, 3, 4), (0, 5, 4, 2)]:
        with pytest.raises(ValueError, match="non-empty and lie within"):
            box_mask(box, 16, 16)
    assert box_mask((0, 0, 16, 16), 16, 16).all()


def test_invert_keeps_exactly_the_other_tokens():
    regen = token_mask(box_mask((3, 5, 9, 7), 16, 16), (4, 4))
    keep, keep_inverted = keep_mask(regen), keep_mask(regen, invert=True)
    assert keep.shape == (16,) and torch.equal(keep, ~keep_inverted)
    assert torch.equal(keep_inverted.view(4, 4), regen)  # row-major, like the code sequence


def test_mask_image_equals_the_box_it_draws(tmp_path):
    im = Image.new("RGB", (16, 16))
    im.paste((255, 255, 255), (2, 9, 7, 15))  # PIL boxes are (x0, y0, x1, y1) with x1, y1 exclusive too
    im.putpixel((12, 1), (0, 0, 3))  # any non-zero channel counts
    im.save(tmp_path / "mask.png")
    with Image.open(tmp_path / "mask.png") as loaded:
        pixels = torch.from_numpy(np.array(loaded))
    expect = box_mask((2, 9, 7, 15), 16, 16)
    expect[1, 12] = True
    assert torch.equal(image_mask(pixels), expect)
    assert torch.equal(image_mask(pixels[..., 2]), expect)  # a greyscale (H, W) mask works alike


def test_cells_round_trip():
    g = torch.Generator().manual_seed(1)
    tokens = torch.rand(3, 4, 5, generator=g) < 0.5
    pixels = cell_pixels(tokens, 4)
    assert pixels.shape == (3, 16, 20) and torch.equal(token_mask(pixels, (4, 5)), tokens)
    with pytest.raises(ValueError, match="cells"):
        token_mask(pixels, (3, 5))


def test_sample_keeps_the_tokens_the_helpers_keep():
    torch.manual_seed(0)
    model = build_maskgit(MaskGITConfig(dim=32, depth=1, heads=2, dropout=0.0), codebook_size=16, grid=(4, 4),
                          num_classes=3).eval()
    init = torch.randint(0, 16, (1, 16))
    regen = token_mask(box_mask((5, 0, 16, 7), 16, 16), (4, 4))
    for invert in (False, True):
        keep = keep_mask(regen, invert)
        for strategy in ("confidence", "halton"):
            codes = sample(model, 5, torch.arange(5) % 3, SamplerConfig(steps=3, strategy=strategy),
                           init_codes=init, keep=keep[None], generator=torch.Generator().manual_seed(0))
            assert (codes[:, keep] == init[:, keep]).all() and (codes[:, ~keep] != init[:, ~keep]).any()


# ------------------------------------------------------------------------------------------- CLI and FID tools


def test_every_sampler_setting_has_a_flag(tmp_path):
    flags = {"steps": ["--steps", "3"], "strategy": ["--sampler", "critic"], "schedule": ["--schedule", "linear"],
             "temperature": ["--temperature", "0.7"], "temperature_end": ["--temperature-end", "0.2"],
             "choice_temperature": ["--choice-temperature", "2"], "critic_noise": ["--critic-noise", "0.5"],
             "top_k": ["--top-k", "5"], "top_p": ["--top-p", "0.9"], "cfg": ["--cfg", "1.5"],
             "cfg_schedule": ["--cfg-schedule", "linear"], "remask": ["--remask"]}
    assert set(flags) == {f.name for f in fields(SamplerConfig)}, "a SamplerConfig field has no sample.py flag"
    args = cli.parse_args(["--checkpoint", "x", "--out", "y", *sum(flags.values(), [])])
    got = cli.sampler_config(args, Run(Path("x"), {"stage": "maskgit", "model": {"schedule": "cosine"}}))
    base = SamplerConfig()
    for name in flags:
        assert getattr(got, name) != getattr(base, name), name
    assert got.strategy == "critic" and got.temperature_end == 0.2 and got.top_k == 5
    default = cli.sampler_config(cli.parse_args(["--checkpoint", "x", "--out", "y", "--temperature", "0.5"]),
                                 Run(Path("x"), {"stage": "maskgit", "model": {"schedule": "arccos"}}))
    assert default.temperature_end == 0.5 and default.schedule == "arccos"  # constant; the model's schedule


@pytest.mark.slow
def test_torch_fidelity_reads_our_folder_as_written(first):
    utils = pytest.importorskip("torch_fidelity.utils")
    # the code path of `fidelity --input1 DIR` / calculate_metrics(input1=DIR): a folder becomes its dataset
    dataset = utils.prepare_input_from_id(1, input1=str(first / "images"), verbose=False)
    arr = load_npz(first)["arr_0"]
    assert len(dataset) == len(arr)
    for i in range(len(arr)):
        item = dataset[i]
        assert item.dtype == torch.uint8 and item.shape == (3, SIZE, SIZE)
        assert np.array_equal(item.permute(1, 2, 0).numpy(), arr[i])
