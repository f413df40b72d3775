"""``fxstream bench``: the command end to end on a tiny model, its skips and its errors.

Only one test starts processes (three, one per variant, shared through a module fixture); the
rest run in this process, render hand-made results, or fail before anything is started.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest
import torch
import torch.nn as nn

import fxstream
from fxstream import bench as fb
from fxstream.cli import main

TINY = '''\
import torch
import torch.nn as nn


def make():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 2))


class TopLevelRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x)))
'''
SHAPE = "1x3x64x64"


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.py"
    path.write_text(TINY)
    return f"{path}:make"


def run_main(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fxstream: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def bench_json(tiny_spec):
    """The one real run: three fresh processes (full, streamed, checkpoint), one repeat."""
    code, out, err = run_main("bench", tiny_spec, "--input", SHAPE, "--tile", "32",
                              "--repeat", "1", "--json", "--quiet")
    assert code == 0, err
    return json.loads(out)


# ---------------------------------------------------------------------------------------------
# the command, end to end


def test_bench_json_has_variants_medians_ratios(bench_json):
    (size,) = bench_json["sizes"]
    assert size["input_shape"] == [1, 3, 64, 64]
    variants = {v["variant"]: v for v in size["variants"]}
    assert list(variants) == ["full", "streamed", "checkpoint"]
    for v in variants.values():
        assert v["status"] == "ok", v
        assert len(v["runs"]) == 1 and not v["runs"][0]["error"]
        assert v["median_seconds"] > 0
        assert v["peak_bytes"] >= v["baseline_bytes"] > 0
        run = v["runs"][0]
        assert run["system_seconds"] >= 0 and run["page_faults"] >= 0
        assert run["user_seconds"] >= 0  # (a tiny step may take under a clock tick)
        assert v["median_system_seconds"] == run["system_seconds"]
    full, streamed = variants["full"], variants["streamed"]
    assert full["time_ratio"] == 1.0 and full["memory_ratio"] == 1.0
    assert streamed["time_ratio"] == pytest.approx(streamed["median_seconds"] /
                                                   full["median_seconds"])
    assert streamed["memory_ratio"] == pytest.approx(streamed["peak_bytes"] / full["peak_bytes"])
    assert bench_json["memory_kind"] == "peak RSS" and bench_json["tile_size"] == 32


def test_bench_variants_compute_the_same_loss(bench_json):
    losses = [v["runs"][0]["loss"] for v in bench_json["sizes"][0]["variants"]]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5, abs=1e-6)


def test_bench_redundancy_and_floor_come_from_the_plan(bench_json, tiny_spec):
    from fxstream.spec import load_model

    analysis = fxstream.analyze(load_model(tiny_spec).eval(), (1, 3, 64, 64))
    plan = fxstream.make_plan(analysis, fxstream.PlanOptions(tile_size=32,
                                                             memory_budget=None)).passes[0]
    size = bench_json["sizes"][0]
    assert (size["num_tiles"], size["redundancy"]) == (plan.num_tiles, plan.redundancy)
    streamed_run = size["variants"][1]["runs"][0]
    assert streamed_run["num_tiles"] == plan.num_tiles
    floor = size["floor"]
    assert floor["ratio"] == pytest.approx(4 / 3 * plan.redundancy)
    assert floor["basis"] == "full"
    assert floor["seconds"] == pytest.approx(floor["ratio"] * size["variants"][0]["median_seconds"])
    assert size["checkpoint_stages"] == ["0", "1", "3"]  # the in-place ReLU runs as is


# ---------------------------------------------------------------------------------------------
# variants reported, not run


@pytest.mark.skipif(not fxstream.hostmem.huge_pages_supported(),
                    reason="the kernel hands out no transparent huge pages")
def test_huge_pages_reach_every_run(tiny_spec, monkeypatch):
    """``--huge-pages`` starts each run with PyTorch's THP switch set (it is read when torch
    starts, so only a fresh process can get it), and the header says so."""
    monkeypatch.delenv(fxstream.hostmem.HUGE_PAGES_ENV, raising=False)
    code, out, err = run_main("bench", tiny_spec, "--input", SHAPE, "--tile", "32",
                              "--variants", "streamed", "--repeat", "1", "--huge-pages",
                              "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    (streamed,) = result["sizes"][0]["variants"]
    assert [r["huge_pages"] for r in streamed["runs"]] == [True]
    assert "huge pages" in result["options"]
    assert not fxstream.hostmem.huge_pages_on()  # this process is left as it was


def test_full_image_that_would_not_fit_is_not_run(tiny_spec, monkeypatch):
    monkeypatch.setattr("fxstream.bench.runner.available_memory", lambda device="cpu": 1000)
    monkeypatch.setattr("fxstream.bench.runner.run_child", _no_child)
    code, out, err = run_main("bench", tiny_spec, "--input", SHAPE, "--variants", "full",
                              "--json", "--quiet")
    assert code == 0, err
    (full,) = json.loads(out)["sizes"][0]["variants"]
    assert full["status"] == "would not fit" and full["runs"] == []
    assert full["note"].startswith("would not fit (estimated ")
    assert full["note"].endswith(" GiB > 0.00 GiB available)")
    code, out, _ = run_main("bench", tiny_spec, "--input", SHAPE, "--variants", "full")
    assert code == 0 and "would not fit (estimated" in out


def test_a_plan_that_keeps_its_graph_costs_the_full_step(tiny_spec, monkeypatch):
    """The default plan of a small image is one tile that keeps its graph (forward once, like
    the full step): its compute estimate is the full step's, not a recompute's 4/3."""
    monkeypatch.setattr("fxstream.bench.runner.run_child",
                        lambda config, variant, repeat, timeout=None:
                        fb.Run(variant, repeat, error="not run in this test"))
    code, out, err = run_main("bench", tiny_spec, "--input", SHAPE, "--variants", "streamed",
                              "--json", "--quiet")
    assert code == 0, err
    size = json.loads(out)["sizes"][0]
    assert [p["keep"] for p in size["plan"]["passes"]] == [True]
    assert size["floor"]["ratio"] == pytest.approx(size["plan"]["work"] / 0.75) == 1.0


def test_full_image_estimate_is_the_step_live_memory():
    """The estimate is the most the step holds at once (tracked on the meta device): an
    out-of-place ReLU's output replaces the conv output it frees, so ``inplace`` changes
    nothing; a second ReLU keeps both outputs alive (each is saved)."""
    def estimate(inplace):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace),
                            nn.AdaptiveAvgPool2d(1))
        shape = (1, 3, 64, 64)
        return fb.full_image_step(fxstream.analyze(net, shape))[1]

    assert estimate(False) == estimate(True) > 8 * 64 * 64 * 4


def test_checkpoint_unsupported_when_stem_is_no_chain(tiny_spec, monkeypatch):
    monkeypatch.setattr("fxstream.bench.runner.run_child", _no_child)
    spec = tiny_spec.replace(":make", ":TopLevelRelu")
    code, out, err = run_main("bench", spec, "--input", SHAPE, "--variants", "checkpoint",
                              "--json", "--quiet")
    assert code == 0, err
    (ckpt,) = json.loads(out)["sizes"][0]["variants"]
    assert ckpt["status"] == "unsupported"
    assert "stem node 'relu' (call_function) runs outside any top-level child" in ckpt["note"]


def _no_child(*args, **kwargs):
    raise AssertionError("no process should be started")


# ---------------------------------------------------------------------------------------------
# bad options: exit 2, one line, nothing run


@pytest.mark.parametrize("extra, message", [
    (["--tile", "32", "--budget", "1GiB"], "--tile and --budget exclude each other"),
    (["--budget", "lots"], "bad --budget 'lots'"),
    (["--tile", "0"], "bad --tile '0': every size must be positive"),
    (["--tile", "32", "--variants", "full,fast"], "bad --variants 'full,fast'"),
    (["--tile", "32", "--device", "tpu"], "bad --device 'tpu'"),
    (["--tile", "32", "--repeat", "0"], "--repeat must be >= 1"),
    (["--tile", "4"], "tile_size 4 is too small"),
    (["--tile", "32", "--offload"], "--offload keeps the image and cut maps on the host"),
    (["--tile", "32", "--cudnn-benchmark"], "--cudnn-benchmark tunes cuDNN's convolutions"),
    (["--tile", "32", "--huge-pages", "--device", "cuda"], "--huge-pages backs CPU tensors"),
    (["--tile", "32", "--input", "1x3x64", "--channels-last"],
     "--channels-last needs 4-d inputs"),
])
def test_bad_options_exit_2_with_one_line(tiny_spec, monkeypatch, extra, message):
    monkeypatch.setattr("fxstream.bench.runner.run_child", _no_child)
    code, out, err = run_main("bench", tiny_spec, "--input", SHAPE, *extra)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def test_plot_without_matplotlib_exits_2(tiny_spec, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    monkeypatch.setattr("fxstream.bench.runner.run_child", _no_child)
    code, _, err = run_main("bench", tiny_spec, "--input", SHAPE, "--tile", "32",
                            "--plot", "out.png")
    assert code == 2 and "pip install matplotlib" in one_error_line(err)


def test_parse_budget_reads_sizes_as_compile_does():
    from fxstream.budget import parse_bytes

    assert fb.parse_budget("8GiB") == 8 * 2**30 == parse_bytes("8GiB")
    assert fb.parse_budget("512 MiB") == 512 * 2**20
    assert fb.parse_budget("16GB") == 16 * 10**9


def test_budget_plan_is_chosen_here_and_passed_to_compile(tiny_spec, monkeypatch):
    configs = []

    def fake_child(config, variant, repeat, timeout=None):
        configs.append(config)
        tile = [512, 512] if repeat == 1 else [256, 256]  # the second run chose otherwise
        return fb.Run(variant, repeat, seconds=1.0 + repeat, peak_bytes=3, baseline_bytes=1,
                      tile_size=tile if variant == "streamed" else None)

    monkeypatch.setattr("fxstream.bench.runner.run_child", fake_child)
    code, out, err = run_main("bench", tiny_spec, "--input", SHAPE, "--budget", "64GiB",
                              "--variants", "full,streamed", "--repeat", "2", "--json")
    assert code == 0, err
    assert [(c["variant"], c["budget_bytes"], c["tile_size"]) for c in configs] == \
        [("full", 64 * 2**30, None), ("streamed", 64 * 2**30, None)] * 2  # interleaved
    size = json.loads(out)["sizes"][0]
    assert size["plan"]["cuts"] == [] and size["plan"]["passes"][0]["tile_size"] == [256, 256]
    assert (size["num_tiles"], size["redundancy"]) == (1, 1.0)
    # one tile keeping its graph: forward once, as the full step (its work is 0.75)
    assert size["floor"]["ratio"] == pytest.approx(size["plan"]["work"] / 0.75) == 1.0
    streamed = size["variants"][1]
    assert streamed["median_seconds"] == 1.5 and streamed["time_ratio"] == 1.0
    assert "the run chose cuts none, tile (512, 512) (planned here: cuts none, tile (256, 256)" \
        in streamed["note"]


# ---------------------------------------------------------------------------------------------
# pieces: checkpoint stages, the floor, the child, rendering


def test_checkpoint_stages_of_resnet18_follow_the_split():
    torchvision = pytest.importorskip("torchvision")
    model = fxstream.freeze_batchnorm(torchvision.models.resnet18())
    # relu is nn.ReLU(inplace=True): recomputed under checkpoint it would write into the saved
    # output of bn1 again (autograd's "modified by an inplace operation"), so it runs as is
    stem = ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3")
    assert fb.checkpoint_stages(fxstream.analyze(model, (1, 3, 256, 256)), model) == \
        stem + ("layer4",)
    # layer4 straddles the boundary: it runs as is
    split = fxstream.analyze(model, (1, 3, 256, 256), split="layer4.0")
    assert fb.checkpoint_stages(split, model) == stem


def test_checkpointed_resnet18_has_the_same_gradients():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = fxstream.freeze_batchnorm(torchvision.models.resnet18(num_classes=4)).double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.double)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    fb.apply_checkpoint(model, fb.checkpoint_stages(fxstream.analyze(model, (1, 3, 64, 64)),
                                                    model))
    model(x).sum().backward()
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g)


def test_apply_checkpoint_keeps_output_and_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
                        nn.AdaptiveAvgPool2d(1)).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.double)
    stages = fb.checkpoint_stages(fxstream.analyze(net, tuple(x.shape)), net)
    assert stages == ("0", "1", "2")
    net(x).sum().backward()
    want = [p.grad.clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = None
    fb.apply_checkpoint(net, stages)
    net(x).sum().backward()
    for p, g in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, g)


def test_streaming_floor_is_four_thirds_redundancy():
    full = fb.VariantResult("full", "ok", median_seconds=3.0)
    floor = fb.streaming_floor(1.5, full)
    assert (floor.ratio, floor.seconds, floor.basis) == (2.0, 6.0, "full")
    ckpt = fb.VariantResult("checkpoint", "ok", median_seconds=4.0)
    assert fb.streaming_floor(1.5, None, ckpt).seconds == 6.0


def test_child_reports_errors_as_json(capsys):
    config = dict(spec="torch.nn:NoSuchModel", variant="full", shape=[1, 3, 8, 8],
                  dtype="float32", device="cpu", tile_size=None, budget_bytes=None, split=None,
                  leaf_modules=[], stages=[], warmup=0)
    from fxstream.bench.child import _child_main

    assert _child_main(["--child", json.dumps(config)]) == 1
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["error"].startswith("SpecError: 'torch.nn' has no attribute 'NoSuchModel'")


def _result() -> fb.BenchResult:
    runs = (fb.Run("full", 0, 2.0, 3 * 2**30, 2**30),)
    full = fb.VariantResult("full", "ok", "", runs, 2.0, 3 * 2**30, 2**30, 1.0, 1.0, 1.0)
    streamed = fb.VariantResult("streamed", "ok", "", (), 5.0, 2**30 + 2**29, 2**30, 2.5, 0.5,
                                0.25)
    ckpt = fb.VariantResult("checkpoint", "unsupported", "no per-child checkpoint: reasons")
    small = fb.SizeResult((1, 3, 1024, 1024), 4, 1.5, 2**30, 2**31, (), (full, streamed, ckpt),
                          fb.streaming_floor(1.5, full))
    big = fb.SizeResult((1, 3, 4096, 4096), 16, 1.5, 2**34, 2**35, (),
                        (fb.VariantResult("full", "would not fit", "would not fit (estimated "
                                          "32.00 GiB > 8.00 GiB available)"),
                         fb.VariantResult("streamed", "ok", "", (), 40.0, 2**31, 2**30),
                         ckpt), fb.streaming_floor(1.5))
    return fb.BenchResult("m.py:make", "cpu", "float32", 512, None, 1, 0, "peak RSS", 8 * 2**30,
                          (small, big))


def test_render_bench_lists_variants_ratios_and_notes():
    from rich.console import Console

    out = io.StringIO()
    fb.render_bench(_result(), Console(file=out, width=120, color_system=None))
    text = out.getvalue()
    assert "input 1×3×1024×1024  (4 tiles, redundancy 1.50×)" in text
    streamed = next(line for line in text.splitlines() if line.strip().startswith("streamed"))
    assert streamed.split() == ["streamed", "5s", "2.50×", "1.5", "GiB", "0.50×", "1.0", "GiB",
                                "512.0", "MiB", "0.25×"]
    assert "full: would not fit (estimated 32.00 GiB > 8.00 GiB available)" in text
    assert "checkpoint: no per-child checkpoint: reasons" in text
    assert "streamed compute estimate: 2.00× full = 4 s (from full)" in text


@pytest.mark.parametrize("system, huge, device, note", [
    (1.0, False, "cpu", None),  # a fifth of its 5 s of CPU time: no note
    (3.0, False, "cpu", "streamed: 3 s of its 7 s of CPU time in the kernel (2.5 million page "
                        "faults); --huge-pages backs large tensors with huge pages"),
    (3.0, True, "cpu", "streamed: 3 s of its 7 s of CPU time in the kernel (2.5 million page "
                       "faults)\n"),
    (3.0, False, "cuda", None),  # the host's page faults are not what a CUDA step waits on
])
def test_a_step_spent_in_the_kernel_says_so(system, huge, device, note, monkeypatch):
    """The child's rusage of the timed step (system and user time, page faults) reaches the
    report: a CPU step with over a quarter of its CPU time in the kernel gets one line, with
    the hint unless its runs had huge pages already."""
    monkeypatch.setattr("fxstream.bench.render.huge_pages_supported", lambda: True)
    from dataclasses import replace

    from rich.console import Console

    result = _result()
    small = result.sizes[0]
    run = fb.Run("streamed", 0, 5.0, 2**30 + 2**29, 2**30, huge_pages=huge,
                 system_seconds=system, user_seconds=4.0, page_faults=2_500_000)
    streamed = replace(small.variants[1], runs=(run,), median_system_seconds=system,
                       median_user_seconds=4.0)
    result = replace(result, device=device,
                     sizes=(replace(small, variants=(small.variants[0], streamed,
                                                     small.variants[2])),))
    out = io.StringIO()
    fb.render_bench(result, Console(file=out, width=300, color_system=None))
    text = out.getvalue()
    if note is None:
        assert "in the kernel" not in text
    else:
        assert note in text


def test_json_round_trips_the_result():
    result = _result()
    data = json.loads(fb.to_json(result))
    assert data == json.loads(json.dumps(result.to_dict()))
    assert data["sizes"][1]["variants"][0]["status"] == "would not fit"


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    fb.plot_bench(_result(), str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("options", [dict(channels_last=True), dict(autocast="bfloat16")])
def test_child_step_options_apply_to_both_variants(tiny_spec, options):
    """channels-last and autocast change how every variant runs, not what it computes."""
    base = dict(spec=tiny_spec, shape=[1, 3, 64, 64], dtype="float32", device="cpu",
                tile_size=32, budget_bytes=None, split=None, leaf_modules=[], stages=[],
                warmup=0, **options)
    full = fb.child_step(dict(base, variant="full"))
    streamed = fb.child_step(dict(base, variant="streamed"))
    plain = fb.child_step(dict(base, variant="full", channels_last=False, autocast=None))
    tol = 1e-4 if "channels_last" in options else 5e-2
    assert abs(full["loss"] - streamed["loss"]) <= tol * abs(full["loss"])
    assert abs(full["loss"] - plain["loss"]) <= tol * abs(full["loss"])
    if "autocast" in options:
        assert full["loss"] != plain["loss"]  # bfloat16 rounding shows: autocast was on
