"""bench/gpu_check.py: the prepared device check runs every code path on the CPU, and its machinery (one JSON entry
per section, errors and skips recorded, the time budget and the hard limit) holds whatever a section does."""

import json
import time

import pytest

from conftest import run_script

import gpu_check  # bench/ is on pytest's pythonpath (pyproject.toml)

CORRECTNESS = ("bf16_vs_fp32", "fixed_shape_vs_eager", "fixed_shape_fullgraph_trace", "compile_vs_eager",
               "cuda_graph_vs_eager", "compile_cuda_graph_vs_eager")


def check_sections_recorded(report: dict) -> None:
    assert list(report["sections"]) == list(gpu_check.SECTIONS)
    for name, entry in report["sections"].items():
        assert entry["status"] in ("ok", "skipped", "error"), name
        if entry["status"] == "ok":
            assert isinstance(entry["results"], dict), name
        elif entry["status"] == "skipped":
            assert entry["skip_reason"], name
        else:
            assert entry["error"], name


@pytest.mark.slow  # one subprocess: ~35-55 s on 2 busy cores (imports, dynamo traces with the "eager" backend)
def test_quick_cpu_run_exercises_every_section(tmp_path):
    out = tmp_path / "x.json"
    start = time.perf_counter()
    proc = run_script(["bench/gpu_check.py", "--device", "cpu", "--quick", "--out", out], timeout=240)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    check_sections_recorded(report)
    assert report["complete"] and report["device"] == "cpu" and report["quick"]
    sections = report["sections"]
    # on the CPU every section runs, but the 2-process launch (opt-in there), which says why it did not
    assert {n for n, e in sections.items() if e["status"] != "ok"} == {"ddp"}
    assert "--ddp-smoke" in sections["ddp"]["skip_reason"]

    correctness = sections["correctness"]["results"]
    for key in CORRECTNESS:
        entry = correctness[key]
        assert ("token_agreement" in entry) != ("skipped" in entry), (key, entry)
        if "token_agreement" in entry:
            assert 0.0 <= entry["token_agreement"] <= 1.0, (key, entry)
    # the gather-free run a CUDA graph replays, its fullgraph trace and the eager-backend compile are exact on the CPU
    for key in ("fixed_shape_vs_eager", "fixed_shape_fullgraph_trace", "compile_vs_eager"):
        assert correctness[key]["token_agreement"] == 1.0, key
    assert correctness["fixed_shape_fullgraph_trace"]["one_graph"] is True
    assert 0.0 <= correctness["bf16_vs_fp32"]["greedy_token_agreement"] <= 1.0
    assert "GPU" in correctness["cuda_graph_vs_eager"]["skipped"] or "CUDA" in correctness["cuda_graph_vs_eager"][
        "skipped"]

    speed = sections["sampling_speed"]["results"]["rows"]
    methods = {r["method"] for r in speed}
    assert {"ours eager", "ours compile", "x-transformers NAR wrapper", "KV-cached AR"} <= methods
    assert all(r["images_per_s"] > 0 for r in speed), [r for r in speed if "error" in r]
    share = sections["sampler_share"]["results"]["rows"]
    assert share and all(0.0 <= r["outside_share"] <= 1.0 for r in share)
    for name in ("train_speed", "train_speed_256"):
        rows = sections[name]["results"]["rows"]
        assert len(rows) == 6 and not any("error" in r for r in rows), rows
        assert all(r["steps_per_s"] > 0 or r.get("skipped") for r in rows if "skipped" not in r)
    decode = sections["decoder_end_to_end"]["results"]
    assert not any("error" in r for r in decode["decode_rows"] + decode["end_to_end_rows"])
    assert any(r["decoder"] == "bf16+channels_last+compile" and r.get("ms", 0) > 0 for r in decode["decode_rows"])
    assert all(0.0 <= r["decoder_share"] <= 1.0 for r in decode["end_to_end_rows"])
    targets = sections["targets"]["results"]
    assert len(targets["lines"]) >= 3 and not targets["not_measured"]

    text = proc.stdout
    assert "| section | status | seconds | note |" in text
    for header in ("### Correctness", "### Sampling speed", "### Training speed (train_speed)", "### Targets",
                   "### End to end"):
        assert header in text, header
    assert "PASS: " in text or "FAIL: " in text
    assert elapsed < 150  # the brief is ~60 s on 2 busy cores; fail only when something has grown badly


@pytest.mark.slow  # ~30 s: three processes import torch (the launcher and two workers)
def test_ddp_smoke_launches_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp.json"
    proc = run_script(["bench/gpu_check.py", "--device", "cpu", "--quick", "--ddp-smoke", "--sections", "ddp",
                       "--out", out], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    check_sections_recorded(report)
    ddp = report["sections"]["ddp"]
    assert ddp["status"] == "ok", ddp
    assert ddp["results"]["processes"] == 2 and ddp["results"]["images_per_s"] > 0
    assert "### Two processes" in proc.stdout


# ---------------------------------------------------------------------------------------------- the machinery


def fake_sections(monkeypatch, **behaviour):
    """Replace every section with a stub: 'ok' returns {}, an exception instance is raised, a number sleeps."""
    for name in gpu_check.SECTIONS:
        what = behaviour.get(name, "ok")

        def section(args, ctx, budget, what=what):
            if isinstance(what, BaseException):
                raise what
            if isinstance(what, (int, float)):
                time.sleep(what)
            return {}

        monkeypatch.setattr(gpu_check, f"section_{name}", section)


def run_main(tmp_path, *extra):
    out = tmp_path / "r.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_a_failing_section_is_recorded_and_the_others_run(monkeypatch, tmp_path, capsys):
    fake_sections(monkeypatch, correctness=RuntimeError("boom"), ddp=gpu_check.Skip("no second GPU"))
    rc, report = run_main(tmp_path)
    check_sections_recorded(report)
    sections = report["sections"]
    assert rc == 1 and report["complete"]
    assert sections["correctness"]["status"] == "error" and "RuntimeError: boom" in sections["correctness"]["error"]
    assert "boom" in sections["correctness"]["traceback"]
    assert sections["ddp"]["status"] == "skipped" and sections["ddp"]["skip_reason"] == "no second GPU"
    assert all(sections[n]["status"] == "ok" for n in gpu_check.SECTIONS if n not in ("correctness", "ddp"))
    text = capsys.readouterr().out
    assert "| correctness | error |" in text and "RuntimeError: boom" in text


def test_spent_budget_skips_the_rest_with_a_note(monkeypatch, tmp_path):
    fake_sections(monkeypatch, correctness=0.3)
    rc, report = run_main(tmp_path, "--budget-s", "0.2")
    sections = report["sections"]
    assert rc == 0 and sections["correctness"]["status"] == "ok"
    later = [n for n in gpu_check.SECTIONS[2:] if n != "targets"]
    assert all("time budget" in sections[n]["skip_reason"] for n in later)
    assert sections["targets"]["status"] == "ok"  # it only reads what was measured


def test_hard_limit_interrupts_a_section_and_keeps_the_rest(monkeypatch, tmp_path):
    fake_sections(monkeypatch, sampling_speed=5.0)
    start = time.perf_counter()
    rc, report = run_main(tmp_path, "--hard-limit-s", "1")
    assert time.perf_counter() - start < 4
    sections = report["sections"]
    assert sections["correctness"]["status"] == "ok"
    assert sections["sampling_speed"]["status"] == "error" and "hard time limit" in sections["sampling_speed"]["error"]
    assert all("hard time limit" in sections[n]["skip_reason"] for n in gpu_check.SECTIONS[3:-1])
    assert sections["targets"]["status"] == "ok" and not report["complete"] and rc == 1


def test_render_survives_partial_and_odd_entries():
    report = {"device": "cuda", "quick": False, "notes": ["a note"], "sections": {
        "correctness": {"status": "ok", "results": {"steps": 8, "batch": 32, "precision": "bf16",
                                                    "compile_vs_eager": {"error": "x"}}},
        "sampling_speed": {"status": "ok", "results": {"rows": [{"method": "ours eager", "error": "oops"}]}},
        "decoder_end_to_end": {"status": "ok", "results": {"decode_rows": [{"decoder": "fp32", "skipped": "why"}],
                                                           "end_to_end_rows": [{"decoder_share": "nan"}]}},
        "sampler_share": {"status": "ok", "results": {"rows": [42]}},  # not a row at all
        "targets": {"status": "ok", "results": {"lines": [{"target": "t", "passed": True, "margin": 2.0}]}},
    }}
    text = gpu_check.render(report)
    assert "| correctness | ok |" in text and "| ddp | missing |" in text
    assert "oops" in text and "why" in text and "| nan |" in text and "PASS: t" in text
    assert text.count("could not be rendered") == 1  # the bad share row costs its own block only


def test_json_is_strict():
    assert gpu_check.jsonable({"a": float("inf"), "b": (1, float("nan")), 3: None}) == {"a": "inf", "b": [1, "nan"],
                                                                                         "3": None}
