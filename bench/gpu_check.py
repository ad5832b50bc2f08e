"""One prepared device check: correctness and speed of sampling and training, one JSON file and Markdown tables.

    python bench/gpu_check.py --device cuda                          # <= 8 minutes on one H200-class GPU
    python bench/gpu_check.py --device cpu --quick --out /tmp/x.json # seconds: every code path on the CPU
    python bench/gpu_check.py --device cuda --sections correctness sampling_speed   # a rerun of some sections

Sections, in the order they run (the time budget skips what is left once it is spent):

* environment: versions, the GPU(s), TF32 flags, the compile backend.
* correctness: bf16 sampling against fp32 (same seed: token agreement, greedy agreement, PSNR between the two
  decoded batches); the fixed-shape run a CUDA graph replays (`maskgit.sampler.sample_fixed`) against eager
  `sample`, and a fullgraph dynamo trace of it (no host sync, no data-dependent shape: what a capture needs);
  `torch.compile` against eager; the CUDA-graph replay (`CompiledSampler(cuda_graphs=True)`) against eager.
* sampling_speed: images/s and latency of our sampler (eager, CUDA graph, compiled forward, both) at batch 1, 32,
  256 and 4/8/16 steps, against x-transformers' NonAutoregressiveWrapper.generate on the same net and KV-cached
  autoregressive decoding (AutoregressiveWrapper.generate, cache_kv=True) of the same width and depth; the
  target net: 8x8 codes, codebook 1024, 256 wide, 6 layers, 8 heads, 10 classes.
* sampler_share: the share of a run's time spent outside the transformer forward = 1 - (the same forwards
  alone) / (the whole run), eager and graph-replayed.
* train_speed: steps/s, images/s and peak GPU memory of one optimizer update of each stage through the training
  scripts' own path (`core.train.update_step` on an Accelerator from `core.accel.make_accelerator`, the stages'
  `build_optimizer`; stage 1 with its discriminator update and, when its VGG weights are on the machine, LPIPS;
  stage 2 with the EMA), in fp32, bf16 and bf16 + torch.compile, at the cifar10 sizes.
* decoder_end_to_end: the tokenizer decode in fp32, bf16, bf16 + channels-last and bf16 + channels-last +
  compile, and end-to-end images/s (sampling + decode) with the decoder's share, at 32 px and 256 px.
* train_speed_256: train_speed at 256 px (`imagenet256` tokenizer, batch 32; stage 2 with the cifar10 stage-2
  shape on 16x16 codes, codebook 16384).
* ddp: 2-process `accelerate launch` training of stage 2 when the machine has 2+ GPUs (else skipped; with
  --device cpu --ddp-smoke, two CPU processes over gloo, to exercise the launch path).
* targets: PASS/FAIL lines with their ratios (8 steps, 8x8 codes, codebook 1024, 256 wide, 6 layers): batch-1
  latency >= 10x better than KV-cached AR; time outside the forward <= 5% at batch 32; bf16 + compile >= 2x
  fp32 eager training throughput.

Every section runs in try/except: an error is recorded (text and traceback tail) in the JSON and the tables, and
the next section runs. The JSON is rewritten after every section, so a killed run keeps what it finished. Weights
are random (nothing is downloaded): speed does not depend on them; the sampling net's output layer is sharpened
x4 so that its distributions are peaked like a trained model's and token agreement means something.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from common import machine_line, sync, time_call

from maskgit.config import MASKGIT_PRESETS, MaskGITConfig
from maskgit.model import MaskGIT, build_maskgit
from maskgit.sampler import (CompiledSampler, SamplerConfig, capture_cuda_graph, sample, sample_fixed,
                             sample_fixed_graph)
from vqvae.config import VQ_PRESETS
from vqvae.model import VQVAE

REPO = Path(__file__).resolve().parents[1]

SECTIONS = ("environment", "correctness", "sampling_speed", "sampler_share", "train_speed", "decoder_end_to_end",
            "train_speed_256", "ddp", "targets")

# Targets (see the module docstring)
TARGET_STEPS, TARGET_BATCH = 8, 32
MIN_VS_AR_LATENCY = 10.0
MAX_OUTSIDE = 0.05
MIN_TRAIN_SPEEDUP = 2.0

CLASSES = 10
MIB = 2**20
TRAIN_MODES = ("fp32", "bf16", "bf16+compile")
DECODERS = ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile")


# ----------------------------------------------------------------------------------------------
# Arguments and shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON file to write")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="seconds after which the sections not yet started are skipped (with a note)")
    p.add_argument("--hard-limit-s", type=float, default=0.0,
                   help="seconds after which a running section is interrupted and the results so far written "
                        "(0: budget + 45)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats: every code path in seconds")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor on cuda, eager on the CPU, where inductor's C++ "
                        "build would take minutes)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip every torch.compile variant (a quicker rerun when compilation is slow or broken)")
    p.add_argument("--ddp-smoke", action="store_true",
                   help="with --device cpu: run the ddp section's 2-process launch on the CPU (gloo), a smoke test")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--worker", choices=["ddp"], help=argparse.SUPPRESS)  # one process of the ddp section
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.cuda = args.device.type == "cuda"
    if args.compile_backend is None:
        args.compile_backend = "inductor" if args.cuda else "eager"
    if not args.hard_limit_s:
        args.hard_limit_s = args.budget_s + 45
    args.shapes = shapes(args.quick)
    return args


def shapes(quick: bool) -> dict:
    """Every size the check uses; --quick shrinks each to seconds on the CPU, keeping the structure."""
    if quick:
        return dict(
            sample_net=dict(dim=64, depth=2, heads=4, codebook=64, grid=4),
            steps=(4, 8), batches=(1, 4), target_batch=4, repeats=2, per_setting_s=0.05,
            train_warmup=1, train_steps=2, compile_warmup=1,
            # (name, stage-1 preset, image size, batch, stage-2 preset, grid, codebook, batch)
            small=dict(vq="tiny", image=16, vq_batch=4, mg="tiny", grid=4, codebook=64, mg_batch=4),
            large=dict(vq="tiny", image=32, vq_batch=2, mg="tiny", grid=8, codebook=256, mg_batch=4),
            mg_overrides=dict(dim=64, depth=2, heads=4),
            decode_batches=(4,), e2e_batch=4, large_e2e_batch=2,
            # the large size runs the small size's code again: in quick mode only its cheapest variants
            large_train_modes=("fp32",), large_decoders=("fp32", "bf16+channels_last"),
        )
    return dict(
        sample_net=dict(dim=256, depth=6, heads=8, codebook=1024, grid=8),
        steps=(4, 8, 16), batches=(1, 32, 256), target_batch=TARGET_BATCH, repeats=10, per_setting_s=0.4,
        train_warmup=3, train_steps=10, compile_warmup=3,
        small=dict(vq="cifar10", image=32, vq_batch=128, mg="cifar10", grid=8, codebook=1024, mg_batch=256),
        large=dict(vq="imagenet256", image=256, vq_batch=32, mg="cifar10", grid=16, codebook=16384, mg_batch=256),
        mg_overrides={},
        decode_batches=(32, 256), e2e_batch=32, large_e2e_batch=32,
        large_train_modes=TRAIN_MODES, large_decoders=DECODERS,
    )


# ----------------------------------------------------------------------------------------------
# Budget, results, timing


class Skip(Exception):
    """A section or row left out on purpose; the message is the recorded reason."""


class HardStop(BaseException):
    """The hard time limit fired: stop the section now and write what is there."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def need(self, seconds: float, what: str) -> None:
        """Skip `what` when less than `seconds` of the budget is left."""
        if self.left() < seconds:
            raise Skip(f"time budget: {what} needs about {seconds:.0f} s, {max(self.left(), 0):.0f} s of "
                       f"--budget-s {self.seconds:.0f} left")


def timeit(fn, device, *, repeats: int, budget_s: float, warmup: int = 1) -> dict:
    """Median wall seconds of fn() after `warmup` untimed calls; stops repeating after budget_s of timed runs."""
    times = time_call(fn, device, repeats=repeats, warmup=warmup, budget_s=budget_s)
    return {"seconds": statistics.median(times), "runs": len(times)}


def amp(device, bf16: bool):
    """bf16 autocast on the device when asked (the CPU too: the correctness check compares precisions there)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def run_bf16(args) -> bool:
    """Speed runs use bf16 autocast on a GPU (what the cifar10 presets train and sample with), fp32 on the CPU."""
    return args.cuda


def free(device) -> None:
    """Give the GPU memory of finished rows back (a full gc takes ~0.5 s with dynamo loaded: GPU only)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()[:2000]


def tail_of_traceback() -> str:
    return "".join(traceback.format_exc()).strip()[-3000:]


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def fmt(x, digits: int = 3) -> str:
    if x is None or isinstance(x, str):
        return "-" if x is None else x
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def pct(x, digits: int = 1) -> str:
    """A share as a percentage; whatever else (None, "nan" from the JSON) as it is."""
    return f"{x:.{digits}%}" if isinstance(x, (int, float)) and not isinstance(x, bool) else fmt(x)


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def jsonable(x):
    """Non-finite floats as strings ("inf"), tuples as lists: strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state; each row builds its own Accelerator (another mixed precision)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ----------------------------------------------------------------------------------------------
# Models (random weights)


def sampling_net(args, grid: int | None = None, codebook: int | None = None, dim=None, depth=None,
                 heads=None) -> MaskGIT:
    """The class-conditional MaskGIT whose sampling is measured, sharpened like a trained model (see docstring)."""
    s = args.shapes["sample_net"]
    torch.manual_seed(0)
    cfg = MaskGITConfig(dim=dim or s["dim"], depth=depth or s["depth"], heads=heads or s["heads"], dropout=0.0)
    grid, codebook = grid or s["grid"], codebook or s["codebook"]
    model = build_maskgit(cfg, codebook_size=codebook, grid=(grid, grid), num_classes=CLASSES)
    with torch.no_grad():
        model.net.to_logits.weight.mul_(4.0)
        model.pos_emb.scale.fill_(1.0)
    return model.to(args.device).eval()


def reference_models(args, model: MaskGIT):
    """x-transformers' NonAutoregressiveWrapper on our net, and a KV-cached AR decoder of the same width and depth."""
    from x_transformers import AutoregressiveWrapper, Decoder, NonAutoregressiveWrapper, TransformerWrapper

    s = args.shapes["sample_net"]
    K, n = model.codebook_size, model.seq_len
    nar = NonAutoregressiveWrapper(model.net, mask_id=K, steps=8, schedule="cosine").eval()
    torch.manual_seed(0)
    ar = AutoregressiveWrapper(TransformerWrapper(
        num_tokens=K + 1, max_seq_len=n + 1,  # id K is the start token
        attn_layers=Decoder(dim=s["dim"], depth=s["depth"], heads=s["heads"], attn_dim_head=s["dim"] // s["heads"],
                            ff_mult=4, attn_flash=True),
    )).to(args.device).eval()
    return nar, ar


def tokenizer(args, preset: str, image_size: int, codebook: int, *, seed_codebook: bool) -> VQVAE:
    """A tokenizer of `preset`'s architecture at `image_size` with `codebook` codes ("vq"); with seed_codebook its
    codebook is k-means-seeded from random images (a fresh one is all zeros: every code would decode alike)."""
    cfg = VQ_PRESETS[preset][0]
    if cfg.quantizer == "vq" or codebook != cfg.effective_codebook_size:
        cfg = dataclasses.replace(cfg, quantizer="vq", codebook_size=codebook)
    cfg = dataclasses.replace(cfg, image_size=image_size, kmeans_iters=2)
    torch.manual_seed(0)
    vq = VQVAE(cfg, sync_codebook=False).to(args.device)
    if seed_codebook:
        side = image_size // cfg.downsample
        count = max(8, -(-codebook // (side * side)))
        with torch.no_grad():
            vq.train()(torch.rand(count, 3, image_size, image_size, device=args.device) * 2 - 1)
    return vq.eval()


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two image batches in [-1, 1] (peak 1 after mapping to [0, 1])."""
    mse = (((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


# ----------------------------------------------------------------------------------------------
# Sections


def section_environment(args, ctx, budget) -> dict:
    import accelerate
    import x_transformers  # noqa: F401
    from importlib.metadata import version

    out = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "accelerate": accelerate.__version__, "x_transformers": version("x-transformers"),
        "vector_quantize_pytorch": version("vector-quantize-pytorch"),
        "device": str(args.device), "quick": args.quick, "intra_op_threads": torch.get_num_threads(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "compile_backend": args.compile_backend, "budget_s": args.budget_s,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    out["machine"] = machine_line(args.device)
    if args.cuda:
        props = torch.cuda.get_device_properties(args.device)
        out.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count)
        try:
            import triton

            out["triton"] = triton.__version__
        except ImportError:
            out["triton"] = None
            ctx["notes"].append("triton is not installed: torch.compile's inductor backend cannot build GPU kernels")
    return out


def section_correctness(args, ctx, budget) -> dict:
    dev, s = args.device, args.shapes
    model = sampling_net(args)
    ctx["sample_model"] = model
    b = s["target_batch"]
    labels = torch.arange(b, device=dev) % CLASSES
    config = SamplerConfig(steps=TARGET_STEPS)
    gen = lambda: torch.Generator().manual_seed(1234)  # noqa: E731  (CPU generator: the same draws on any device)
    out = {"batch": b, "steps": TARGET_STEPS, "seed": 1234}

    # bf16 vs fp32, eager
    with amp(dev, False):
        fp32 = sample(model, b, labels, config, generator=gen())
        fp32_greedy = sample(model, b, labels, SamplerConfig(steps=TARGET_STEPS, temperature=0.0), generator=gen())
    with amp(dev, True):
        bf16 = sample(model, b, labels, config, generator=gen())
        bf16_greedy = sample(model, b, labels, SamplerConfig(steps=TARGET_STEPS, temperature=0.0), generator=gen())
    vq = tokenizer(args, s["small"]["vq"], s["small"]["image"], model.codebook_size, seed_codebook=True)
    grid = model.grid
    with torch.no_grad():
        images_fp32 = vq.decode(fp32.view(b, *grid)).clamp(-1, 1)
        images_bf16 = vq.decode(bf16.view(b, *grid)).clamp(-1, 1)
    out["bf16_vs_fp32"] = {"token_agreement": agreement(fp32, bf16),
                           "greedy_token_agreement": agreement(fp32_greedy, bf16_greedy),
                           "decoded_psnr_db": psnr_db(images_fp32, images_bf16),
                           "note": "same CPU generator; decoded by one fp32 tokenizer decoder (random weights, "
                                   "k-means-seeded codebook); bf16 = autocast"}
    del vq

    eager_bf16 = lambda fn, **kw: _with_amp(dev, run_bf16(args), lambda: fn(model, b, labels, config,  # noqa: E731
                                                                          generator=gen(), **kw))
    eager = eager_bf16(sample)
    out["precision"] = "bf16 autocast" if run_bf16(args) else "fp32"

    # the run a CUDA graph replays, without the graph: same tokens as eager by construction (CPU too)
    out["fixed_shape_vs_eager"] = {"token_agreement": agreement(eager_bf16(sample_fixed), eager)}

    if not args.cuda:
        out["fixed_shape_fullgraph_trace"] = fullgraph_trace(args, model, labels)

    # torch.compile (the forward) vs eager
    try:
        if args.no_compile:
            raise Skip("--no-compile")
        budget.need(90 if args.cuda else 10, "torch.compile of the sampling forward")
        sampler = CompiledSampler(compile=True, cuda_graphs=args.cuda, backend=args.compile_backend,
                                  note=ctx["notes"].append)
        ctx["compiled_sampler"] = sampler  # reused by sampling_speed: its compilations are paid here
        t0 = time.perf_counter()
        got = _with_amp(dev, run_bf16(args), lambda: sample(sampler.forward_model(model), b, labels, config,
                                                            generator=gen()))
        out["compile_vs_eager"] = {"token_agreement": agreement(got, eager), "backend": args.compile_backend,
                                   "first_call_s": time.perf_counter() - t0}
    except Skip as why:
        out["compile_vs_eager"] = {"skipped": str(why)}
    except Exception as err:  # noqa: BLE001
        out["compile_vs_eager"] = {"error": error_text(err), "traceback": tail_of_traceback()}

    # CUDA graph replay vs eager
    if not args.cuda:
        out["cuda_graph_vs_eager"] = {"skipped": "CUDA graphs need a CUDA device (the fixed-shape run and its "
                                                 "fullgraph trace above stand in for the capture on the CPU)"}
        out["compile_cuda_graph_vs_eager"] = dict(out["cuda_graph_vs_eager"])
    else:
        try:
            graphs = CompiledSampler(cuda_graphs=True, note=ctx["notes"].append)
            ctx["graph_sampler"] = graphs
            first = _with_amp(dev, True, lambda: graphs(model, b, labels, config, generator=gen()))  # captures
            again = _with_amp(dev, True, lambda: graphs(model, b, labels, config, generator=gen()))  # replays
            fp32_graph = graphs(model, b, labels, config, generator=gen())
            out["cuda_graph_vs_eager"] = {"token_agreement": agreement(again, eager),
                                          "token_agreement_capture_call": agreement(first, eager),
                                          "token_agreement_fp32": agreement(fp32_graph, fp32)}
            out["fixed_shape_fullgraph_trace"] = {"skipped": "on a GPU the capture itself is checked (the trace "
                                                             "runs only to diagnose a failed capture)"}
        except Exception as err:  # noqa: BLE001
            out["cuda_graph_vs_eager"] = {"error": error_text(err), "traceback": tail_of_traceback()}
            # diagnosis: a fullgraph trace fails on a host sync or a data-dependent shape, which a capture cannot hold
            out["fixed_shape_fullgraph_trace"] = fullgraph_trace(args, model, labels)
        try:
            sampler = ctx.get("compiled_sampler")
            if sampler is None:
                raise Skip(out["compile_vs_eager"].get("skipped") or "torch.compile failed above")
            got = _with_amp(dev, True, lambda: sampler(model, b, labels, config, generator=gen()))
            out["compile_cuda_graph_vs_eager"] = {"token_agreement": agreement(got, eager)}
        except Skip as why:
            out["compile_cuda_graph_vs_eager"] = {"skipped": str(why)}
        except Exception as err:  # noqa: BLE001
            out["compile_cuda_graph_vs_eager"] = {"error": error_text(err), "traceback": tail_of_traceback()}
    return out


def fullgraph_trace(args, model, labels) -> dict:
    """Dynamo's fullgraph trace (backend "eager") of the run a CUDA graph replays: one graph means no host sync
    and no data-dependent shape. Its tokens are compared with `sample`'s. Two steps (the trace unrolls them, at
    seconds each): a step that keeps places masked and the final one, the two kinds every run is made of."""
    dev, b = args.device, len(labels)
    config = SamplerConfig(steps=2)
    gen = torch.Generator().manual_seed(1234)
    try:
        t0 = time.perf_counter()
        with torch.no_grad(), amp(dev, run_bf16(args)):
            got = sample_fixed_graph(model, b, labels, config, generator=gen)
            want = sample(model, b, labels, config, generator=torch.Generator().manual_seed(1234))
        return {"token_agreement": agreement(got, want), "one_graph": True, "steps": 2,
                "seconds": time.perf_counter() - t0}
    except Exception as err:  # noqa: BLE001
        return {"one_graph": False, "error": error_text(err)}


def _with_amp(device, bf16: bool, fn):
    with amp(device, bf16):
        return fn()


def sampler_variants(args, ctx, model) -> dict:
    """name -> fn(batch, labels, steps): our sampler eagerly, graph-replayed, with a compiled forward, both."""
    variants = {"eager": lambda b, labels, steps: sample(model, b, labels, SamplerConfig(steps=steps))}
    graphs = ctx.get("graph_sampler") or (CompiledSampler(cuda_graphs=True, note=ctx["notes"].append)
                                          if args.cuda else None)
    if graphs is not None:
        variants["cuda_graph"] = lambda b, labels, steps: graphs(model, b, labels, SamplerConfig(steps=steps))
    compiled = ctx.get("compiled_sampler")
    if compiled is not None:
        forward = compiled.forward_model(model)
        variants["compile"] = lambda b, labels, steps: sample(forward, b, labels, SamplerConfig(steps=steps))
        if args.cuda:
            variants["compile+cuda_graph"] = lambda b, labels, steps: compiled(model, b, labels,
                                                                              SamplerConfig(steps=steps))
    return variants


def section_sampling_speed(args, ctx, budget) -> dict:
    dev, s = args.device, args.shapes
    model = ctx.get("sample_model") or sampling_net(args)
    ctx["sample_model"] = model
    nar, ar = reference_models(args, model)
    K, n = model.codebook_size, model.seq_len
    ctx["ar_steps"] = n
    big = max(s["batches"])
    labels = torch.arange(big, device=dev) % CLASSES
    variants = sampler_variants(args, ctx, model)
    rows, skipped = [], {}
    if "compile" not in variants:
        skipped["compile"] = "torch.compile was skipped or failed in the correctness section"
    if not args.cuda:
        skipped["cuda_graph"] = "CUDA graphs need a CUDA device"
    times = ctx.setdefault("sample_times", {})  # (variant, steps, batch) -> seconds, for later sections

    def measure(method: str, key, b: int, steps: int, fn, warmup: int = 1) -> bool:
        try:
            t = timeit(fn, dev, repeats=s["repeats"], budget_s=s["per_setting_s"], warmup=warmup)
        except Skip:
            raise
        except Exception as err:  # noqa: BLE001
            rows.append(dict(method=method, steps=steps, batch=b, error=error_text(err)))
            return False
        times[key] = t["seconds"]
        rows.append(dict(method=method, steps=steps, batch=b, ms=t["seconds"] * 1e3, images_per_s=b / t["seconds"],
                         runs=t["runs"]))
        return True

    def autoregressive(b: int):
        budget.need(5, f"KV-cached AR decoding at batch {b}")
        prompt = torch.full((b, 1), K, device=dev)
        measure("KV-cached AR", ("ar", n, b), b, n, lambda: ar.generate(prompt, seq_len=n, cache_kv=True))

    # what the targets need first (batch-1 latency at TARGET_STEPS against AR, then the target batch), so that a
    # budget running out leaves the rest, not them
    settings = [(TARGET_STEPS, 1), (TARGET_STEPS, s["target_batch"])]
    settings += [(st, b) for st in s["steps"] for b in s["batches"] if (st, b) not in settings]
    budget_note = None
    with amp(dev, run_bf16(args)):
        try:
            autoregressive(1)
            for steps, b in settings:
                budget.need(5, f"sampling at {steps} steps, batch {b}")
                for name, fn in list(variants.items()):
                    # the first call of a new shape captures / compiles: two warm-up calls
                    if not measure(f"ours {name}", (name, steps, b), b, steps,
                                   lambda: fn(b, labels[:b], steps), warmup=1 if name == "eager" else 2):
                        variants.pop(name)  # one failure per variant is enough
                nar.steps = steps  # the wrapper takes its steps at construction only
                measure("x-transformers NAR wrapper", ("nar", steps, b), b, steps,
                        lambda: nar.generate(batch_size=b))
            for b in s["batches"]:
                if b != 1:
                    autoregressive(b)
        except Skip as why:
            budget_note = str(why)
    net = args.shapes["sample_net"]
    return {"net": dict(net, classes=CLASSES, seq_len=n), "precision": "bf16 autocast" if run_bf16(args) else "fp32",
            "rows": rows, "variants_skipped": skipped, "rest_skipped": budget_note,
            "note": "one generate call for the whole batch, tokens only; median of up to "
                    f"{s['repeats']} timed runs after warm-up (the first call of a graph or compiled shape is "
                    "warm-up)"}


def section_sampler_share(args, ctx, budget) -> dict:
    """1 - (the run's forwards alone) / (the whole run), at TARGET_STEPS: eager, and graph-replayed on a GPU."""
    dev, s = args.device, args.shapes
    model = ctx.get("sample_model") or sampling_net(args)
    ctx["sample_model"] = model
    times = ctx.setdefault("sample_times", {})
    variants = sampler_variants(args, ctx, model)
    steps, K, n = TARGET_STEPS, model.codebook_size, model.seq_len
    rows, budget_note = [], None
    batches = [s["target_batch"]] + [b for b in s["batches"] if b != s["target_batch"]]  # the target's first

    def share_row(mode: str, b: int, labels, forwards_alone) -> dict:
        with torch.no_grad():
            t_fwd = timeit(forwards_alone, dev, repeats=s["repeats"], budget_s=s["per_setting_s"])["seconds"]
        if (mode, steps, b) not in times:
            fn = variants[mode]
            times[mode, steps, b] = timeit(lambda: fn(b, labels, steps), dev, repeats=s["repeats"],
                                           budget_s=s["per_setting_s"], warmup=2)["seconds"]
        total = times[mode, steps, b]
        return dict(mode=mode, batch=b, steps=steps, run_ms=total * 1e3, forwards_ms=t_fwd * 1e3,
                    outside_share=max(0.0, 1 - t_fwd / total))

    with amp(dev, run_bf16(args)):
        try:
            for b in batches:
                budget.need(5, f"sampler share at batch {b}")
                labels = torch.arange(b, device=dev) % CLASSES
                seq = torch.full((b, n), K, device=dev)
                forwards = lambda: [model.logits(seq, labels) for _ in range(steps)]  # noqa: E731
                for mode in ("eager", "cuda_graph"):
                    if mode not in variants:
                        continue
                    try:
                        if mode == "cuda_graph":
                            with torch.no_grad():
                                graph, _ = capture_cuda_graph(forwards, dev)
                            rows.append(share_row(mode, b, labels, graph.replay))
                        else:
                            rows.append(share_row(mode, b, labels, forwards))
                    except Skip:
                        raise
                    except Exception as err:  # noqa: BLE001
                        rows.append(dict(mode=mode, batch=b, steps=steps, error=error_text(err)))
        except Skip as why:
            budget_note = str(why)
    return {"rows": rows, "rest_skipped": budget_note,
            "note": f"forwards alone = the run's {steps} transformer forwards (model.logits on an all-masked batch "
                    "with its labels) timed the same way as the run (eager, or replayed from their own CUDA graph); "
                    "the rest of the run is the sampler's work: drawing, scoring, choosing places, bookkeeping"}


# --- training


def train_rows(args, ctx, budget, size: str) -> dict:
    spec = args.shapes[size]
    rows = []
    for stage in ("stage1", "stage2"):
        for mode in TRAIN_MODES:
            label = dict(stage=stage, size=size, mode=mode)
            try:
                if size == "large" and mode not in args.shapes["large_train_modes"]:
                    raise Skip("--quick: the large size runs fp32 only (the other modes run the same code at the "
                               "small size)")
                if args.no_compile and mode.endswith("compile"):
                    raise Skip("--no-compile")
                compiled = mode.endswith("compile")
                budget.need((120 if compiled else 20) if args.cuda else 3, f"{stage} {size} {mode} training row")
                row = (vq_train_row if stage == "stage1" else maskgit_train_row)(args, spec, mode)
                rows.append(label | row)
            except Skip as why:
                rows.append(label | {"skipped": str(why)})
            except Exception as err:  # noqa: BLE001
                rows.append(label | {"error": error_text(err), "traceback": tail_of_traceback()})
            finally:
                reset_accelerate()
                free(args.device)
    for stage in ("stage1", "stage2"):  # the speed-up the target is about
        base = next((r for r in rows if r["stage"] == stage and r["mode"] == "fp32" and "steps_per_s" in r), None)
        for r in rows:
            if base and r["stage"] == stage and "steps_per_s" in r:
                r["vs_fp32"] = r["steps_per_s"] / base["steps_per_s"]
    ctx.setdefault("train_rows", []).extend(rows)
    return {"rows": rows, "note": "one optimizer update = core.train.update_step (forward, non-finite check, "
                                  "backward, clip, AdamW step, LR schedule), median of timed updates after warm-up; "
                                  "data loading not included; peak memory = torch.cuda.max_memory_allocated since "
                                  "the row started (all earlier rows freed)"}


def _train_timer(args, accelerator, update, compiled: bool) -> dict:
    s = args.shapes
    dev = accelerator.device
    t = timeit(update, dev, repeats=s["train_steps"], budget_s=1e9,
               warmup=s["compile_warmup"] if compiled else s["train_warmup"])
    return t


def _peak_meter(device):
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    return lambda: torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def _make_accelerator(args, tmp: str, mode: str):
    from core.accel import make_accelerator

    reset_accelerate()
    return make_accelerator(tmp, mixed_precision="no" if mode == "fp32" else "bf16", cpu=not args.cuda)


def vq_train_row(args, spec: dict, mode: str) -> dict:
    """Stage 1 as vqvae.train.train runs it: the tokenizer update (recon + quantizer + LPIPS when its weights are
    here + the discriminator's verdict), then the discriminator update on the same images (disc_start=0: the
    steady state after the first 20% of a run)."""
    from core.train import update_step
    from vqvae.objective import generator_losses
    from vqvae.train import build_objective, build_optimizer

    dev = args.device
    model_cfg, train_cfg = VQ_PRESETS[spec["vq"]]
    model_cfg = dataclasses.replace(model_cfg, image_size=spec["image"])
    train_cfg = dataclasses.replace(train_cfg, disc_start=0, disc_weight=train_cfg.disc_weight or 0.5,
                                    batch_size=spec["vq_batch"])
    notes = []
    if train_cfg.perceptual_weight > 0 and not lpips_weights_present(train_cfg):
        # build_objective would stop the process (its fail()): the weights cannot be downloaded here
        train_cfg = dataclasses.replace(train_cfg, perceptual_weight=0.0)
        notes.append("LPIPS left out: its VGG16 weights are not on this machine")
    if args.quick:
        train_cfg = dataclasses.replace(train_cfg, perceptual_weight=0.0)
    b = spec["vq_batch"]
    images = (torch.rand(b, 3, spec["image"], spec["image"], generator=torch.Generator().manual_seed(0)) * 2 - 1)
    images = images.to(dev)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        accelerator = _make_accelerator(args, tmp, mode)
        peak = _peak_meter(dev)
        torch.manual_seed(0)
        model = VQVAE(model_cfg)
        optimizer, scheduler = build_optimizer(model, train_cfg)
        forward = torch.compile(model, backend=args.compile_backend) if mode.endswith("compile") else model
        forward, optimizer, scheduler = accelerator.prepare(forward, optimizer, scheduler)
        perceptual, disc, d_opt, d_sched = build_objective(accelerator, train_cfg)
        if args.quick:
            perceptual = None
        disc, d_opt, d_sched = accelerator.prepare(disc, d_opt, d_sched)
        raw, raw_disc = accelerator.unwrap_model(forward), accelerator.unwrap_model(disc)
        seen = []

        def tokenizer_loss(x):
            out = forward(x)
            seen.append((x, out.recon.detach()))
            with accelerator.autocast():
                return generator_losses(out, x, train_cfg, step=0, perceptual=perceptual, discriminator=raw_disc,
                                        last_layer=raw.last_layer)

        def refuse(loss):
            return f"loss is {loss.item()}: the check's update diverged"

        def update():
            seen.clear()
            update_step(accelerator, forward, optimizer, scheduler, [images], tokenizer_loss,
                        grad_clip=train_cfg.grad_clip, skip_nonfinite=False, on_nonfinite=refuse)
            update_step(accelerator, disc, d_opt, d_sched, list(seen), lambda pair: disc(*pair),
                        grad_clip=train_cfg.grad_clip, skip_nonfinite=False, on_nonfinite=refuse)

        forward.train()
        t = _train_timer(args, accelerator, update, mode.endswith("compile"))
        params = sum(p.numel() for p in raw.parameters())
        result = dict(batch=b, image_size=spec["image"], preset=spec["vq"], params=params,
                      steps_per_s=1 / t["seconds"], images_per_s=b / t["seconds"], ms_per_step=t["seconds"] * 1e3,
                      peak_memory_mib=peak(), timed_steps=t["runs"],
                      objective=f"recon + quantizer{' + LPIPS' if perceptual is not None else ''} + GAN "
                                "(tokenizer and discriminator updates)", notes=notes)
        if args.cuda:  # drops accelerate's references (and runs a full gc: slow, and moot on the CPU)
            accelerator.free_memory()
    return result


def lpips_weights_present(train_cfg) -> bool:
    from vqvae.objective import perceptual_paths
    from vqvae.perceptual import VGG16_FILENAME

    vgg, _ = perceptual_paths(train_cfg.perceptual_weights)
    return (vgg or Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME).is_file()


def maskgit_train_row(args, spec: dict, mode: str) -> dict:
    """Stage 2 as maskgit.train.train runs it: the joint update of the preset (critic none) and the EMA update."""
    from core.train import make_ema, update_step
    from maskgit.train import build_optimizer

    dev = args.device
    model_cfg, train_cfg = MASKGIT_PRESETS[spec["mg"]]
    model_cfg = dataclasses.replace(model_cfg, **args.shapes["mg_overrides"])
    b, side, K = spec["mg_batch"], spec["grid"], spec["codebook"]
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (b, side * side), generator=gen).to(dev)
    labels = torch.randint(0, CLASSES, (b,), generator=gen).to(dev)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        accelerator = _make_accelerator(args, tmp, mode)
        peak = _peak_meter(dev)
        torch.manual_seed(0)
        model = build_maskgit(model_cfg, codebook_size=K, grid=(side, side), num_classes=CLASSES).to(dev)
        model.train()
        ema = make_ema(model, train_cfg.ema_decay)
        optimizer, scheduler = build_optimizer(model, train_cfg)
        forward = torch.compile(model, backend=args.compile_backend) if mode.endswith("compile") else model
        forward, optimizer, scheduler = accelerator.prepare(forward, optimizer, scheduler)

        def refuse(loss):
            return f"loss is {loss.item()}: the check's update diverged"

        after = (lambda: ema.update_parameters(model)) if ema is not None else None
        update = lambda: update_step(accelerator, forward, optimizer, scheduler, [(codes, labels)],  # noqa: E731
                                     lambda batch: forward(*batch), grad_clip=train_cfg.grad_clip,
                                     skip_nonfinite=False, on_nonfinite=refuse, after_step=after)
        t = _train_timer(args, accelerator, update, mode.endswith("compile"))
        result = dict(batch=b, grid=side, codebook=K, preset=spec["mg"],
                      shape=f"{model_cfg.dim} wide, {model_cfg.depth} layers, {model_cfg.heads} heads",
                      params=sum(p.numel() for p in model.parameters()),
                      steps_per_s=1 / t["seconds"], images_per_s=b / t["seconds"], ms_per_step=t["seconds"] * 1e3,
                      peak_memory_mib=peak(), timed_steps=t["runs"], ema=ema is not None)
        if args.cuda:  # drops accelerate's references (and runs a full gc: slow, and moot on the CPU)
            accelerator.free_memory()
    return result


def section_train_speed(args, ctx, budget) -> dict:
    return train_rows(args, ctx, budget, "small")


def section_train_speed_256(args, ctx, budget) -> dict:
    return train_rows(args, ctx, budget, "large")


# --- decoder and end to end


def decoder_variants(args, vq: VQVAE, names=DECODERS) -> dict:
    """name -> (tokenizer copy, bf16?): fp32, bf16, bf16 + channels-last, bf16 + channels-last + compile."""
    out = {"fp32": (vq, False), "bf16": (vq, True)}
    cl = copy.deepcopy(vq).to(memory_format=torch.channels_last)
    out["bf16+channels_last"] = (cl, True)
    if "bf16+channels_last+compile" in names and not args.no_compile:
        compiled = copy.deepcopy(cl)
        compiled.decoder = torch.compile(compiled.decoder, backend=args.compile_backend)
        out["bf16+channels_last+compile"] = (compiled, True)
    return {name: out[name] for name in names}


def section_decoder_end_to_end(args, ctx, budget) -> dict:
    rows, e2e, notes = [], [], []
    for size in ("small", "large"):
        image = args.shapes[size]["image"]
        try:
            budget.need(60 if args.cuda else 3, f"decoder and end-to-end at {image} px")
            decoder_size(args, ctx, budget, size, rows, e2e)
        except Skip as why:
            notes.append(f"{image} px: {why}")
            break
        except Exception as err:  # noqa: BLE001
            rows.append(dict(image_size=image, decoder="-", error=error_text(err), traceback=tail_of_traceback()))
        finally:
            free(args.device)
    return {"decode_rows": rows, "end_to_end_rows": e2e, "rest_skipped": "; ".join(notes) or None,
            "note": "decode = VQVAE.decode (codebook lookup + conv decoder; random weights) of a batch of code "
                    "grids; channels-last converts the whole tokenizer; compile wraps its decoder. End to end = "
                    f"{TARGET_STEPS}-step sampling + decode, timed as one; decoder share = decode / (sampling + "
                    "decode), each timed alone. 256 px: the imagenet256 tokenizer with the stage-2 cifar10 shape on "
                    "16x16 codes"}


def decoder_size(args, ctx, budget, size: str, rows: list, e2e: list) -> None:
    """The decode rows of every decoder variant and the end-to-end rows, at one size."""
    dev, s, spec = args.device, args.shapes, args.shapes[size]
    if size == "small":
        model = ctx.get("sample_model") or sampling_net(args)
        ctx["sample_model"] = model
        batches, b = s["decode_batches"], s["e2e_batch"]
    else:  # stage 2 at 16x16: the cifar10 stage-2 shape (or the quick one)
        mg = dataclasses.replace(MASKGIT_PRESETS[spec["mg"]][0], **s["mg_overrides"])
        model = sampling_net(args, grid=spec["grid"], codebook=spec["codebook"], dim=mg.dim, depth=mg.depth,
                             heads=mg.heads)
        batches, b = (s["large_e2e_batch"],), s["large_e2e_batch"]
    vq = tokenizer(args, spec["vq"], spec["image"], model.codebook_size, seed_codebook=False)
    decode_ms = {}
    names = DECODERS if size == "small" else s["large_decoders"]
    for name in DECODERS:
        if name not in names:
            rows.append(dict(image_size=spec["image"], decoder=name, skipped="--quick: the small size runs every "
                             "decoder variant, the large one the cheapest (the same code)"))
        elif args.no_compile and "compile" in name:
            rows.append(dict(image_size=spec["image"], decoder=name, skipped="--no-compile"))
    names = tuple(n for n in names if not (args.no_compile and "compile" in n))
    variants = decoder_variants(args, vq, names)  # built once: the compiled one compiles once per shape
    for name, (tok, bf16) in variants.items():
        for batch in batches:
            codes = torch.randint(0, model.codebook_size, (batch, *model.grid), device=dev)
            try:
                if "compile" in name:
                    budget.need(60 if args.cuda else 2, f"compiled decoder at {spec['image']} px")
                with torch.no_grad(), amp(dev, bf16):
                    t = timeit(lambda: tok.decode(codes), dev, repeats=s["repeats"], budget_s=s["per_setting_s"],
                               warmup=2 if "compile" in name else 1)
                decode_ms[name, batch] = t["seconds"] * 1e3
                rows.append(dict(image_size=spec["image"], decoder=name, batch=batch, ms=t["seconds"] * 1e3,
                                 images_per_s=batch / t["seconds"]))
            except Skip as why:
                rows.append(dict(image_size=spec["image"], decoder=name, batch=batch, skipped=str(why)))
            except Exception as err:  # noqa: BLE001
                rows.append(dict(image_size=spec["image"], decoder=name, batch=batch, error=error_text(err)))
    # end to end at batch b: each sampler mode with the fp32 decoder and with the fastest one
    labels = torch.arange(b, device=dev) % CLASSES
    samplers = {"eager": lambda: sample(model, b, labels, SamplerConfig(steps=TARGET_STEPS))}
    if args.cuda:
        graphs = CompiledSampler(cuda_graphs=True, note=ctx["notes"].append)
        samplers["cuda_graph"] = lambda: graphs(model, b, labels, SamplerConfig(steps=TARGET_STEPS))
    measured = {k: v for k, v in decode_ms.items() if k[1] == b}
    best = min(measured, key=measured.get)[0] if measured else "fp32"
    for sampler_name, fn in samplers.items():
        for dec_name in dict.fromkeys(("fp32", best)):
            tok, bf16 = variants.get(dec_name, (vq, False))
            label = dict(image_size=spec["image"], batch=b, sampler=sampler_name, decoder=dec_name)
            try:
                budget.need(2, f"end to end at {spec['image']} px")

                def run():
                    with amp(dev, run_bf16(args)):
                        codes = fn()
                    with torch.no_grad(), amp(dev, bf16):
                        return tok.decode(codes.view(b, *model.grid)).clamp(-1, 1)

                with amp(dev, run_bf16(args)):
                    t_sample = timeit(fn, dev, repeats=s["repeats"], budget_s=s["per_setting_s"], warmup=2)
                t_total = timeit(run, dev, repeats=s["repeats"], budget_s=s["per_setting_s"], warmup=2)["seconds"]
                t_sample = t_sample["seconds"]
                t_decode = decode_ms.get((dec_name, b), float("nan")) / 1e3
                e2e.append(label | dict(steps=TARGET_STEPS, ms=t_total * 1e3, images_per_s=b / t_total,
                                        sample_ms=t_sample * 1e3, decode_ms=t_decode * 1e3,
                                        decoder_share=t_decode / (t_decode + t_sample)))
            except Skip as why:
                e2e.append(label | dict(skipped=str(why)))
            except Exception as err:  # noqa: BLE001
                e2e.append(label | dict(error=error_text(err)))


# --- two processes


def section_ddp(args, ctx, budget) -> dict:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.cuda and gpus < 2:
        raise Skip(f"2-process training needs 2+ GPUs; this machine has {gpus}")
    if not args.cuda and not args.ddp_smoke:
        raise Skip("2-process training is a GPU measurement (with --device cpu it runs with --ddp-smoke, as a smoke "
                   "test of the launch path over gloo)")
    budget.need(150 if args.cuda else 20, "2-process accelerate launch")
    with tempfile.TemporaryDirectory(prefix="gpu_check-ddp-") as tmp:
        result = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "bf16" if args.cuda else "no", "--dynamo_backend", "no",
               str(Path(__file__).resolve()), "--worker", "ddp", "--device", args.device.type,
               "--worker-out", str(result)] + (["--quick"] if args.quick or not args.cuda else [])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        if not args.cuda:
            env.setdefault("OMP_NUM_THREADS", "1")
        timeout = max(10.0, min(budget.left(), 240.0))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"accelerate launch exited {proc.returncode}: {proc.stderr[-1500:]}")
        out = json.loads(result.read_text())
    single = next((r for r in ctx.get("train_rows", []) if r["stage"] == "stage2" and r["size"] == "small"
                   and r["mode"] == ("bf16" if args.cuda else "fp32") and "images_per_s" in r), None)
    if single:
        out["single_process_images_per_s"] = single["images_per_s"]
        out["scaling_efficiency"] = out["images_per_s"] / (out["processes"] * single["images_per_s"])
    if not args.cuda:
        out["note"] = "CPU smoke run of the launch path (gloo), not a GPU figure"
    return out


def ddp_worker(args) -> None:
    """One process of `accelerate launch`: stage-2 updates at the small size, the global batch split over the
    processes; rank 0 writes steps/s and images/s to --worker-out."""
    from core.accel import make_accelerator
    from core.train import make_ema, update_step
    from maskgit.train import build_optimizer

    spec = args.shapes["small"]
    model_cfg, train_cfg = MASKGIT_PRESETS[spec["mg"]]
    model_cfg = dataclasses.replace(model_cfg, **args.shapes["mg_overrides"])
    with tempfile.TemporaryDirectory(prefix="gpu_check-ddp-worker-") as tmp:
        accelerator = make_accelerator(tmp, mixed_precision="bf16" if args.cuda else "no", cpu=not args.cuda)
        dev, world = accelerator.device, accelerator.num_processes
        b, side, K = max(1, spec["mg_batch"] // world), spec["grid"], spec["codebook"]
        gen = torch.Generator().manual_seed(accelerator.process_index)
        codes = torch.randint(0, K, (b, side * side), generator=gen).to(dev)
        labels = torch.randint(0, CLASSES, (b,), generator=gen).to(dev)
        torch.manual_seed(0)
        model = build_maskgit(model_cfg, codebook_size=K, grid=(side, side), num_classes=CLASSES).to(dev).train()
        ema = make_ema(model, train_cfg.ema_decay)
        optimizer, scheduler = build_optimizer(model, train_cfg)
        forward, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        after = (lambda: ema.update_parameters(model)) if ema is not None else None
        update = lambda: update_step(accelerator, forward, optimizer, scheduler, [(codes, labels)],  # noqa: E731
                                     lambda batch: forward(*batch), grad_clip=train_cfg.grad_clip,
                                     skip_nonfinite=False, on_nonfinite=lambda loss: "diverged", after_step=after)
        t = timeit(update, dev, repeats=args.shapes["train_steps"], budget_s=1e9, warmup=args.shapes["train_warmup"])
        seconds = torch.tensor([t["seconds"]], device=dev)
        mean_s = accelerator.reduce(seconds, reduction="sum").item() / world  # mean over processes
        if accelerator.is_main_process:
            args.worker_out.write_text(json.dumps({
                "processes": world, "per_process_batch": b, "global_batch": b * world, "ms_per_step": mean_s * 1e3,
                "steps_per_s": 1 / mean_s, "images_per_s": b * world / mean_s, "grid": side, "codebook": K,
                "mixed_precision": "bf16" if args.cuda else "no"}))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --- targets


def section_targets(args, ctx, budget) -> dict:
    """PASS/FAIL per target and variant: `value` measured, `target` its bound, `margin` = value / target."""
    times = ctx.get("sample_times", {})
    lines = []
    ar = times.get(("ar", ctx.get("ar_steps"), 1))
    for v in ("eager", "cuda_graph", "compile", "compile+cuda_graph"):
        ours = times.get((v, TARGET_STEPS, 1))
        if ar is None or ours is None:
            continue
        speedup = ar / ours
        lines.append(dict(target=f"batch-1 latency vs KV-cached AR, {v}", value=speedup,
                          bound=f">= {MIN_VS_AR_LATENCY:g}x",
                          passed=speedup >= MIN_VS_AR_LATENCY, margin=speedup / MIN_VS_AR_LATENCY,
                          detail=f"{speedup:.2f}x: AR {ar * 1e3:.2f} ms, ours {ours * 1e3:.2f} ms at "
                                 f"{TARGET_STEPS} steps"))
    b = args.shapes["target_batch"]
    for r in (ctx.get("section_results", {}).get("sampler_share") or {}).get("rows", []):
        if r.get("batch") == b and "outside_share" in r:
            lines.append(dict(target=f"time outside the transformer forward at batch {b}, {r['mode']}",
                              value=r["outside_share"], bound=f"<= {MAX_OUTSIDE:.0%}",
                              passed=r["outside_share"] <= MAX_OUTSIDE, margin=r["outside_share"] / MAX_OUTSIDE,
                              detail=f"{r['outside_share']:.1%} of {r['run_ms']:.2f} ms (forwards alone "
                                     f"{r['forwards_ms']:.2f} ms)"))
    for r in ctx.get("train_rows", []):
        if r.get("mode") == "bf16+compile" and "vs_fp32" in r:
            lines.append(dict(target=f"training throughput bf16 + compile vs fp32 eager, {r['stage']}, {r['size']} "
                                     "size", value=r["vs_fp32"], bound=f">= {MIN_TRAIN_SPEEDUP:g}x",
                              passed=r["vs_fp32"] >= MIN_TRAIN_SPEEDUP, margin=r["vs_fp32"] / MIN_TRAIN_SPEEDUP,
                              detail=f"{r['vs_fp32']:.2f}x: {r['images_per_s']:.1f} vs "
                                     f"{r['images_per_s'] / r['vs_fp32']:.1f} images/s"))
    missing = []
    for prefix, what in (("batch-1", "batch-1 latency vs AR (sampling_speed did not measure it)"),
                         ("time outside", "outside-forward share (sampler_share did not measure it)"),
                         ("training", "training speed-up (train_speed did not measure fp32 and bf16 + compile)")):
        if not any(line["target"].startswith(prefix) for line in lines):
            missing.append(what)
    return {"lines": lines, "not_measured": missing,
            "note": f"targets at {TARGET_STEPS} steps on the sampling net of sampling_speed; margin = value / bound"
                    + ("; --quick on the CPU: tiny shapes, the verdicts mean nothing" if args.quick else "")}


# ----------------------------------------------------------------------------------------------
# Report


def render(report: dict) -> str:
    """The Markdown report; each block is rendered on its own, so a bad entry costs one block, not the report."""
    secs = report.get("sections", {})
    out = [f"## GPU check ({report.get('device')}{', quick' if report.get('quick') else ''})", ""]

    def results(name) -> dict:
        return (secs.get(name) or {}).get("results") or {}

    def cell(r: dict, key: str):
        return r.get(key, "-")

    def note_of(r: dict) -> str:
        return str(r.get("skipped") or r.get("error") or "; ".join(r.get("notes", []) or []))

    def summary():
        env = results("environment")
        lines = []
        if env:
            lines += [str(env.get("machine", "")), "",
                      f"torch {env.get('torch')}, CUDA {env.get('cuda')}, {env.get('gpu_name', 'no GPU')}, GPUs "
                      f"{env.get('gpus')}, compile backend {env.get('compile_backend')}", ""]
        rows = []
        for name in SECTIONS:
            sec = secs.get(name, {})
            detail = sec.get("skip_reason") or sec.get("error") or ""
            rows.append([name, sec.get("status", "missing"), fmt(sec.get("seconds")), detail])
        return lines + [md_table(["section", "status", "seconds", "note"], rows)]

    def correctness():
        c = results("correctness")
        if not c:
            return []
        rows = []
        for key in ("bf16_vs_fp32", "fixed_shape_vs_eager", "fixed_shape_fullgraph_trace", "compile_vs_eager",
                    "cuda_graph_vs_eager", "compile_cuda_graph_vs_eager"):
            e = c.get(key) or {}
            extra = []
            if key == "bf16_vs_fp32":
                extra = [f"greedy {fmt(e.get('greedy_token_agreement'))}",
                         f"decoded PSNR {fmt(e.get('decoded_psnr_db'))} dB"]
            if "one_graph" in e:
                extra.append(f"one graph: {e['one_graph']}")
            if "token_agreement_fp32" in e:
                extra.append(f"fp32 {fmt(e['token_agreement_fp32'])}")
            rows.append([key, fmt(e.get("token_agreement")), e.get("skipped") or e.get("error") or ", ".join(extra)])
        return [f"### Correctness ({c.get('steps')} steps, batch {c.get('batch')}, {c.get('precision')})", "",
                md_table(["check", "token agreement", "detail"], rows)]

    def sampling():
        sp = results("sampling_speed")
        if not sp:
            return []
        rows = [[cell(r, "method"), cell(r, "steps"), cell(r, "batch"), fmt(r.get("images_per_s")), fmt(r.get("ms")),
                 note_of(r)] for r in sp.get("rows", [])]
        lines = [f"### Sampling speed ({sp.get('precision')}; net {sp.get('net')})", "",
                 md_table(["method", "steps", "batch", "images/s", "ms", "note"], rows)]
        if sp.get("variants_skipped"):
            lines += ["", f"Variants skipped: {sp['variants_skipped']}"]
        return lines

    def share():
        sh = results("sampler_share")
        if not sh:
            return []
        rows = [[cell(r, "mode"), cell(r, "batch"), cell(r, "steps"), fmt(r.get("run_ms")), fmt(r.get("forwards_ms")),
                 pct(r["outside_share"]) if "outside_share" in r else note_of(r)] for r in sh.get("rows", [])]
        return ["### Sampler's share outside the transformer forward", "",
                md_table(["mode", "batch", "steps", "run ms", "forwards alone ms", "outside share"], rows)]

    def training(name):
        tr = results(name)
        if not tr:
            return []
        rows = [[cell(r, "stage"), cell(r, "size"), cell(r, "mode"), cell(r, "batch"), fmt(r.get("steps_per_s")),
                 fmt(r.get("images_per_s")), fmt(r.get("peak_memory_mib")), fmt(r.get("vs_fp32")), note_of(r)]
                for r in tr.get("rows", [])]
        return [f"### Training speed ({name})", "",
                md_table(["stage", "size", "mode", "batch", "steps/s", "images/s", "peak MiB", "vs fp32", "note"],
                         rows)]

    def decoder():
        de = results("decoder_end_to_end")
        if not de:
            return []
        rows = [[cell(r, "image_size"), cell(r, "decoder"), cell(r, "batch"), fmt(r.get("images_per_s")),
                 fmt(r.get("ms")), note_of(r)] for r in de.get("decode_rows", [])]
        e2e = [[cell(r, "image_size"), cell(r, "batch"), cell(r, "sampler"), cell(r, "decoder"),
                fmt(r.get("images_per_s")), fmt(r.get("ms")),
                pct(r.get("decoder_share"), 0), note_of(r)]
               for r in de.get("end_to_end_rows", [])]
        return ["### Tokenizer decode", "", md_table(["image px", "decoder", "batch", "images/s", "ms", "note"], rows),
                "", "### End to end (sampling + decode)", "",
                md_table(["image px", "batch", "sampler", "decoder", "images/s", "ms", "decoder share", "note"], e2e)]

    def ddp():
        dd = results("ddp")
        if dd:
            return ["### Two processes (accelerate launch)", "",
                    md_table(["processes", "global batch", "steps/s", "images/s", "scaling efficiency", "note"],
                             [[dd.get("processes"), dd.get("global_batch"), fmt(dd.get("steps_per_s")),
                               fmt(dd.get("images_per_s")), fmt(dd.get("scaling_efficiency")), dd.get("note", "")]])]
        sec = secs.get("ddp")
        if not sec:
            return []
        return [f"Two-process training: {sec.get('status')} ({sec.get('skip_reason') or sec.get('error')})"]

    def targets():
        tg = results("targets")
        if not tg:
            return []
        lines = ["### Targets", ""]
        lines += [f"- {'PASS' if t.get('passed') else 'FAIL'}: {t.get('target')} {t.get('bound')}: {t.get('detail')} "
                  f"(margin {fmt(t.get('margin'))})" for t in tg.get("lines", [])]
        lines += [f"- NOT MEASURED: {m}" for m in tg.get("not_measured", [])]
        return lines + ["", str(tg.get("note", ""))]

    blocks = [summary, correctness, sampling, share, lambda: training("train_speed"), decoder,
              lambda: training("train_speed_256"), ddp, targets]
    for block in blocks:
        try:
            lines = block()
        except Exception as err:  # noqa: BLE001
            lines = [f"(a table could not be rendered: {error_text(err)}; the JSON has the results)"]
        if lines:
            out += lines + [""]
    notes = report.get("notes") or []
    if notes:
        out += ["Notes: " + "; ".join(dict.fromkeys(map(str, notes))), ""]
    return "\n".join(out)


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(report), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_section(name: str, args, ctx, budget: Budget, stopped: str | None) -> dict:
    """One section's entry: status "ok" with its results, "skipped" with the reason, or "error" with the text."""
    if name not in args.sections:
        return {"status": "skipped", "skip_reason": "not requested (--sections)"}
    if stopped and name != "targets":  # targets only reads what was measured: it runs whatever happened
        return {"status": "skipped", "skip_reason": stopped}
    if budget.left() <= 0 and name != "targets":
        return {"status": "skipped", "skip_reason": f"time budget (--budget-s {args.budget_s:g}) spent"}
    print(f"[gpu_check] {name} ({budget.elapsed():.0f} s in)", file=sys.stderr, flush=True)
    entry = {}
    try:
        entry["results"] = globals()[f"section_{name}"](args, ctx, budget)
        entry["status"] = "ok"
        ctx["section_results"][name] = entry["results"]
    except Skip as why:
        entry.update(status="skipped", skip_reason=str(why))
    except HardStop as err:
        entry.update(status="error", error=f"interrupted: {err}", interrupted=f"not run: {err}")
    except Exception as err:  # noqa: BLE001
        entry.update(status="error", error=error_text(err), traceback=tail_of_traceback())
    finally:
        with contextlib.suppress(Exception):
            free(args.device)
    return entry


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "ddp":
        ddp_worker(args)
        return 0
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU (use --device cpu --quick for a smoke test)")
    try:  # several shapes and models per code object: more than dynamo's default recompile limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    except AttributeError:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    budget = Budget(args.budget_s)
    ctx = {"notes": [], "section_results": {}}
    report = {"script": "bench/gpu_check.py", "command": " ".join([sys.executable, *sys.argv]),
              "device": str(args.device), "quick": args.quick, "budget_s": args.budget_s,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "complete": False, "sections": {},
              "notes": ctx["notes"]}

    def on_alarm(signum, frame):
        raise HardStop(f"hard time limit of {args.hard_limit_s:.0f} s reached")

    alarm = hasattr(signal, "SIGALRM")
    if alarm:
        previous_handler = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(max(1, math.ceil(args.hard_limit_s)))
    stopped = None
    for name in SECTIONS:
        start = time.perf_counter()
        try:
            entry = run_section(name, args, ctx, budget, stopped)
        except HardStop as err:  # fired in the bookkeeping around a section rather than in it
            stopped = stopped or f"not run: {err}"
            done = ctx["section_results"].get(name)
            entry = {"status": "ok", "results": done} if done is not None else {"status": "skipped",
                                                                                 "skip_reason": stopped}
        if entry.get("interrupted") or entry.get("skip_reason", "").startswith("not run: hard time limit"):
            stopped = stopped or entry.get("interrupted") or entry["skip_reason"]
        entry["seconds"] = time.perf_counter() - start
        report["sections"][name] = entry
        report["elapsed_s"] = budget.elapsed()
        with contextlib.suppress(HardStop):
            write_json(args.out, report)
    if alarm:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_handler)
    report["complete"] = stopped is None
    report["elapsed_s"] = budget.elapsed()
    write_json(args.out, report)
    try:
        print(render(report))
    except Exception as err:  # noqa: BLE001  (the JSON is written; never lose it to a table)
        print(f"(the report could not be rendered: {error_text(err)}; see {args.out})")
    statuses = [s["status"] for s in report["sections"].values()]
    print(f"[gpu_check] {statuses.count('ok')} sections ok, {statuses.count('skipped')} skipped, "
          f"{statuses.count('error')} with errors, {report['elapsed_s']:.0f} s; wrote {args.out}", file=sys.stderr)
    return 1 if "error" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
