"""Metrics reach accelerate's trackers: TensorBoard event files next to metrics.jsonl."""

import json

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@pytest.mark.slow
def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path, tiny_args, train_vq_module):
    out = tmp_path / "run"
    train_vq_module.main([*tiny_args, "--out", str(out)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "logs" / "train_vq"))
    events.Reload()
    for name in ("psnr", "codebook_usage", "perplexity", "images_per_s", "wall_time_s", "global_batch"):
        logged = events.Scalars(name)
        assert [e.step for e in logged] == [r["step"] for r in records]
        assert [e.value for e in logged] == pytest.approx([r[name] for r in records], rel=1e-5)
