"""The stage-neutral foundation both stages and every script build on; it imports neither stage.

| module | what |
|---|---|
| `core.cli` | the command line from config dataclasses, `fail()` for clear errors |
| `core.runs` | the run-folder format, `Run` (a typed view of one), weights in and out |
| `core.checkpoints` | atomic, verified resume checkpoints; the step counters |
| `core.train` | the training config base, AdamW and LR schedule, the update step, the EMA |
| `core.order` | data order as a pure function of (seed, step), so resume is exact |
| `core.accel` | accelerate set-up |
| `core.metrics_log` | metrics.jsonl and TensorBoard |
| `core.data` | image datasets: CIFAR-10, built-in shapes, image folders |
| `core.images` | pixels to uint8 and PNG grids |
| `core.export_cli` | `export_dataset.py`: a dataset split as reference images for FID |
"""
