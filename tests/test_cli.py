"""The ``fxstream`` command line, its SPEC parsing and its report (golden snapshot).

Regenerate the snapshot after an intended change of the report with

    FXSTREAM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_cli.py

and review the diff of ``tests/golden/``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

import fxstream
from fxstream.cli import main
from fxstream.errors import SpecError
from fxstream.report import display_path, display_source, human_bytes, shown_rows
from fxstream.spec import load_model, parse_input, parse_tile
from fxstream.summary import summarize

GOLDEN = Path(__file__).parent / "golden"
RESNET18 = ["analyze", "torchvision.models:resnet18", "--input", "1x3x1024x1024", "--tile", "512"]

UNTRACEABLE = '''\
import torch.nn as nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def make():
    return Branchy()
'''

SMALL = '''\
import torch.nn as nn


def make():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1))


def boom():
    raise ValueError("no weights here")


def number():
    return 3
'''


@pytest.fixture
def plain_console(monkeypatch):
    """rich consoles of the CLI render 120 columns wide, without colour."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")


@pytest.fixture
def small_model(tmp_path):
    path = tmp_path / "small.py"
    path.write_text(SMALL)
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fxstream: error: "), err
    assert "Traceback" not in err
    return lines[0]


def normalize(text: str) -> str:
    """rich pads table lines to the table's width; trailing spaces are not part of the report."""
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


# ---------------------------------------------------------------------------------------------
# analyze: golden report, JSON


def test_analyze_resnet18_matches_golden(capsys, plain_console):
    code, out, err = run(capsys, *RESNET18)
    assert code == 0, err
    assert err == ""
    text = normalize(out)
    golden = GOLDEN / "analyze_resnet18.txt"
    if os.environ.get("FXSTREAM_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), "no snapshot yet: rerun with FXSTREAM_UPDATE_GOLDEN=1"
    assert text == golden.read_text(encoding="utf-8"), (
        "report differs from tests/golden/analyze_resnet18.txt; if intended, rerun with "
        "FXSTREAM_UPDATE_GOLDEN=1 and review the diff")


def test_golden_has_no_machine_paths():
    text = (GOLDEN / "analyze_resnet18.txt").read_text(encoding="utf-8")
    assert "site-packages" not in text and str(Path.home()) not in text
    assert str(Path.cwd()) not in text


def test_analyze_json_equals_to_dict(capsys):
    import torchvision

    code, out, err = run(capsys, *RESNET18, "--json")
    assert code == 0, err
    model = torchvision.models.resnet18().eval()
    expected = fxstream.analyze(model, (1, 3, 1024, 1024))
    plan = fxstream.make_plan(expected, fxstream.PlanOptions(tile_size=512, memory_budget=None))
    want = dict(expected.to_dict(), plan=summarize(expected, plan).to_dict())
    assert json.loads(out) == json.loads(json.dumps(want))


def test_analyze_all_nodes_shows_pointwise_rows(capsys, plain_console, small_model):
    spec = f"{small_model}:make"
    code, default, _ = run(capsys, "analyze", spec, "--input", "1x3x64x64")
    assert code == 0
    code, everything, _ = run(capsys, "analyze", spec, "--input", "1x3x64x64", "--all-nodes")
    assert code == 0
    relu = [line for line in everything.splitlines() if line.strip().startswith("_1 ")]
    assert relu and "ReLU" in relu[0]
    assert not [line for line in default.splitlines() if line.strip().startswith("_1 ")]
    assert "▶ _2" in default and "▶ _2" in everything  # the boundary, marked in both


def test_analyze_without_tile_says_how_to_plan(capsys, plain_console, small_model):
    code, out, _ = run(capsys, "analyze", f"{small_model}:make", "--input", "1x3x64x64")
    assert code == 0
    assert "pass --tile SIZE" in out


def test_analyze_tile_per_axis(capsys, small_model):
    code, out, err = run(capsys, "analyze", f"{small_model}:make", "--input", "1x3x64x96",
                         "--tile", "32x48", "--json")
    assert code == 0, err
    assert json.loads(out)["plan"]["passes"][0]["tile_size"] == [32, 48]


def test_train_flag_keeps_train_mode(capsys):
    # train-mode BatchNorm streams as statistics: bn1 becomes its moments (a reduction over the
    # batch and the image), a normalisation, and the update of its running statistics
    ops = {}
    for train in (False, True):
        code, out, err = run(capsys, "analyze", "torchvision.models:resnet18", "--input",
                             "1x3x64x64", "--json", *(["--train"] if train else []))
        assert code == 0, err
        data = json.loads(out)
        assert data["boundary"] == ["layer4_1_relu_1"]
        ops[train] = {r["op"] for r in data["rows"] if r["qualname"] == "bn1"}
    assert "passes.statistics.moments" in ops[True]
    assert "passes.statistics.update_running_stats" in ops[True]
    assert not any(op.startswith("passes.statistics") for op in ops[False])


# ---------------------------------------------------------------------------------------------
# errors: exit 2, one line on stderr


@pytest.mark.parametrize("spec, message", [
    ("resnet18", "bad model SPEC 'resnet18': expected 'package.module:callable'"),
    ("no_such_module_xyz:make", "no module named 'no_such_module_xyz'"),
    ("torchvision.models:resnet5", "'torchvision.models' has no attribute 'resnet5'; did you "
                                   "mean resnet50"),
    ("missing/model.py:make", "model file 'missing/model.py' not found"),
])
def test_bad_spec_exits_2_with_one_line(capsys, spec, message):
    code, out, err = run(capsys, "analyze", spec, "--input", "1x3x64x64")
    assert code == 2
    assert out == ""
    assert message in one_error_line(err)


@pytest.mark.parametrize("name, message", [
    ("boom", "calling boom() from model SPEC '{path}:boom' raised ValueError: no weights here"),
    ("number", "model SPEC '{path}:number' returned int, not an nn.Module"),
    ("nope", "'{path}' has no attribute 'nope'"),
])
def test_bad_spec_callable_exits_2(capsys, small_model, name, message):
    code, _, err = run(capsys, "analyze", f"{small_model}:{name}", "--input", "1x3x64x64")
    assert code == 2
    assert message.format(path=small_model) in one_error_line(err)


@pytest.mark.parametrize("text, message", [
    ("1x3", "bad --input '1x3': expected N x C x spatial sizes"),
    ("1x3x0x64", "bad --input '1x3x0x64': every size must be positive"),
    ("1,3,64,64", "bad --input '1,3,64,64'"),
])
def test_bad_input_exits_2_with_one_line(capsys, small_model, text, message):
    code, out, err = run(capsys, "analyze", f"{small_model}:make", "--input", text)
    assert code == 2
    assert out == ""
    assert message in one_error_line(err)


def test_bad_tile_exits_2(capsys, small_model):
    code, _, err = run(capsys, "analyze", f"{small_model}:make", "--input", "1x3x64x64",
                       "--tile", "big")
    assert code == 2
    assert "bad --tile 'big'" in one_error_line(err)


def test_untraceable_model_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "branchy.py"
    path.write_text(UNTRACEABLE)
    lineno = UNTRACEABLE.splitlines().index("        if x.sum() > 0:") + 1
    code, out, err = run(capsys, "analyze", f"{path}:make", "--input", "1x3x64x64")
    assert code == 2
    assert out == ""
    line = one_error_line(err)
    assert "cannot trace Branchy" in line
    assert f"{path}:{lineno}" in line and "if x.sum() > 0" in line


def test_other_fxstream_errors_exit_2(capsys, small_model):
    code, _, err = run(capsys, "analyze", f"{small_model}:make", "--input", "1x3x64x64",
                       "--split", "no_such_node")
    assert code == 2
    assert "split='no_such_node'" in one_error_line(err)


def test_no_subcommand_prints_help_and_exits_2(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "analyze" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "analyze", "--help")
    assert code == 0
    assert "eval mode" in out and "--train" in out


# ---------------------------------------------------------------------------------------------
# the installed console script


def test_installed_script_runs(small_model):
    script = Path(sys.executable).with_name("fxstream")
    if not script.exists():
        pytest.skip("console script not installed: pip install -e . --no-deps")
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    ok = subprocess.run([str(script), "analyze", f"{small_model}:make", "--input", "1x3x64x64",
                         "--tile", "32"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "▶ _2" in ok.stdout and "Tile plan" in ok.stdout
    bad = subprocess.run([str(script), "analyze", f"{small_model}:make", "--input", "64x64"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == ["fxstream: error: bad --input '64x64': expected N x C x "
                                       "spatial sizes joined by 'x', e.g. 1x3x8192x8192"]


# ---------------------------------------------------------------------------------------------
# spec.py and report.py helpers


def test_parse_input_and_tile():
    assert parse_input("1x3x8192x8192") == (1, 3, 8192, 8192)
    assert parse_input("2X1x16") == (2, 1, 16)
    assert parse_tile("2048") == 2048
    assert parse_tile("2048x1024") == (2048, 1024)
    for bad in ("", "1x3", "1x3x", "x1x3x4", "1x3x-4x4", "1.5x3x4x4"):
        with pytest.raises(SpecError, match="bad --input"):
            parse_input(bad)


def test_load_model_forms(small_model):
    assert isinstance(load_model("torch.nn:Identity"), nn.Identity)
    assert isinstance(load_model(f"{small_model}:make"), nn.Sequential)


@pytest.mark.slow
def test_load_model_timm():
    pytest.importorskip("timm")
    model = load_model("timm:resnet18")
    assert type(model).__name__ == "ResNet"
    with pytest.raises(SpecError, match=r"timm.create_model\('no_such_net'\) failed"):
        load_model("timm:no_such_net")


def test_display_paths_do_not_depend_on_the_machine():
    assert display_path("/opt/venv/lib/python3.11/site-packages/torchvision/models/resnet.py") \
        == "torchvision/models/resnet.py"
    assert display_path("/usr/lib/python3/dist-packages/timm/layers/x.py") == "timm/layers/x.py"
    assert display_path(str(Path.cwd() / "models" / "unet.py")) == "models/unet.py"
    assert display_source("/x/site-packages/torchvision/models/resnet.py:278: x = self.avgpool(x)") \
        == "torchvision/models/resnet.py:278: x = self.avgpool(x)"


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 * 2**20) == "3.0 MiB"
    assert human_bytes(int(1.5 * 2**30)) == "1.5 GiB"


def test_shown_rows_hide_rows_that_repeat_a_geometry():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1)).eval()
    a = fxstream.analyze(net, (1, 3, 32, 32))
    assert [r.name for r in shown_rows(a)] == [a.rows[0].name, "_0", "_3", "_4"]
    assert len(shown_rows(a, all_nodes=True)) == len(a.rows)


def test_analyze_budget_shows_the_plan_compile_runs(capsys, plain_console, monkeypatch):
    """`analyze --budget` prints the chosen plan: cuts, and per pass its tiles, pool and
    recompute, the same plan as the streaming module compile builds under that budget."""
    import torchvision

    monkeypatch.setattr("fxstream.budget.current_rss", lambda: 2**29)
    argv = ["analyze", "torchvision.models:resnet18", "--input", "1x3x2048x2048", "--budget",
            "1.5GiB"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    code, js, err = run(capsys, *argv, "--json")
    assert code == 0, err
    shown = json.loads(js)["plan"]
    sm = fxstream.compile(torchvision.models.resnet18().eval(), input_shape=(1, 3, 2048, 2048),
                          memory_budget="1.5GiB")
    plan = sm.plan((1, 3, 2048, 2048))
    assert shown["cuts"] == list(plan.cuts)
    assert [(p["tile_size"], p["num_tiles"], p["pool"], p["keep"]) for p in shown["passes"]] == \
        [(list(p.tile_size), p.num_tiles, p.pool, p.keep) for p in plan.passes]
    text = " ".join(out.split())  # rows may wrap
    assert f"cuts {', '.join(plan.cuts)}" in text and "peak memory" in text
