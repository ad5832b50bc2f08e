"""The stage-neutral foundation (`core`): data order, checkpoints, run folders, CLI from dataclasses, helpers."""

import argparse
import json
import math
import resource
import shutil
import signal
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from vqvae.config import VQConfig, VQTrainConfig
from core.accel import make_accelerator
from core.checkpoints import MANIFEST_NAME, Checkpoints, TrainState, verify_checkpoint
from core.cli import ConfigError, add_config_args, apply_overrides, config_from_dict, explicit_overrides
from core.metrics_log import MetricsLog
from core.order import StepBatchSampler, step_generator
from core.runs import (CONFIG_NAME, METRICS_NAME, RunFolderError, atomic_write_text, load_weights, read_run_config,
                       save_weights, write_run_config)
from core.train import check_finite, lr_schedule, make_ema, nonfinite_message


# ----------------------------------------------------------------------------- StepBatchSampler

SAMPLER_CASES = [  # (num_items, global_batch, world_size, grad_accum)
    (20, 4, 1, 1),
    (20, 4, 2, 1),
    (20, 8, 2, 2),
    (21, 6, 3, 2),   # steps straddle epoch boundaries
    (7, 12, 2, 3),   # a step is bigger than the dataset
    (64, 16, 4, 1),
]


def _samplers(n, gb, ws, ga, steps, start_step=0, seed=3):
    return [StepBatchSampler(n, gb, seed=seed, rank=r, world_size=ws, grad_accum=ga, start_step=start_step,
                             total_steps=steps) for r in range(ws)]


@pytest.mark.parametrize("n,gb,ws,ga", SAMPLER_CASES)
def test_sampler_ranks_together_cover_each_step_exactly(n, gb, ws, ga):
    steps = math.ceil(3 * n / gb) + 1  # at least three epochs
    samplers = _samplers(n, gb, ws, ga, steps)
    per_rank = [list(s) for s in samplers]
    assert all(len(batches) == steps * ga == len(s) for batches, s in zip(per_rank, samplers))
    assert all(len(b) == gb // (ws * ga) for batches in per_rank for b in batches)
    for step in range(steps):
        # micro-batch m of rank r holds positions [(m * ws + r) * micro, ...) of the step's global order
        together = [i for m in range(ga) for r in range(ws) for i in per_rank[r][step * ga + m]]
        assert together == samplers[0].global_indices(step).tolist()
        first_epoch, last_epoch = (step * gb) // n, ((step + 1) * gb - 1) // n
        if first_epoch == last_epoch:  # within one epoch: no image twice, and the ranks' shares are disjoint
            assert len(set(together)) == gb
            shares = [{i for m in range(ga) for i in per_rank[r][step * ga + m]} for r in range(ws)]
            assert sum(map(len, shares)) == len(set().union(*shares)) == gb


@pytest.mark.parametrize("n,gb,ws,ga", SAMPLER_CASES)
def test_sampler_every_epoch_is_a_permutation(n, gb, ws, ga):
    sampler = _samplers(n, gb, ws, ga, None)[0]
    epochs = 4
    stream = torch.cat([sampler.global_indices(s) for s in range(math.ceil(epochs * n / gb))])[: epochs * n]
    orders = stream.view(epochs, n)
    for order in orders:
        assert sorted(order.tolist()) == list(range(n))
    assert len({tuple(o.tolist()) for o in orders}) > 1  # reshuffled, not one fixed order repeated


@pytest.mark.parametrize("n,gb,ws,ga", SAMPLER_CASES)
def test_sampler_started_at_step_k_is_the_tail_of_a_full_run(n, gb, ws, ga):
    steps = math.ceil(2 * n / gb) + 2
    for k in (1, steps // 2, steps - 1):
        for rank in range(ws):
            full = list(_samplers(n, gb, ws, ga, steps)[rank])
            resumed = _samplers(n, gb, ws, ga, steps, start_step=k)[rank]
            assert list(resumed) == full[k * ga:]
            assert len(resumed) == (steps - k) * ga


def test_sampler_order_depends_on_its_seed_only():
    a = StepBatchSampler(50, 10, seed=1, rank=0, world_size=1)
    first = [a.global_indices(s).tolist() for s in range(10)]
    torch.manual_seed(1234)
    torch.rand(100)  # the global RNG has no say in the data order
    again = StepBatchSampler(50, 10, seed=1, rank=0, world_size=1)
    assert [again.global_indices(s).tolist() for s in range(10)] == first
    other = StepBatchSampler(50, 10, seed=2, rank=0, world_size=1)
    assert [other.global_indices(s).tolist() for s in range(10)] != first


def test_sampler_rejects_bad_divisibility_and_empty_data():
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(100, 6, seed=0, rank=0, world_size=4)
    with pytest.raises(ValueError, match="divisible"):
        StepBatchSampler(100, 8, seed=0, rank=0, world_size=2, grad_accum=3)
    with pytest.raises(ValueError, match="empty"):
        StepBatchSampler(0, 8, seed=0, rank=0, world_size=1)
    with pytest.raises(TypeError):
        len(StepBatchSampler(10, 2, seed=0, rank=0, world_size=1))  # endless


def test_step_generator_is_a_function_of_its_arguments():
    draw = lambda *a: torch.rand(5, generator=step_generator(*a))  # noqa: E731
    assert torch.equal(draw(0, 3, 0, 0), draw(0, 3, 0, 0))
    variants = [draw(1, 3, 0, 0), draw(0, 4, 0, 0), draw(0, 3, 1, 0), draw(0, 3, 0, 1)]
    assert all(not torch.equal(draw(0, 3, 0, 0), v) for v in variants)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def accelerator():
    """A real single-process CPU Accelerator; accelerate's singletons are reset afterwards."""
    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _prepared(acc, in_features=6, out_features=5):
    torch.manual_seed(0)
    model = nn.Linear(in_features, out_features)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    return model, optimizer, TrainState()


def _train_step(model, optimizer, state):
    loss = model(torch.randn(4, model.in_features)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    state.step += 1


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def three_checkpoints(tmp_path, accelerator):
    """Checkpoints at steps 1, 2, 3 of a tiny model, with the weights each one holds."""
    model, optimizer, state = _prepared(accelerator)
    checkpoints = Checkpoints(tmp_path, accelerator, keep_last=5, extra_state={"train_state": state})
    weights = {}
    for _ in range(3):
        _train_step(model, optimizer, state)
        checkpoints.save(state.step)
        weights[state.step] = _snapshot(model)
    return checkpoints, model, state, weights


def _flip_byte(path: Path, offset: int = -20):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoints_are_written_complete_and_verify(three_checkpoints):
    checkpoints, *_ = three_checkpoints
    found = checkpoints.all()
    assert [p.name for p in found] == ["step_00000001", "step_00000002", "step_00000003"]
    for path in found:
        assert verify_checkpoint(path) is None
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= set(manifest["files"])
    assert not [p for p in checkpoints.root.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "truncated"),
    ("flip", "checksum"),
    ("delete_file", "missing"),
    ("delete_manifest", "manifest"),
    ("garble_manifest", "manifest"),
])
def test_verify_checkpoint_detects_damage(three_checkpoints, damage, reason):
    checkpoints, *_ = three_checkpoints
    folder = checkpoints.all()[-1]
    weights = folder / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif damage == "flip":
        _flip_byte(weights)  # same size, different content
    elif damage == "delete_file":
        (folder / "optimizer.bin").unlink()
    elif damage == "delete_manifest":
        (folder / MANIFEST_NAME).unlink()
    else:
        (folder / MANIFEST_NAME).write_text('{"step": 3, "fil')
    problem = verify_checkpoint(folder)
    assert problem is not None and reason in problem
    assert verify_checkpoint(checkpoints.all()[-2]) is None


def test_resume_latest_falls_back_past_a_damaged_checkpoint(three_checkpoints):
    checkpoints, model, state, weights = three_checkpoints
    _flip_byte(checkpoints.all()[-1] / "model.safetensors")
    with torch.no_grad():
        model.weight.fill_(123.0)
    state.step = 99
    with pytest.warns(UserWarning, match="step_00000003"):
        used = checkpoints.resume("latest")
    assert used.name == "step_00000002"
    assert _equal(_snapshot(model), weights[2])
    assert state.step == 2  # the counters come back with the weights


def test_resume_an_explicit_checkpoint(three_checkpoints):
    checkpoints, model, state, weights = three_checkpoints
    used = checkpoints.resume(str(checkpoints.all()[0]))
    assert used.name == "step_00000001" and state.step == 1
    assert _equal(_snapshot(model), weights[1])
    with pytest.raises(RunFolderError, match="no such checkpoint"):
        checkpoints.resume(str(checkpoints.root / "step_00000042"))


def test_resume_an_explicit_checkpoint_from_another_folder(three_checkpoints, tmp_path):
    """A checkpoint copied elsewhere is loaded as asked, not swapped for one of this run's."""
    checkpoints, model, state, weights = three_checkpoints
    elsewhere = tmp_path / "elsewhere" / "step_00000007"
    shutil.copytree(checkpoints.all()[-1], elsewhere)  # holds step 3's weights under a higher step number
    for path in checkpoints.all()[1:]:
        shutil.rmtree(path)
    used = checkpoints.resume(str(elsewhere))
    assert used.resolve() == elsewhere.resolve()
    assert _equal(_snapshot(model), weights[3])


def test_resume_fails_clearly_when_nothing_is_usable(three_checkpoints, tmp_path, accelerator):
    checkpoints, *_ = three_checkpoints
    for path in checkpoints.all():
        (path / "optimizer.bin").unlink()
    with pytest.warns(UserWarning, match="unusable"), pytest.raises(RunFolderError, match="every one is damaged"):
        checkpoints.resume("latest")
    with pytest.raises(RunFolderError, match="no checkpoint"):
        Checkpoints(tmp_path / "empty", accelerator, keep_last=1).resume("latest")


def test_keep_last_prunes_the_oldest(tmp_path, accelerator):
    model, optimizer, state = _prepared(accelerator)
    checkpoints = Checkpoints(tmp_path, accelerator, keep_last=2, extra_state={"train_state": state})
    for _ in range(4):
        _train_step(model, optimizer, state)
        checkpoints.save(state.step)
    assert [p.name for p in checkpoints.all()] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in checkpoints.root.iterdir()) == ["step_00000003", "step_00000004"]
    with pytest.raises(ValueError, match="keep_last"):
        Checkpoints(tmp_path, accelerator, keep_last=0)


@contextmanager
def disk_full_beyond(nbytes: int):
    """A real full disk: writing past `nbytes` of any file fails with OSError(EFBIG) (RLIMIT_FSIZE, SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_save_leaves_earlier_files_intact(tmp_path, accelerator):
    torch.manual_seed(0)
    model, _ = accelerator.prepare(nn.Linear(128, 128), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0))
    checkpoints = Checkpoints(tmp_path, accelerator, keep_last=3, extra_state={"train_state": TrainState()})
    checkpoints.save(1)
    save_weights(model, tmp_path / "model.safetensors")
    reference = _snapshot(model)
    with torch.no_grad():
        model.weight.add_(1.0)

    with disk_full_beyond(16 * 1024):  # the weights take 66 KB
        with pytest.raises(Exception, match="File too large|os error 27"):
            checkpoints.save(2)
        with pytest.raises(Exception, match="File too large|os error 27"):
            save_weights(model, tmp_path / "model.safetensors")

    assert sorted(p.name for p in checkpoints.root.iterdir()) == ["step_00000001"]  # no .tmp_*, no partial step_2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "model.safetensors"]
    assert verify_checkpoint(checkpoints.root / "step_00000001") is None
    fresh = nn.Linear(128, 128)
    load_weights(fresh, tmp_path / "model.safetensors")  # the old weights file is whole
    assert _equal(fresh.state_dict(), reference)
    assert checkpoints.resume("latest").name == "step_00000001"
    assert _equal(_snapshot(model), reference)


# ----------------------------------------------------------------------------- weights and run folders


def test_save_and_load_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    source, target = nn.Linear(3, 4), nn.Linear(3, 4)
    save_weights(source, tmp_path / "w.safetensors")
    load_weights(target, tmp_path / "w.safetensors")
    assert _equal(source.state_dict(), target.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left


def test_load_weights_errors_clearly(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    with pytest.raises(RunFolderError, match="missing"):
        load_weights(nn.Linear(3, 4), path)
    save_weights(nn.Linear(3, 4), path)
    with pytest.raises(RunFolderError, match="does not match"):
        load_weights(nn.Linear(3, 5), path)  # wrong shape
    with pytest.raises(RunFolderError, match="does not match"):
        load_weights(nn.Sequential(nn.Linear(3, 4)), path)  # wrong names
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RunFolderError, match="truncated or corrupt"):
        load_weights(nn.Linear(3, 4), path)


def test_run_config_round_trip_and_clear_errors(tmp_path):
    model_cfg, train_cfg = VQConfig(quantizer="fsq", fsq_levels=(5, 5, 3)), VQTrainConfig(steps=7)
    run = tmp_path / "run"
    run.mkdir()
    write_run_config(run, "vqvae", model=model_cfg, train=train_cfg, data={"data": "shapes"})
    saved = read_run_config(run, "vqvae")
    assert config_from_dict(VQConfig, saved["model"]) == model_cfg  # lists come back as tuples
    assert config_from_dict(VQTrainConfig, saved["train"]) == train_cfg
    assert saved["data"] == {"data": "shapes"}
    assert [p.name for p in run.iterdir()] == [CONFIG_NAME]

    with pytest.raises(RunFolderError, match="'vqvae' run, expected a 'maskgit' run"):
        read_run_config(run, "maskgit")
    with pytest.raises(RunFolderError, match="not a folder"):
        read_run_config(tmp_path / "nowhere", "vqvae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="no config.json"):
        read_run_config(tmp_path / "empty", "vqvae")
    (run / CONFIG_NAME).write_text('{"stage": "vqvae", "mod')
    with pytest.raises(RunFolderError, match="corrupt"):
        read_run_config(run, "vqvae")


def test_config_from_dict_rejects_unknown_keys():
    data = asdict(VQTrainConfig())
    data["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match="learning_rate"):
        config_from_dict(VQTrainConfig, data)


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# ----------------------------------------------------------------------------- CLI from dataclasses


@dataclass
class Example:
    count: int = 3                              # an int
    rate: float = 0.5                           # a float
    flag: bool = True                           # a bool
    name: str = "abc"                           # a str
    sizes: tuple[int, ...] = (1, 2)             # a tuple
    limit: Optional[int] = None                 # an Optional written the old way
    scale: float | None = 2.0                   # an Optional written the new way
    tags: tuple[str, ...] = field(default=("x",))


def _cli(argv, *classes):
    parser = argparse.ArgumentParser()
    add_config_args(parser, *classes)
    return parser.parse_args(argv)


def _argv_for(config) -> list[str]:
    argv = []
    for key, value in asdict(config).items():
        argv.append("--" + key.replace("_", "-"))
        argv += [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
    return argv


def test_cli_round_trips_every_field_type():
    target = Example(count=-4, rate=1e-3, flag=False, name="x y", sizes=(7, 8, 9), limit=12, scale=None,
                     tags=("p", "q"))
    result = apply_overrides(Example(), _cli(_argv_for(target), Example))
    assert result == target
    assert all(type(getattr(result, k)) is type(getattr(target, k)) for k in asdict(target))
    assert all(type(s) is int for s in result.sizes)
    back = apply_overrides(target, _cli(_argv_for(Example()), Example))
    assert back == Example()  # None -> 12 -> None and back, True -> False -> True


def test_cli_leaves_unpassed_fields_alone():
    args = _cli(["--rate", "0.25"], Example)
    assert apply_overrides(Example(), args) == Example(rate=0.25)
    assert explicit_overrides([Example], args) == {"rate": 0.25}
    assert apply_overrides(Example(), _cli([], Example)) == Example()


@pytest.mark.parametrize("argv,value", [(["true"], True), (["0"], False), (["Yes"], True), (["off"], False),
                                        ([], True)])
def test_cli_bool_spellings(argv, value):
    assert apply_overrides(Example(flag=not value), _cli(["--flag", *argv], Example)).flag is value


def test_cli_rejects_bad_values():
    for argv in (["--flag", "maybe"], ["--count", "1.5"], ["--sizes"]):
        with pytest.raises(SystemExit):
            _cli(argv, Example)


def test_cli_covers_the_real_configs():
    args = _cli(["--fsq-levels", "5", "5", "3", "--quantizer", "fsq", "--rotation-trick", "false", "--lr", "3e-4",
                 "--steps", "9"], VQConfig, VQTrainConfig)
    model_cfg, train_cfg = apply_overrides(VQConfig(), args), apply_overrides(VQTrainConfig(), args)
    assert model_cfg == VQConfig(quantizer="fsq", fsq_levels=(5, 5, 3), rotation_trick=False)
    assert train_cfg == VQTrainConfig(lr=3e-4, steps=9)
    with pytest.raises(ValueError, match="steps"):
        apply_overrides(VQTrainConfig(), _cli(["--steps", "0"], VQTrainConfig))  # validated on replace


# ----------------------------------------------------------------------------- small helpers


def test_train_state_round_trips():
    state = TrainState(step=5, images_seen=40, skipped_steps=1)
    other = TrainState()
    other.load_state_dict(state.state_dict())
    assert other == state


@pytest.mark.parametrize("kind,min_ratio", [("cosine", 0.0), ("cosine", 0.1), ("constant", 0.0)])
def test_lr_schedule_shape(kind, min_ratio):
    warmup, total, base = 4, 20, 2.0
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = lr_schedule(optimizer, kind, warmup, total, min_ratio)
    lrs = []
    for _ in range(total + 3):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # rising during warm-up
    assert lrs[0] > 0 and lrs[warmup - 1] == pytest.approx(base)
    tail = lrs[warmup - 1:]
    if kind == "constant":
        assert all(lr == pytest.approx(base) for lr in tail)
    else:
        assert all(a >= b - 1e-12 for a, b in zip(tail, tail[1:]))  # never rising after warm-up
        assert lrs[(warmup + total) // 2] == pytest.approx(base * (1 + min_ratio) / 2)  # cosine's midpoint
        assert lrs[total] == pytest.approx(base * min_ratio) and lrs[-1] == pytest.approx(base * min_ratio)
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule(optimizer, "linear", warmup, total)


def test_metrics_log_appends_plain_json(tmp_path, accelerator):
    log = MetricsLog(tmp_path, accelerator)
    log.write({"step": 1, "loss": torch.tensor(0.5), "note": "x"})
    log.write({"step": 2, "loss": 0.25})
    lines = [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "note": "x"}, {"step": 2, "loss": 0.25}]


def test_check_finite_and_message(tmp_path, accelerator):
    assert check_finite(torch.tensor(1.5), accelerator)
    assert not check_finite(torch.tensor(float("nan")), accelerator)
    assert not check_finite(torch.tensor(float("-inf")), accelerator)
    model, optimizer, state = _prepared(accelerator)
    checkpoints = Checkpoints(tmp_path, accelerator, keep_last=2, extra_state={"train_state": state})
    # `step` counts completed updates, so the failing update is the next one
    assert "step 8" in nonfinite_message(torch.tensor(float("nan")), 7, checkpoints)
    checkpoints.save(3)
    message = nonfinite_message(torch.tensor(float("nan")), 7, checkpoints)
    assert "nan" in message and "step_00000003" in message and "--skip-nonfinite" in message


def test_make_accelerator_leaves_the_schedule_to_us(tmp_path):
    try:
        acc = make_accelerator(tmp_path, mixed_precision="no", grad_accum=2, cpu=True)
        assert acc.num_processes == 1 and acc.device.type == "cpu"
        assert acc.gradient_accumulation_steps == 2
        assert acc.step_scheduler_with_optimizer is False
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_ema_warmup_matches_its_closed_form():
    # after the first update copies the weights (0), k updates towards 1 leave the initial share
    # prod_{n=1..k} (1+n)/(10+n) = (k+1)! 10! / (k+10)! (telescoping), while that stays below `decay`
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = make_ema(model, 0.999)
    ema.update_parameters(model)
    torch.nn.init.ones_(model.weight)
    k = 3
    for _ in range(k):
        ema.update_parameters(model)
    initial_share = math.factorial(k + 1) * math.factorial(10) / math.factorial(k + 10)
    assert ema.module.weight.item() == pytest.approx(1 - initial_share, rel=1e-6)
    # 1.7% of the initial weights left, where a fixed decay of 0.999 would have kept 0.999**3 = 99.7%
    assert initial_share == pytest.approx(24 / (11 * 12 * 13))
