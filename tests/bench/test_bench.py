"""The benchmark scripts (bench/): each runs in quick mode and prints its table, and the measuring pieces are right.

bench/ is importable as a folder of modules (`pythonpath = ["bench"]` in pyproject.toml), as it is for the scripts
themselves when run as `python bench/NAME.py`."""

import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import run_script, table_rows
from maskgit.config import MASKGIT_PRESETS
from vqvae.config import VQ_PRESETS


def number(cell: str) -> float:
    """The first number in a cell: '1.53x' -> 1.53, '12.5%' -> 12.5, '10.0% ± 6.7%' -> 10.0."""
    return float(re.match(r"[-+]?\d+(\.\d+)?", cell).group())


def check_script(args: list[str]) -> str:
    proc = run_script(args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # a subprocess that imports torch and runs its sweep: ~10-20 s on 2 busy cores
def test_sample_speed_quick_prints_every_row():
    out = check_script(["bench/sample_speed.py", "--quick", "--threads", "1"])
    assert "Machine: CPU" in out and "torch" in out
    rows = table_rows(out, "| steps | batch | ours img/s")
    assert [(int(r[0]), int(r[1])) for r in rows] == [(4, 1), (4, 8), (8, 1), (8, 8)]  # quick: steps 4 8, batch 1 8
    for r in rows:
        ours_ips, ours_ms, ref_ips, ref_ms, ratio = map(number, r[2:7])
        assert all(math.isfinite(v) and v > 0 for v in (ours_ips, ours_ms, ref_ips, ref_ms, ratio))
        # images/s and latency are two views of one time, and the ratio is the reference's time over ours
        assert ours_ips == pytest.approx(int(r[1]) / (ours_ms / 1e3), rel=0.02)
        assert ratio == pytest.approx(ref_ms / ours_ms, rel=0.03)
        assert 0 <= number(r[7]) <= 100 and 0 <= number(r[8]) <= 100  # shares outside the forward, in percent
    ar = table_rows(out, "| batch | AR img/s")
    assert [int(r[0]) for r in ar] == [1, 8] and all(number(c) > 0 for r in ar for c in r[1:])
    alone = table_rows(out, "| batch | ours ms/step")
    assert all(number(r[1]) > 0 and number(r[2]) > 0 for r in alone)
    assert all(number(r[1]) > 0 for r in table_rows(out, "| batch | tokenizer decode ms"))
    verdicts = re.findall(r"^- (PASS|FAIL): ", out, flags=re.M)
    assert len(verdicts) == 3


@pytest.mark.slow  # a subprocess that imports torch and runs its sweep: ~10-20 s on 2 busy cores
def test_train_speed_quick_prints_both_stages():
    out = check_script(["bench/train_speed.py", "--quick", "--threads", "1"])
    rows = table_rows(out, "| stage | variant")
    quantizer = VQ_PRESETS["tiny"][0].quantizer  # the VQ-VAE row is named after the preset's quantizer
    assert [r[1] for r in rows] == [quantizer, "critic none", "critic self", "critic separate"]
    for r in rows:
        steps_per_s, images_per_s, ms = number(r[4]), number(r[5]), number(r[6])
        assert math.isfinite(steps_per_s) and steps_per_s > 0
        assert images_per_s == pytest.approx(steps_per_s * int(r[3]), rel=0.02)
        assert ms == pytest.approx(1e3 / steps_per_s, rel=0.02)
        assert number(r[7]) >= 0  # memory growth, MiB
    params = {r[1]: int(r[2].replace(",", "")) for r in rows}
    # a self critic is one linear head (dim -> 1, with bias) on the generator; a separate critic is a second net
    assert params["critic self"] - params["critic none"] == MASKGIT_PRESETS["tiny"][0].dim + 1
    assert params["critic separate"] > 1.5 * params["critic none"]


@pytest.mark.slow  # a subprocess that imports torch and runs its sweep: ~10-20 s on 2 busy cores
def test_quality_quick_prints_every_setting():
    out = check_script(["bench/quality.py", "--quick", "--threads", "1", "--choice-temperatures", "4.5", "1",
                        "--remask", "off", "on"])
    assert re.search(r"ceiling \(held-out real accuracy, \d+ images\) \d+\.\d%", out)
    header = next(line for line in out.splitlines() if line.startswith("| sampler | schedule"))
    for floor in (r"class accuracy \(ceiling \d+\.\d%\)", r"FD \(floor [\d.]+\)", r"precision \(floor [\d.]+\)",
                  r"recall \(floor [\d.]+\)", r"cross-check accuracy \(ceiling \d+\.\d%\)"):
        assert re.search(floor, header), (floor, header)
    rows = table_rows(out, "| sampler | schedule")
    settings = {(r[0], r[1], int(r[2]), float(r[3]), float(r[4]), r[5]) for r in rows if not r[0].startswith("*")}
    for steps in (4, 8):
        for strategy in ("confidence", "critic", "halton"):
            assert (strategy, "cosine", steps, 0.0, 4.5, "off") in settings  # the first of each list is the base
        assert ("confidence", "linear", steps, 0.0, 4.5, "off") in settings
    for strategy in ("confidence", "critic", "halton"):
        for w in (1.0, 3.0):
            assert (strategy, "cosine", 8, w, 4.5, "off") in settings
    # the second choice temperature and re-masking appear only in their guidance groups, at 8 steps
    assert {s for s in settings if s[4] == 1.0} == {("confidence", "cosine", 8, w, 1.0, "off") for w in (0.0, 1.0, 3.0)}
    assert {s for s in settings if s[5] == "on"} == {("confidence", "cosine", 8, w, 4.5, "on") for w in (0.0, 1.0, 3.0)}
    assert [r[0] for r in rows if r[0].startswith("*")] == ["*tokenizer reconstructions of 20 real training images*"]
    for r in rows:
        assert 0 <= number(r[6]) <= 100 and 0 <= number(r[7]) <= 100 and 0 <= number(r[8]) <= 100  # accuracies, %
        fd = number(r[9])
        assert math.isfinite(fd) and fd >= 0
        assert 0 <= number(r[10]) <= 1 and 0 <= number(r[11]) <= 1  # precision, recall
    assert re.search(r"^- Cosine beats linear at few steps \(MaskGIT paper\): [A-Z]", out, flags=re.M)


@pytest.mark.slow  # two in-process training runs of 4 steps: ~10 s
def test_vq_quantizers_quick_prints_both_quantizers():
    out = check_script(["bench/vq_quantizers.py", "--quick", "--threads", "1"])
    assert "vqvae.train.main" in out
    rows = table_rows(out, "| data | quantizer")
    assert [(r[0], r[1]) for r in rows] == [("shapes", "vq"), ("shapes", "fsq")]
    tiny = VQ_PRESETS["tiny"][0]
    assert int(rows[0][2]) == tiny.codebook_size and int(rows[1][2]) == math.prod(tiny.fsq_levels)
    for r in rows:
        assert 0 < number(r[3]) < 100  # PSNR, dB: written by the training run's own evaluation
        assert 0 < number(r[4]) <= 100 and number(r[5]) >= 1  # codebook usage %, perplexity
        assert int(r[6]) == 32  # --quick evaluates 32 held-out images


@pytest.mark.slow  # both tiny stages for 20 steps, sampling twice and the judge, as subprocesses: ~40-60 s
def test_learning_quick_runs_every_step(tmp_path):
    out = check_script(["bench/learning.py", "--quick", "--work", tmp_path, "--threads", "1", "--cfg", "default",
                        "3"])
    assert "(quick: no targets)" in out
    assert re.search(r"ceiling \(held-out real accuracy, \d+ images\) \d+\.\d%", out)  # the digits' held-out split
    vq_rows = table_rows(out, "| step | held-out PSNR")
    assert [int(r[0]) for r in vq_rows] == [10, 20]
    rows = table_rows(out, "| sampling | samples")
    measured = json.loads((tmp_path / "maskgit" / "config.json").read_text())["sampling"]
    assert [(r[0], int(r[1])) for r in rows] == [  # the run's measured defaults, then --cfg 3; 5 per class
        (f"default: cfg {measured['cfg']:g}, temperature {measured['temperature']:g}, choice temperature "
         f"{measured['choice_temperature']:g}" + (", remask" if measured["remask"] else ""), 50), ("cfg 3", 50)]
    for r in rows:
        accuracy, spread = map(float, re.findall(r"[\d.]+", r[2])[:2])
        assert 0 <= accuracy <= 100 and spread == pytest.approx(100 * math.sqrt(accuracy / 100 * (1 - accuracy / 100)
                                                                               / 50), abs=0.06)
        assert 0 <= number(r[3]) <= 100 and 0 <= number(r[4]) <= 100  # worst class, cross-check
        assert number(r[5]) >= 0 and 0 <= number(r[6]) <= 1 and 0 <= number(r[7]) <= 1  # FD, precision, recall
    assert "### Targets" not in out


@pytest.mark.slow  # one quick variant (both tiny stages for 20 steps, sampling twice, a quick judge): ~1-2 min
def test_sweep_runs_a_variant_and_resumes(tmp_path):
    quick = ("q: --vq-args '--steps 20 --eval-every 10 --save-every 20 --warmup-steps 5' --mg-args '--steps 20 "
             "--eval-every 10 --sample-every 20 --save-every 20 --warmup-steps 5 --tune-samples 10 "
             "--tune-temperatures 1 --token-views none'")
    args = ["bench/sweep.py", "--data", "digits", "--work", tmp_path, "--jobs", "1", "--only", "q", "--variant", quick,
            "--per-class", "2", "--judge-steps", "5", "--cfg", "default", "2"]
    out = check_script(args)
    assert "1 variant(s) to run, 0 done" in out
    rows = table_rows(out, "| variant | sampling")
    measured = json.loads((tmp_path / "maskgit" / "q" / "config.json").read_text())["sampling"]
    assert sorted(r[1] for r in rows) == sorted(
        ["cfg 2", f"default: cfg {measured['cfg']:g}, temperature {measured['temperature']:g}, choice temperature "
                  f"{measured['choice_temperature']:g}" + (", remask" if measured["remask"] else "")])
    for r in rows:
        assert r[0] == "q" and 0 <= number(r[2]) <= 100 and number(r[5]) >= 0  # recognised %, FD
        vq_cpu, mg_cpu, sample_cpu = map(float, re.findall(r"[\d.]+", r[10]))
        assert vq_cpu > 0 and mg_cpu > 0 and sample_cpu > 0
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2
    # the shared stage-1 run's reconstructions, judged once: a recognised share, an FD, the run's CPU time
    stage1 = table_rows(out, "| stage-1 overrides")
    assert len(stage1) == 1 and stage1[0][0] == "`--steps 20 --eval-every 10 --save-every 20 --warmup-steps 5`"
    assert 0 <= number(stage1[0][2]) <= 100 and number(stage1[0][4]) >= 0 and float(stage1[0][7]) > 0
    assert len((tmp_path / "stage1.jsonl").read_text().splitlines()) == 1
    again = check_script(args)  # everything is reused: nothing trains, nothing is appended
    assert "0 variant(s) to run, 1 done" in again and " s wall" not in again  # no child ran
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines
    assert table_rows(again, "| variant | sampling") == rows and table_rows(again, "| stage-1 overrides") == stage1
    (tmp_path / "stage1.jsonl").unlink()  # a sweep from before the stage-1 table: judged at the end, once
    third = check_script(args)
    assert " s wall" not in third and [r[0] for r in table_rows(third, "| stage-1 overrides")] == [stage1[0][0]]
    assert len((tmp_path / "stage1.jsonl").read_text().splitlines()) == 1

    # bench/quality.py on that trained run: every sampler, a fixed temperature from the run's measured defaults
    out = check_script(["bench/quality.py", "--maskgit", tmp_path / "maskgit" / "q", "--num", "20", "--batch", "20",
                        "--steps", "2", "4", "--samplers", "confidence", "halton", "--schedules", "cosine", "--cfg",
                        "0", "--full", "--judge-steps", "5", "--bootstrap", "0", "--threads", "1"])
    assert f"token temperature {measured['temperature']:g}" in out
    quality = table_rows(out, "| sampler | schedule")
    assert sorted((r[0], int(r[2])) for r in quality[:-1]) == [("confidence", 2), ("confidence", 4), ("halton", 2),
                                                              ("halton", 4)]
    assert {float(r[4]) for r in quality[:-1]} == {measured["choice_temperature"]}  # the run's measured one
    # the run's measured re-masking, except for the fixed halton order, which never re-masks
    assert {(r[0], r[5]) for r in quality[:-1]} == {("confidence", "on" if measured["remask"] else "off"),
                                                    ("halton", "off")}


# the measuring pieces, in-process


def test_frechet_matches_scipy_and_closed_forms():
    from scipy import linalg

    from core.stats import frechet

    rng = np.random.default_rng(0)
    d = 12
    a, b = rng.normal(size=(d, 3 * d)), rng.normal(size=(d, 3 * d))
    s_a, s_b = a @ a.T / d, b @ b.T / d  # SPD
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    covmean = linalg.sqrtm(s_a @ s_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)
    assert frechet((mu_a, s_a), (mu_b, s_b)) == pytest.approx(expected, rel=1e-8)
    assert frechet((mu_a, s_a), (mu_a, s_a)) == pytest.approx(0.0, abs=1e-9)
    # diagonal covariances: sum of (sqrt(a_i) - sqrt(b_i))^2, and singular ones (a dead feature) are fine
    va, vb = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])
    closed = ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum() + 1.0
    assert frechet((np.zeros(3), np.diag(va)), (np.array([1.0, 0, 0]), np.diag(vb))) == pytest.approx(closed)


def test_frechet_distance_of_gaussian_samples_matches_the_closed_form():
    """Features drawn from two diagonal Gaussians: ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)), up to the
    sampling error of 40,000 draws."""
    from core.stats import frechet_distance

    rng = np.random.default_rng(1)
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 1.0, 2.0])
    closed = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()  # 6 + 4.5 = 10.5
    a = mu1 + np.sqrt(s1) * rng.normal(size=(40_000, 4))
    b = mu2 + np.sqrt(s2) * rng.normal(size=(40_000, 4))
    assert frechet_distance(a, b) == pytest.approx(closed, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # a different spread alone counts (a judge that compared means only would say 0)
    assert frechet_distance(a, mu1 + 3 * np.sqrt(s1) * rng.normal(size=(40_000, 4))) == pytest.approx(
        (4 * s1).sum(), rel=0.05)


def test_precision_and_recall_show_fidelity_and_mode_dropping():
    """Kynkaenniemi et al.'s k-NN manifolds (k=3) on point sets whose answer is known."""
    from judge import precision_recall

    rng = np.random.default_rng(2)
    mode_a = rng.normal(size=(200, 2))
    mode_b = rng.normal(size=(200, 2)) + 50.0  # far apart: no ball of one mode reaches the other
    real = np.concatenate([mode_a, mode_b])
    assert precision_recall(real, real.copy()) == (1.0, 1.0)  # identical sets
    # samples collapsed onto one of the two modes (as many as the real set, fresh draws): realistic, half covered
    collapsed = rng.normal(size=(400, 2))
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.93 and 0.45 <= recall <= 0.5
    assert precision_recall(real, np.concatenate([mode_a, mode_a])) == (1.0, 0.5)  # exact copies of one mode
    # samples off the real manifold: precision near 0 (and they cover no real point)
    assert precision_recall(real, rng.normal(size=(400, 2)) + 25.0) == (0.0, 0.0)
    # fresh draws of both modes: high precision and recall
    fresh = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 50.0])
    assert min(precision_recall(real, fresh)) > 0.9


def test_images_are_read_in_every_layout_and_wrong_ranges_are_refused():
    from judge import to_float_images

    nhwc = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    expected = nhwc.permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(to_float_images(nhwc), expected)
    assert torch.equal(to_float_images(nhwc.numpy()), expected)
    assert torch.equal(to_float_images(nhwc.permute(0, 3, 1, 2)), expected)  # uint8 (N, 3, H, W), as datasets hold
    assert torch.equal(to_float_images(expected), expected)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        to_float_images(expected * 127.5 + 127.5)  # float pixels 0..255 would be judged silently wrong
    with pytest.raises(ValueError, match="3 channels"):
        to_float_images(torch.zeros(2, 4, 5, 6))


def test_load_real_reads_a_labelled_folder_and_refuses_an_unlabelled_one(tiny_labelled_images, tiny_images):
    from core.data import load_dataset
    from judge import load_real

    train_x, train_y = load_real(str(tiny_labelled_images), 16, "train")
    held_x, held_y = load_real(str(tiny_labelled_images), 16, "test")
    dataset = load_dataset(str(tiny_labelled_images), 16, "train")
    assert train_x.shape == (len(dataset), 3, 16, 16) and len(train_y) == len(dataset) and len(held_x) == len(held_y)
    assert len(train_x) + len(held_x) == 240 and set(train_y.tolist()) == set(range(10))
    assert torch.equal(train_x[5], dataset[5][0]) and train_y[5] == dataset[5][1]
    assert -1 <= train_x.min() and train_x.max() <= 1
    some_x, some_y = load_real(str(tiny_labelled_images), 16, "train", limit=50, seed=3)
    assert len(some_x) == 50 and len(set(some_y.tolist())) > 1  # a random subset, not the first class's files
    with pytest.raises(ValueError, match="unlabelled"):
        load_real(str(tiny_images), 16, "train")


def halves(n_per_class: int, seed: int, size: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """A trivially separable set of (n, 3, size, size) images: class 0 lights the left half, 1 the right half, 2 the
    top half, plus noise. Mirroring swaps classes 0 and 1 and leaves class 2 as it is."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    x = torch.full((len(labels), 3, size, size), -0.8)
    x[labels == 0, :, :, : size // 2] = 0.8
    x[labels == 1, :, :, size // 2:] = 0.8
    x[labels == 2, :, : size // 2, :] = 0.8
    x = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    return x, labels.numpy()


@pytest.mark.usefixtures("one_thread")
def test_judge_learns_a_separable_set_and_counts_mirrored_samples_as_wrong():
    from judge import Judge

    train_x, train_y = halves(40, seed=0)
    held_x, held_y = halves(10, seed=1)
    judge = Judge.fit(train_x, train_y, held_x, held_y, seed=0, steps=40, width=8)
    assert judge.ceiling == 1.0 and judge.cross_check_ceiling == 1.0 and judge.num_classes == 3
    samples, requested = halves(20, seed=2)
    score = judge.score(samples, requested)
    assert score["accuracy"] == 1.0 and score["per_class"] == [1.0, 1.0, 1.0] and score["worst_class"] == 1.0
    assert score["cross_check_accuracy"] == 1.0
    assert score["fd"] >= 0 and score["fd_floor"] >= 0 and 0 <= score["precision"] <= 1 and 0 <= score["recall"] <= 1
    # the judge saw no mirror images: a mirrored "left" is a "right", and counts as wrong
    mirrored = judge.score(samples.flip(-1), requested)
    assert mirrored["per_class"] == [0.0, 0.0, 1.0] and mirrored["accuracy"] == pytest.approx(1 / 3)
    assert mirrored["worst_class"] == 0.0 and mirrored["worst_class_index"] == 0
    # uint8 (N, H, W, 3), as sample.py writes them, is judged the same as float
    as_uint8 = ((samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert judge.score(as_uint8, requested)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="trained on"):
        judge.score(torch.zeros(2, 3, 16, 16), [0, 1])  # another resolution


class HandMadeNet(torch.nn.Module):
    """Stands in for the judge's CNN: the prediction is written in pixel (0, 0) of the red channel (class c at
    -1 + 0.2 c); the features are the first row of that channel."""

    centres = -1 + 0.2 * torch.arange(5.0)

    def features(self, x):
        return x[:, 0, 0, :4]

    def head(self, f):
        return -(f[:, :1] - self.centres).abs()  # logits (b, 5): the nearest centre wins


class Constant:
    def __init__(self, value: int):
        self.value, self.name = value, "constant"

    def predict(self, images):
        return np.full(len(images), self.value)


def test_score_reports_accuracy_per_requested_class():
    from judge import Judge

    rng = np.random.default_rng(3)
    reference = rng.normal(size=(40, 4))
    judge = Judge(HandMadeNet(), Constant(1), num_classes=5, image_size=(4, 4), held_out_features=reference,
                  train_features=rng.normal(size=(60, 4)), ceiling=1.0, cross_check_ceiling=1.0)
    requested = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]  # class 4 is never asked for
    predicted = [0, 0, 0, 2, 1, 0, 0, 2, 2, 4]  # class 0: 3/4, class 1: 1/3, class 2: 2/2, class 3: 0/1
    images = torch.full((10, 3, 4, 4), -1.0)
    images[:, 0, 0, 0] = torch.tensor([-1 + 0.2 * c for c in predicted])
    assert judge.classify(images)[0].tolist() == predicted
    score = judge.score(images, torch.tensor(requested))
    assert score["accuracy"] == pytest.approx(0.6) and score["n"] == 10
    assert score["per_class"][:4] == pytest.approx([3 / 4, 1 / 3, 1.0, 0.0]) and math.isnan(score["per_class"][4])
    assert score["worst_class"] == 0.0 and score["worst_class_index"] == 3
    assert score["accuracy_std"] == pytest.approx(math.sqrt(0.6 * 0.4 / 10))
    assert score["cross_check_accuracy"] == pytest.approx(0.3)  # the cross-check says 1: right for 3 of 10
    assert score["ceiling"] == 1.0
    for key in ("fd", "fd_floor", "precision", "recall", "precision_floor", "recall_floor"):
        assert math.isfinite(score[key]), key
    with pytest.raises(ValueError, match="requested labels"):
        judge.score(images, requested[:-1])


def test_floor_compares_as_many_training_images_with_the_held_out_reference():
    """The floor of n samples: n training features (seeded draw) against the held-out reference; precision and
    recall at equal set sizes, the larger set split into parts of the smaller one's size."""
    from judge import Judge, frechet_distance, precision_recall

    rng = np.random.default_rng(4)
    train, held = rng.normal(size=(300, 3)), rng.normal(size=(50, 3))
    judge = Judge(HandMadeNet(), Constant(0), num_classes=5, image_size=(4, 4), held_out_features=held,
                  train_features=train, ceiling=1.0, cross_check_ceiling=1.0, seed=7)
    floor = judge.floor(50)
    pick = np.random.default_rng(8).permutation(300)[:50]  # seed + 1
    assert floor["fd"] == pytest.approx(frechet_distance(train[pick], held))
    assert (floor["precision"], floor["recall"]) == pytest.approx(precision_recall(held, train[pick]))
    assert judge.floor(50) is floor  # cached per count
    many = judge.floor(1000)  # more than the pool: all 300, in 6 parts of 50 against the 50 held-out
    assert 0 < many["precision"] <= 1 and 0 < many["recall"] <= 1


def test_flop_count_matches_the_closed_form():
    """One forward costs 2 * matmul weights * places + attention's 4 n^2 (heads * dim_head) per layer (QK^T and the
    attention-weighted V). sample_speed.flops_per_sequence counts attention as plain matmuls, which every torch
    counts; torch's own count of an SDPA call differs between versions (2.14.1 counts none on the CPU)."""
    from x_transformers import Encoder, TransformerWrapper

    from sample_speed import flops_per_sequence, plain_attention

    dim, depth, heads, dim_head, n, vocab = 64, 2, 4, 24, 17, 33  # inner attention width 96, not dim
    matmuls = attention = None
    for flash in (True, False):  # the flash net as sample_speed.py builds it, and one that never uses SDPA
        torch.manual_seed(0)
        net = TransformerWrapper(num_tokens=vocab, max_seq_len=n, use_abs_pos_emb=False,
                                 attn_layers=Encoder(dim=dim, depth=depth, heads=heads, attn_dim_head=dim_head,
                                                     attn_flash=flash)).eval()
        matmul_weights = sum(p.numel() for name, p in net.named_parameters()
                             if p.ndim == 2 and "token_emb" not in name)
        matmuls, attention = 2 * matmul_weights * n, 4 * n * n * heads * dim_head * depth
        tokens = torch.zeros(1, n, dtype=torch.long)
        with torch.inference_mode():
            assert flops_per_sequence(lambda: net(tokens), net) == matmuls + attention
            with plain_attention(net):
                out_plain = net(tokens)
            assert torch.allclose(out_plain, net(tokens), atol=1e-5)  # the same forward, only counted differently
    # whatever this torch counts of SDPA itself, the plain count is the closed form above
    assert attention > 0 and matmuls > 0


def test_forward_timer_sees_one_forward_per_step():
    """Our sampler runs the transformer once per step (no guidance, no critic): the hook count says so."""
    from maskgit.config import MaskGITConfig
    from maskgit.model import build_maskgit
    from sample_speed import ForwardTimer

    torch.manual_seed(0)
    model = build_maskgit(MaskGITConfig(dim=32, depth=1, heads=2, dropout=0.0), codebook_size=16, grid=(3, 4),
                          num_classes=2).eval()
    timer = ForwardTimer(model.net, torch.device("cpu"))
    with torch.inference_mode():
        start = torch.get_num_threads()
        model.generate(labels=torch.tensor([0, 1]), steps=5)
        assert timer.calls == 5
        timer.reset()
        model.generate(labels=torch.tensor([0, 1]), steps=5, cfg=2.0)  # guidance: still one (batched) call per step
        assert timer.calls == 5 and torch.get_num_threads() == start
    assert 0 < timer.seconds() < 60


def test_learning_checks_the_worst_class_at_the_defaults(capsys):
    """The worst-class target of the learning check (no class below 85% at the run's defaults) is printed as its
    own PASS/FAIL line, naming the class and the sample count per class it was judged on; the CPU budget counts the
    draw's sampling CPU scaled to 500 samples."""
    import argparse

    import learning
    from judge import Judge, load_real

    train_x, train_y = load_real("shapes", 16, "train", limit=200)
    test_x, test_y = load_real("shapes", 16, "test", limit=100)
    judge = Judge.fit(train_x, train_y, test_x, test_y, steps=5, cross_check_max_train=200)
    args = argparse.Namespace(threads=1, data="shapes", quick=False, vq_args="", mg_args="", sample_args="")
    vq_metrics = [{"step": 600, "psnr": 27.0, "codebook_usage": 0.9, "perplexity": 40.0}]
    mg_last = {"step": 6500, "eval_masked_acc": 0.5, "eval_loss": 1.7}
    score = judge.score(test_x, test_y)
    for worst, expected in ((0.86, "PASS"), (0.84, "FAIL")):
        row = {**score, "cfg": "default: cfg 1", "setting": "default", "wall": 1.0, "cpu": 1.0,
               "worst_class": worst, "worst_name": "star"}
        learning.report(args, "work", "shapes", vq_metrics, 60.0, 60.0, mg_last, 300.0, 300.0, judge, [row])
        out = capsys.readouterr().out.splitlines()
        # the budget counts sampling as 500 images: 1 CPU-s for 100 samples counts 5 s
        assert [line for line in out if "within 10 CPU-minutes" in line] == [
            f"- PASS: default: cfg 1: both stages + sampling 500 within 10 CPU-minutes: "
            f"{60 + 300 + 500 / score['n']:.0f} s CPU"]
        lines = [line for line in out if "no class below 85%" in line]
        per_class = score["n"] // judge.num_classes  # 10: the shapes' held-out images are balanced
        assert lines == [f"- {expected}: sampling defaults: no class below 85% recognised: worst class star at "
                         f"{worst:.0%} of {per_class} samples (± {math.sqrt(0.85 * 0.15 / per_class):.0%} at the bar)"]
