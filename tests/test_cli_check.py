"""``fxstream check``: exit 0 and PASS when streaming is exact, 1 and FAIL when it is not,
2 and one line on stderr for a bad ``--dtype``.

Models: the zoo U-Net through a model file (``tests/models/unet.py:unet``), run as a real
command from another directory, and ``torchvision.models:resnet18`` streamed up to ``layer2``
(stride 8, receptive field 99 px) on a skinny image that its tile cuts into 8 tiles.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxstream.cli import main

UNET_SPEC = f"{Path(__file__).parent / 'models' / 'unet.py'}:unet"
RESNET18_LAYER2 = ["check", "torchvision.models:resnet18", "--split", "layer2",
                   "--input", "1x3x32x192", "--tile", "128"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (see tests/test_zoo_exactness.py): robust on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def num_tiles(out: str) -> int:
    """The tile count of the report's header, ``fxstream check  input ...  8 tiles``."""
    match = re.search(r"^fxstream check .* (\d+) tiles$", out, re.MULTILINE)
    assert match, out
    return int(match.group(1))


def verdict(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 1, out
    return lines[0]


def test_unet_model_file_passes(tmp_path):
    """The real command, from another directory: the model file finds the zoo by itself."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_COLOR="1", COLUMNS="120")
    proc = subprocess.run(
        [sys.executable, "-m", "fxstream.cli", "check", UNET_SPEC, "--input", "1x3x62x75",
         "--tile", "48"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert num_tiles(proc.stdout) > 1
    assert verdict(proc.stdout).startswith("PASS: worst relative difference")
    assert "tolerance 1e-10" in proc.stdout


def test_resnet18_split_layer2_passes(capsys):
    code = main(RESNET18_LAYER2)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "float64" in out and num_tiles(out) > 1
    assert verdict(out).startswith("PASS")
    assert " FAIL" not in out


def test_broken_plan_fails(capsys, monkeypatch):
    """Every tile but the first starts one alignment step late: its first outputs lose context
    (they read zero padding instead of the image), which the check must report."""
    import fxstream.tiling as plan_mod

    real = plan_mod.plan_axis

    def shifted(size, align, geos, *args, **kwargs):
        plan = real(size, align, geos, *args, **kwargs)
        spans = [span if span.start == 0 else plan_mod.Span(
            span.start + align, span.stop, span.outputs,
            tuple((l0 - int(align / g.stride), l1 - int(align / g.stride))
                  for (l0, l1), g in zip(span.local, geos)))
            for span in plan.spans]
        return plan_mod.AxisPlan(plan.size, plan.align, tuple(spans))

    monkeypatch.setattr(plan_mod, "plan_axis", shifted)
    code = main(RESNET18_LAYER2)
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert num_tiles(out) > 1
    assert verdict(out).startswith("FAIL: worst relative difference")
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.strip().startswith(("output", "input"))}
    assert rows["output"].rstrip().endswith("FAIL"), out


@pytest.mark.parametrize("dtype", ["int32", "float65"])
def test_bad_dtype_exits_2_with_one_line(capsys, dtype):
    code = main(["check", "torchvision.models:resnet18", "--input", "1x3x64x64", "--tile", "32",
                 "--dtype", dtype])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.splitlines() == [f"fxstream: error: --dtype {dtype!r}: expected a floating "
                                "dtype such as float64, float32 or bfloat16"]
