"""Sampling speed: our MaskGIT sampler vs x-transformers' NonAutoregressiveWrapper and KV-cached AR decoding.

    python bench/sample_speed.py                       # full sweep on the CPU (~20 TFLOP: ~5 min on 2 quiet cores)
    python bench/sample_speed.py --batches 1 32 --steps 8
    python bench/sample_speed.py --device cuda --compile
    python bench/sample_speed.py --quick               # seconds: a smoke test of every code path
    python bench/sample_speed.py --profile             # plus torch.profiler tables of the target setting

All three decoders run a transformer of the same width and depth (random weights: FLOPs do not depend on them) on
a (h, w) grid of codes, timed for tokens only; the tokenizer's decoder, identical for every method, is timed on
its own. Ours and the reference wrapper share one `TransformerWrapper`. Ours is class-conditional, which prepends
a class token (65 places instead of 64); the "ours, uncond." columns run the same net unconditionally, 64 places,
for an exact comparison. The autoregressive baseline is `AutoregressiveWrapper(TransformerWrapper(Decoder))` of the
same width and depth, `generate(start token, seq_len=h*w, cache_kv=True)`.

FLOPs per forward are counted by torch's FlopCounterMode with x-transformers' flash path switched off for the
count (`plain_attention`): attention is then plain matmuls, which every torch counts, whereas what it counts of
`scaled_dot_product_attention` depends on the version (torch 2.14.1 counts none of it on the CPU). The flash and
plain paths compute the same products, so the figure is the FLOPs of the forward that is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode
from x_transformers import AutoregressiveWrapper, Decoder, NonAutoregressiveWrapper, TransformerWrapper

from common import (autocast, fmt, machine_line, markdown_table, matmul_gflops, pick_device, sync,
                    verdict)
from maskgit.config import MaskGITConfig
from maskgit.model import MaskGIT, build_maskgit
from vqvae.config import VQ_PRESETS
from vqvae.model import VQVAE

# Targets at 8 steps, batch 32 (see README): share of time outside the transformer forward, throughput against the
# reference wrapper, batch-1 latency against KV-cached AR decoding.
TARGET_STEPS, TARGET_BATCH = 8, 32
MAX_OUTSIDE = 0.05
MIN_VS_REFERENCE = 1.25
MIN_VS_AR_LATENCY = 6.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16], help="decoding steps to sweep")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256], help="batch sizes to sweep")
    p.add_argument("--repeats", type=int, default=7, help="most timed runs per setting (median reported)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds of timed runs per setting after which no more repeats are made (>= 1 run)")
    p.add_argument("--dim", type=int, default=256, help="transformer width")
    p.add_argument("--depth", type=int, default=6, help="transformer blocks")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--codebook", type=int, default=1024, help="codebook size K")
    p.add_argument("--grid", type=int, default=8, help="side of the square code grid")
    p.add_argument("--classes", type=int, default=10, help="classes of the conditional model")
    p.add_argument("--vq-preset", default="cifar10", choices=sorted(VQ_PRESETS),
                   help="tokenizer architecture whose decoder is timed (codebook and grid follow the options above)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformers' forward")
    p.add_argument("--no-ar", action="store_true", help="skip the autoregressive baseline")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler tables of ours and the reference at the target setting")
    p.add_argument("--quick", action="store_true", help="tiny model and sweep, for smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.depth, args.heads, args.codebook, args.grid = 64, 2, 4, 64, 4
        args.steps, args.batches, args.repeats, args.budget, args.vq_preset = [4, 8], [1, 8], 2, 0.2, "tiny"
    return args


class ForwardTimer:
    """Time spent inside a module's forward calls (and their count), via forward hooks.

    CPU: wall clock. CUDA: events recorded on the stream around each call, read after the run; no host sync is
    added, so the run's timing is not disturbed."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self._start = None
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, module, args):
        self._start = self._now()

    def _post(self, module, args, output):
        self.spans.append((self._start, self._now()))

    def reset(self):
        self.spans = []

    def seconds(self) -> float:
        """Total forward time of the calls since the last reset (after the caller synchronised)."""
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1000
        return sum(b - a for a, b in self.spans)

    @property
    def calls(self) -> int:
        return len(self.spans)


@dataclasses.dataclass
class Measurement:
    seconds: float             # median wall time of one call (a whole batch)
    forward_seconds: float     # time inside the transformer forward in that median run
    forward_calls: int         # transformer forward calls per run
    runs: int                  # timed runs behind the median

    @property
    def outside(self) -> float:
        return 1.0 - self.forward_seconds / self.seconds


def measure(fn, timer: ForwardTimer | None, device, args, batch: int) -> Measurement:
    """Median over timed runs of fn(); one unmeasured warm-up run for small batches (the big ones are one-offs)."""
    warmup = 1 if batch <= 32 else 0
    for _ in range(warmup):
        fn()
    sync(device)
    runs = []
    for _ in range(args.repeats):
        if timer is not None:
            timer.reset()
        start = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - start
        runs.append((wall, timer.seconds() if timer else float("nan"), timer.calls if timer else 0))
        if sum(r[0] for r in runs) >= args.budget:
            break
    runs.sort(key=lambda r: r[0])
    wall, fwd, calls = runs[len(runs) // 2]
    return Measurement(wall, fwd, calls, len(runs))


def build_models(args, device):
    """Our conditional and unconditional MaskGIT and the reference wrapper on one shared net; the AR baseline."""
    torch.manual_seed(0)
    cfg = MaskGITConfig(dim=args.dim, depth=args.depth, heads=args.heads, dropout=0.0)
    ours = build_maskgit(cfg, codebook_size=args.codebook, grid=(args.grid, args.grid), num_classes=args.classes)
    net = ours.net
    ours_uncond = MaskGIT(net, grid=ours.grid, codebook_size=args.codebook, num_classes=0)
    reference = NonAutoregressiveWrapper(net, mask_id=args.codebook, steps=8, schedule="cosine")
    n = ours.seq_len
    ar = AutoregressiveWrapper(TransformerWrapper(
        num_tokens=args.codebook + 1, max_seq_len=n + 1,  # id K is the start token; positions 0..n
        attn_layers=Decoder(dim=args.dim, depth=args.depth, heads=args.heads, attn_dim_head=args.dim // args.heads,
                            ff_mult=cfg.ff_mult, attn_flash=True),
    ))
    models = [m.to(device).eval() for m in (ours, ours_uncond, reference, ar)]
    if args.compile:
        # compile forward, not the module: the hooks of ForwardTimer stay outside the compiled graph
        net.forward = torch.compile(net.forward)
        ar.net.forward = torch.compile(ar.net.forward, dynamic=True)  # KV cache grows: one graph for all lengths
    return models


@contextmanager
def plain_attention(*modules: torch.nn.Module):
    """x-transformers' attention computed with plain einsum/matmul instead of SDPA inside the block.

    Every `Attend` module of x-transformers picks its path from its `flash` attribute on each call; this switches it
    off and back. A module without that attribute is refused: the count would silently leave attention out."""
    from x_transformers.attend import Attend

    attends = [m for module in modules for m in module.modules() if isinstance(m, Attend)]
    if any(not isinstance(getattr(m, "flash", None), bool) for m in attends):
        raise RuntimeError("this x-transformers' Attend has no boolean `flash` switch: FLOPs cannot be counted")
    saved = [m.flash for m in attends]
    for m in attends:
        m.flash = False
    try:
        yield
    finally:
        for m, flash in zip(attends, saved):
            m.flash = flash


def flops_per_sequence(fn, *modules: torch.nn.Module) -> float:
    """FLOPs of fn() counted by torch's FlopCounterMode, with the attention of `modules` computed as plain matmuls
    (`plain_attention`) so that every torch version counts it."""
    with plain_attention(*modules), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def decode_tokenizer(args, device) -> VQVAE:
    vq_cfg = dataclasses.replace(VQ_PRESETS[args.vq_preset][0], quantizer="vq", codebook_size=args.codebook)
    vq_cfg = dataclasses.replace(vq_cfg, image_size=args.grid * vq_cfg.downsample)
    torch.manual_seed(0)
    return VQVAE(vq_cfg, sync_codebook=False).to(device).eval()


class FixedLogits(torch.nn.Module):
    """Stands in for the TransformerWrapper: returns precomputed (logits, embeddings), so only sampling is timed."""

    def __init__(self, net: TransformerWrapper, logits: torch.Tensor, embeds: torch.Tensor):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), device=logits.device))  # where the wrapper reads the device
        self.emb_dim, self.num_tokens, self.max_seq_len = net.emb_dim, net.num_tokens, net.max_seq_len
        self.out, self.embeds = logits, embeds  # (B, n, K + 1), (B, n, d)

    def forward(self, seq, **kwargs):
        return self.out[: len(seq)], self.embeds[: len(seq)]


def sampler_only(ours: MaskGIT, args, device, steps: int) -> dict[tuple, float]:
    """Seconds per decoding step of the sampling work alone, ours and the reference, at each batch size.

    Both decoders get the real net's logits for an all-masked batch from a stand-in that returns them at no cost,
    so what is timed is everything but the transformer: sampling, scoring, choosing places, bookkeeping."""
    n, K, big = ours.seq_len, ours.codebook_size, max(args.batches)
    with torch.inference_mode(), autocast(device):
        b0 = min(big, 32)
        logits, embeds = ours.net(torch.full((b0, n), K, device=device), return_logits_and_embeddings=True)
    reps = -(-big // b0)
    logits, embeds = logits.float().repeat(reps, 1, 1)[:big], embeds.float().repeat(reps, 1, 1)[:big]
    fixed = FixedLogits(ours.net, logits, embeds)
    stub = MaskGIT(ours.net, grid=ours.grid, codebook_size=K, num_classes=ours.num_classes).to(device).eval()
    # an instance attribute shadows the method: the sampler calls model.logits() and gets the fixed logits (b, n, K)
    stub.logits = lambda seq, labels=None, self_cond=None: (logits[: len(seq), :, :K], embeds[: len(seq)])
    reference = NonAutoregressiveWrapper(fixed, mask_id=K, steps=steps, schedule="cosine").eval()
    labels = torch.arange(big, device=device) % max(ours.num_classes, 1)
    out = {}
    with torch.inference_mode():
        for b in args.batches:
            out["ours", b] = measure(lambda: stub.generate(batch_size=b, labels=labels[:b], steps=steps), None,
                                     device, args, b).seconds / steps
            out["ref", b] = measure(lambda: reference.generate(batch_size=b), None, device, args, b).seconds / steps
    return out


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def profile_target(ours, reference, labels, args, device) -> str:
    """torch.profiler tables (self time, top ops) of one run of ours and of the reference at the target setting."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    steps, b = TARGET_STEPS, min(TARGET_BATCH, max(args.batches))
    for name, fn in (("ours", lambda: ours.generate(batch_size=b, labels=labels[:b], steps=steps)),
                     ("reference", lambda: _reference_generate(reference, b, steps))):
        fn()
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        out.append(f"\n#### torch.profiler: {name}, {steps} steps, batch {b}\n\n```\n"
                   + prof.key_averages().table(sort_by=key, row_limit=18) + "\n```")
    return "\n".join(out)


def _reference_generate(reference, batch: int, steps: int):
    reference.steps = steps  # the wrapper takes steps at construction only
    return reference.generate(batch_size=batch)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, ours_uncond, reference, ar = build_models(args, device)
    timer = ForwardTimer(ours.net, device)  # the net is shared: it times ours and the reference alike
    ar_timer = ForwardTimer(ar.net, device)
    vq = decode_tokenizer(args, device)
    n, K = ours.seq_len, args.codebook
    labels = torch.arange(max(args.batches), device=device) % args.classes

    with torch.inference_mode(), autocast(device):
        peak = matmul_gflops(device, n=512 if args.quick else 2048,
                             dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        one = torch.full((1, n), K, device=device)
        flops_cond = flops_per_sequence(lambda: ours.logits(one, labels[:1]), ours)  # per sequence, one forward
        flops_uncond = flops_per_sequence(lambda: ours_uncond.logits(one), ours_uncond)
        # warm up every path once (allocator, thread pools, compilation) before anything is timed
        ours.generate(batch_size=2, labels=labels[:2], steps=2)
        ours_uncond.generate(batch_size=2, steps=2)
        _reference_generate(reference, 2, 2)
        if not args.no_ar:
            ar.generate(torch.full((2, 1), K, device=device), seq_len=n, cache_kv=True)

        res: dict[tuple, Measurement] = {}
        for steps in args.steps:
            for b in args.batches:
                progress(f"steps {steps}, batch {b}")
                res["ours", steps, b] = measure(lambda: ours.generate(batch_size=b, labels=labels[:b], steps=steps),
                                                timer, device, args, b)
                res["ref", steps, b] = measure(lambda: _reference_generate(reference, b, steps), timer, device,
                                               args, b)
                if steps == TARGET_STEPS:
                    res["uncond", steps, b] = measure(lambda: ours_uncond.generate(batch_size=b, steps=steps),
                                                      timer, device, args, b)
        for b in args.batches:
            progress(f"AR and tokenizer decode, batch {b}")
            if not args.no_ar:
                prompt = torch.full((b, 1), K, device=device)
                res["ar", b] = measure(lambda: ar.generate(prompt, seq_len=n, cache_kv=True), ar_timer, device,
                                       args, b)
            codes = torch.randint(0, K, (b, args.grid, args.grid), device=device)
            res["decode", b] = measure(lambda: vq.decode(codes), None, device, args, b)
        progress("sampling work alone")
        alone = sampler_only(ours, args, device, TARGET_STEPS)
        profile = profile_target(ours, reference, labels, args, device) if args.profile else ""

    report = [f"## Sampling speed: {args.grid}x{args.grid} tokens, codebook {K}, transformer {args.dim} wide, "
              f"{args.depth} layers, {args.heads} heads, {args.classes} classes", "",
              machine_line(device) + f"; {'bf16' if device.type == 'cuda' else 'fp32'} matmul peak {fmt(peak)} GFLOP/s"
              + (" (runs under bf16 autocast)" if device.type == "cuda" else "")
              + ("; torch.compile" if args.compile else ""), "",
              f"FLOPs per sequence per forward (FlopCounterMode, attention as plain matmuls): "
              f"{fmt(flops_cond / 1e6)} M with the class token, {fmt(flops_uncond / 1e6)} M without.", ""]

    headers = ["steps", "batch", "ours img/s", "ours ms", "reference img/s", "reference ms", "ours / reference",
               "outside fwd, ours", "outside fwd, reference", "ours GFLOP/s", "of matmul peak"]
    rows = []
    for steps in args.steps:
        for b in args.batches:
            o, r = res["ours", steps, b], res["ref", steps, b]
            gflops = o.forward_calls * flops_cond * b / o.seconds / 1e9
            rows.append([steps, b, fmt(b / o.seconds), fmt(o.seconds * 1e3), fmt(b / r.seconds),
                         fmt(r.seconds * 1e3), fmt(r.seconds / o.seconds) + "x", f"{o.outside:.1%}",
                         f"{r.outside:.1%}", fmt(gflops), f"{gflops / peak:.0%}"])
    report += ["### Ours (class-conditional, +1 class token) vs x-transformers NonAutoregressiveWrapper", "",
               markdown_table(headers, rows), "",
               "img/s and ms: one `generate` call for the whole batch, tokens only (median of up to "
               f"{args.repeats} runs). Outside fwd: share of the wall time spent outside the transformer's forward "
               "(sampling, scoring, bookkeeping). GFLOP/s: transformer FLOPs of the run / its wall time.", ""]

    headers = ["batch", "ours uncond. img/s", "reference img/s", "uncond. / reference", "outside fwd, uncond.",
               "ours cond. img/s", "class token cost"]
    rows = []
    for b in args.batches:
        if ("uncond", TARGET_STEPS, b) not in res:
            continue
        u, r, o = res["uncond", TARGET_STEPS, b], res["ref", TARGET_STEPS, b], res["ours", TARGET_STEPS, b]
        rows.append([b, fmt(b / u.seconds), fmt(b / r.seconds), fmt(r.seconds / u.seconds) + "x",
                     f"{u.outside:.1%}", fmt(b / o.seconds), f"{o.seconds / u.seconds - 1:+.1%}"])
    if rows:
        report += [f"### Same net, same 64 places: ours unconditional vs the reference, {TARGET_STEPS} steps", "",
                   markdown_table(headers, rows), ""]

    if not args.no_ar:
        headers = ["batch", "AR img/s", "AR ms", "AR outside fwd"]
        headers += [f"ours {s} steps / AR" for s in args.steps] + [f"reference {s} steps / AR" for s in args.steps]
        rows = []
        for b in args.batches:
            a = res["ar", b]
            rows.append([b, fmt(b / a.seconds), fmt(a.seconds * 1e3), f"{a.outside:.1%}"]
                        + [fmt(a.seconds / res["ours", s, b].seconds) + "x" for s in args.steps]
                        + [fmt(a.seconds / res["ref", s, b].seconds) + "x" for s in args.steps])
        report += ["### Against KV-cached autoregressive decoding (same width and depth, one start token, "
                   f"{n} tokens)", "", markdown_table(headers, rows), "",
                   "Ratios are AR time / MaskGIT time for the same batch: at batch 1 the latency speed-up, at large "
                   f"batch the throughput ratio. AR runs {n} sequential one-position forwards (KV cache), MaskGIT "
                   "S full-sequence forwards: per-call overhead favours MaskGIT at small batch, total FLOPs (AR "
                   f"about one full forward, MaskGIT S) favour AR when compute-bound.", ""]

    headers = ["batch", "ours ms/step", "reference ms/step", "reference / ours", "ours, share of its run"]
    rows = []
    for b in args.batches:
        o, r = alone["ours", b], alone["ref", b]
        run = res.get(("ours", TARGET_STEPS, b))
        rows.append([b, fmt(o * 1e3), fmt(r * 1e3), fmt(r / o) + "x",
                     f"{o * TARGET_STEPS / run.seconds:.1%}" if run else "-"])
    report += [f"### Sampling work alone ({TARGET_STEPS} steps, the transformer replaced by its fixed logits)", "",
               markdown_table(headers, rows), "",
               "What each decoder spends per step outside the network: drawing tokens, scoring, choosing the places "
               "to reveal. Less sensitive to a busy machine than the in-run share above.", ""]

    headers = ["batch", "tokenizer decode ms", "decode img/s", f"share of ours {TARGET_STEPS} steps + decode"]
    rows = []
    for b in args.batches:
        d = res["decode", b]
        o = res.get(("ours", TARGET_STEPS, b))
        rows.append([b, fmt(d.seconds * 1e3), fmt(b / d.seconds),
                     f"{d.seconds / (d.seconds + o.seconds):.0%}" if o else "-"])
    report += [f"### Tokenizer decode (`{args.vq_preset}` VQ-VAE architecture), the same for every method", "",
               markdown_table(headers, rows), ""]

    if (TARGET_STEPS in args.steps and TARGET_BATCH in args.batches) or args.quick:
        b = TARGET_BATCH if TARGET_BATCH in args.batches else max(args.batches)
        steps = TARGET_STEPS if TARGET_STEPS in args.steps else args.steps[-1]
        o, r, u = res["ours", steps, b], res["ref", steps, b], res.get(("uncond", steps, b))
        report += [f"### Targets ({steps} steps, batch {b}; latency at batch {min(args.batches)})", ""]
        report.append(verdict(f"time outside the transformer forward <= {MAX_OUTSIDE:.0%}", o.outside <= MAX_OUTSIDE,
                              f"ours {o.outside:.1%} ({(MAX_OUTSIDE - o.outside) * 100:+.1f} points of margin), "
                              f"reference {r.outside:.1%}"
                              + (f", ours unconditional {u.outside:.1%}" if u else "")))
        ratio = r.seconds / o.seconds
        report.append(verdict(f"throughput >= {MIN_VS_REFERENCE}x the reference wrapper", ratio >= MIN_VS_REFERENCE,
                              f"{ratio:.2f}x with the class token ({ratio / MIN_VS_REFERENCE - 1:+.0%} vs target)"
                              + (f"; {r.seconds / u.seconds:.2f}x unconditional, same {n} places" if u else "")
                              + f"; ceiling with a sampler that cost nothing (our forward time alone): "
                              f"{r.seconds / o.forward_seconds:.2f}x"))
        if not args.no_ar:
            b1 = min(args.batches)
            a, o1 = res["ar", b1], res["ours", steps, b1]
            lat = a.seconds / o1.seconds
            report.append(verdict(f"batch-{b1} latency >= {MIN_VS_AR_LATENCY}x better than KV-cached AR",
                                  lat >= MIN_VS_AR_LATENCY,
                                  f"{lat:.2f}x ({lat / MIN_VS_AR_LATENCY - 1:+.0%} vs target); reference "
                                  f"{a.seconds / res['ref', steps, b1].seconds:.2f}x; ceiling with a sampler that "
                                  f"cost nothing: {a.seconds / o1.forward_seconds:.2f}x ({steps} forwards of "
                                  f"{fmt(o1.forward_seconds / max(o1.forward_calls, 1) * 1e3)} ms vs {n} AR steps of "
                                  f"{fmt(a.seconds / n * 1e3)} ms)"))
        report.append("")
    print("\n".join(report) + profile)


if __name__ == "__main__":
    main()
