"""bench/data_speed.py in quick mode: it builds its folders, drives both training scripts to their first step, times
the loader and the token-cache encode, and prints its tables and PASS/FAIL verdicts (not asserted: timings on a
busy test machine say nothing)."""

import re

import pytest

from conftest import run_script


@pytest.mark.slow  # subprocesses that import torch and run both stages: a few minutes on 2 busy cores
def test_data_speed_quick(tmp_path):
    proc = run_script(["bench/data_speed.py", "--quick", "--root", tmp_path / "bench"], timeout=1500,
                      env={"MASKGIT_IMAGE_CACHE_DIR": str(tmp_path / "image_cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for header in ("| images | stage 1 peak RSS", "| loader | images/s", "| token-cache encode |",
                   "| train_loader over a ready-made image (no decoding) |"):
        assert header in out, out
    transport = [line for line in out.splitlines() if re.match(r"\| [012] workers \|", line)]
    assert len(transport) == 3 and all(float(line.split("|")[2]) > 0 for line in transport), out
    rows = [line for line in out.splitlines() if re.match(r"\| (60|120) \|", line)]
    assert len(rows) == 2
    for row in rows:  # every cell measured: positive numbers
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells), row
    verdicts = [line for line in out.splitlines() if line.startswith(("- PASS", "- FAIL"))]
    assert len(verdicts) == 7, out
