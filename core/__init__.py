"""The stage-neutral foundation both stages and every script build on; it imports neither stage.

| module | what |
|---|---|
| `core.cli` | the command line from config dataclasses, `fail()` for clear errors |
| `core.runs` | the run-folder format, `Run` (a typed view of one), weights in and out |
| `core.checkpoints` | atomic, verified resume checkpoints (safetensors, JSON, weights-only pickles); the step counters |
| `core.lock` | one run per folder: `RUN_DIR/.lock` |
| `core.preempt` | SIGTERM/SIGINT: checkpoint after the current step, then stop |
| `core.train` | the training config base, AdamW and LR schedule, the update step, the EMA |
| `core.order` | data order as a pure function of (seed, step), so resume is exact |
| `core.accel` | accelerate set-up |
| `core.metrics_log` | metrics.jsonl and TensorBoard |
| `core.data` | image datasets: CIFAR-10, built-in shapes, streamed image folders, `hf:` sources; loaders |
| `core.datasets_hf` | Hugging Face `datasets` as a source (`--data hf:...`) |
| `core.image_cache` | the pre-resized uint8 image cache for small images |
| `core.sharded` | files that several processes fill shard by shard, resumable, written atomically |
| `core.images` | pixels to uint8 and PNG grids |
| `core.export_cli` | `export_dataset.py`: a dataset split as reference images for FID |
| `core.hub` | run folders on the Hugging Face Hub: fetch (cached, offline) and publish with a model card |
| `core.publish_cli` | `publish.py` |
"""
