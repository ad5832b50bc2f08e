"""CompiledSampler and sample_fixed (maskgit/sampler.py): the compiled and CUDA-graph paths give eager's tokens.

On the CPU torch.compile runs with the "eager" and "aot_eager" backends (dynamo tracing, no code generation), and
the run a CUDA graph replays (`sample_fixed`) runs without the graph; a fullgraph trace of it stands in for the
capture: it fails on any host sync or data-dependent shape, which a capture cannot hold either. The GPU test runs
only where torch sees one (bench/gpu_check.py measures the same on a lent GPU).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from x_transformers import Encoder, TransformerWrapper

from maskgit.model import MaskGIT
from maskgit.sampler import CompiledSampler, SamplerConfig, sample, sample_fixed, sample_fixed_graph

pytestmark = pytest.mark.usefixtures("one_thread")

K, H, W, C = 16, 3, 4, 3  # codebook, grid, classes
N = H * W

SETTINGS = [
    dict(strategy="confidence"),
    dict(strategy="confidence", remask=True, top_p=0.8),
    dict(strategy="confidence", top_k=3, temperature=2.0, temperature_end=0.2, cfg=2.0),
    dict(strategy="critic", remask=True, cfg=1.5, cfg_schedule="linear"),
    dict(strategy="halton", temperature=0.5),
    dict(strategy="confidence", temperature=0.0, steps=20),  # more steps than places: idle steps draw nothing
]


def make_model(critic: str = "none", self_cond: bool = False) -> MaskGIT:
    torch.manual_seed(0)
    net = lambda num_tokens, **kw: TransformerWrapper(  # noqa: E731
        num_tokens=num_tokens, max_seq_len=N, use_abs_pos_emb=False,
        attn_layers=Encoder(dim=32, depth=1, heads=2, attn_flash=True), **kw)
    model = MaskGIT(net(K + 1), grid=(H, W), codebook_size=K, num_classes=C, self_cond=self_cond,
                    token_critic=net(K, logits_dim=1) if critic == "separate" else None,
                    self_token_critic=critic == "self")
    with torch.no_grad():  # sharper than a fresh net, so that confidences and seeds matter
        model.net.to_logits.weight.mul_(5.0)
        model.pos_emb.scale.fill_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {"plain": make_model(), "critic": make_model("separate"), "self": make_model("self", self_cond=True)}


def pick(models, settings):
    return models["critic"] if settings.get("strategy") == "critic" else models["plain"]


def draw(fn, model, b=5, seed=1, **settings):
    labels = torch.arange(b) % C
    return fn(model, b, labels, SamplerConfig(**settings), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_fixed_shape_run_gives_the_eager_tokens(models, settings):
    for model in (pick(models, settings), models["self"]):
        assert torch.equal(draw(sample_fixed, model, **settings), draw(sample, model, **settings))


def test_fixed_shape_run_has_no_host_sync(models):
    """What a CUDA graph captures, traced by dynamo with fullgraph=True: one graph, so no .item(), no
    data-dependent shape (a masked gather), nothing a capture could not hold."""
    model, config = models["self"], SamplerConfig(steps=4, top_k=3, cfg=1.0)
    labels = torch.arange(3) % C
    out = sample_fixed_graph(model, 3, labels, config, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, sample(model, 3, labels, config, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("backend, cases", [("eager", (0, 2, 3)), ("aot_eager", (2,))])
def test_compiled_forward_gives_the_eager_tokens(models, backend, cases):
    notes = []
    sampler = CompiledSampler(compile=True, backend=backend, note=notes.append)
    for settings in (SETTINGS[i] for i in cases):
        model = pick(models, settings)
        assert torch.equal(draw(sampler, model, **settings), draw(sample, model, **settings))
    assert notes == []  # a named backend compiles on the CPU too


def test_cpu_falls_back_to_eager_with_one_note(models):
    notes = []
    sampler = CompiledSampler(compile=True, cuda_graphs=True, note=notes.append)
    model = models["plain"]
    for _ in range(2):
        assert torch.equal(draw(sampler, model), draw(sample, model))
    assert len(notes) == 2 and all("runs eagerly" in n for n in notes)  # one per reason, not one per call
    assert any(n.startswith("compile: skipped on cpu") for n in notes)
    assert any(n.startswith("cuda_graphs: skipped on cpu") for n in notes)
    assert sampler.forward_model(model) is model  # nothing was compiled


def test_compiled_sampler_keeps_sample_features(models):
    """Editing and trajectories pass through (eagerly, with the compiled forward)."""
    sampler = CompiledSampler(compile=True, backend="eager", note=lambda m: None)
    model = models["plain"]
    init = torch.randint(0, K, (2, N), generator=torch.Generator().manual_seed(3))
    keep = torch.zeros(2, N, dtype=torch.bool)
    keep[:, :5] = True
    kwargs = dict(init_codes=init, keep=keep, return_trajectory=True)
    got, states = sampler(model, 2, torch.tensor([0, 1]), SamplerConfig(steps=4),
                          generator=torch.Generator().manual_seed(0), **kwargs)
    want, want_states = sample(model, 2, torch.tensor([0, 1]), SamplerConfig(steps=4),
                               generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(got, want) and len(states) == len(want_states) == 4
    assert torch.equal(got[:, :5], init[:, :5])


@pytest.mark.slow  # sample.py twice, in-process, on the format-v1 fixture runs (a few seconds)
def test_sample_cli_flags_fall_back_on_the_cpu(tmp_path, capsys):
    from maskgit import sample_cli

    runs = tmp_path / "runs"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "runs_format_v1", runs)
    config = json.loads((runs / "maskgit" / "config.json").read_text())
    config["data"]["vq_run"] = str(runs / "vq")
    (runs / "maskgit" / "config.json").write_text(json.dumps(config))
    common = ["--checkpoint", str(runs / "maskgit"), "--num", "6", "--batch-size", "4", "--cpu"]
    sample_cli.main([*common, "--out", str(tmp_path / "plain")])
    capsys.readouterr()
    sample_cli.main([*common, "--out", str(tmp_path / "fast"), "--compile", "--cuda-graphs"])
    err = capsys.readouterr().err
    assert "compile: skipped on cpu" in err and "cuda_graphs: skipped on cpu" in err
    plain, fast = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("plain", "fast"))
    assert np.array_equal(plain, fast)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_eager():
    model = make_model().cuda()
    sampler = CompiledSampler(cuda_graphs=True)
    labels = torch.arange(8, device="cuda") % C
    for seed in (0, 1):  # the second call replays the graph captured by the first
        g = lambda: torch.Generator(device="cuda").manual_seed(seed)  # noqa: E731
        got = sampler(model, 8, labels, SamplerConfig(steps=6), generator=g())
        want = sample(model, 8, labels, SamplerConfig(steps=6), generator=g())
        # the same kernels, save reductions over the gathered masked rows: agreement, not bit equality
        assert (got == want).float().mean().item() >= 0.95
    assert len(sampler._graphs) == 1
