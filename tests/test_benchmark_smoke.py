"""Liveness of benchmarks/benchmark.py: tiny mode end to end, and the real architectures' sizes.

No timing assertions: CI runs on a shared CPU. What is checked is that the script runs, writes its
JSON, and that the counts the sampler reports equal the cost model (docs/method.md#cost-model; the model
itself is checked against the method's table in test_geometry.py and against real runs in test_sampler.py).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "benchmark.py")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["sdxl", "sd15", "sd35m"])
def test_real_architectures_parameter_counts(model):
    """The published configs (docs/method.md#benchmark-architectures) on the meta device: no memory, and a
    config typo fails here, not on a GPU."""
    bm = _load_benchmark()
    counts = bm.check_param_counts(model, bm.build_empty_components(model, meta_buffers=True))
    assert set(counts) == set(bm.EXPECTED_PARAMS_M[model])
    if model == "sdxl":
        assert round(counts["unet"], 1) == 2567.5 and round(counts["text_encoder_2"], 1) == 694.7
    if model == "sd35m":  # SD 3.5 Medium's MMDiT-X: 24 blocks, 13 of them with dual attention
        assert round(counts["transformer"], 1) == 2243.2


def test_param_count_check_catches_a_typo():
    bm = _load_benchmark()
    parts = bm.build_empty_components("sd15")
    parts["unet"], parts["text_encoder"] = parts["text_encoder"], parts["unet"]
    with pytest.raises(AssertionError, match="check the config"):
        bm.check_param_counts("sd15", parts)


def test_planned_batch_sizes_add_up_to_the_cost_model():
    """The call sizes the floor times up front: balanced splits of each pass, summing to the run's samples and calls."""
    bm = _load_benchmark()
    assert bm.call_sizes(38, 16) == [13, 13, 12] and bm.call_sizes(18, 16) == [9, 9] and bm.call_sizes(6, 16) == [6]
    assert bm.call_sizes(38, 40) == [38] and bm.call_sizes(0, 16) == []
    assert bm.planned_batch_sizes(bm.expected_cost(2048, 2048, 128, 64, 10, 50, 1, 16), 50, 16) == {9: 98, 12: 50, 13: 100}
    for width, height, R in ((2048, 2048, 10), (1024, 2048, 7), (1080, 1920, 7), (768, 768, 0)):
        for v in (1, 4, 16, 40):
            cost = bm.expected_cost(height, width, 128, 64, R, 50, 1, v)
            sizes = bm.planned_batch_sizes(cost, 50, v)
            assert sum(size * count for size, count in sizes.items()) == cost["samples"], (width, height, v)
            assert sum(sizes.values()) == cost["calls"] and max(sizes) <= v


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_script", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log_text(folder) -> str:
    return (folder / "gpu_check.log").read_text()


def test_gpu_check_dry_run_end_to_end(tmp_path):
    """benchmarks/gpu_check.sh on the CPU with tiny models: every stage but the compile ones, the JSON written as
    results come, tests/test_gpu.py run in its own process and reported (skipped here, with its reason)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--mode", "tiny", "--presets", "3",
                           "--low_vram_presets", "3", "--stages", "table,tests,sd3,low_vram,view_batch"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(name, stage["status"]) for name, stage in report["stages"].items()] == [
        ("table", "done"), ("tests", "done"), ("sd3", "done"), ("low_vram", "done"), ("view_batch", "done")]
    assert not report["failures"] and report["targets"] == []  # tiny numbers are not held against the targets
    assert report["environment"]["diffusers"] and report["environment"]["cuda_available"] is False
    runs = {r["stage"]: r for r in report["results"]}
    sd3 = runs.pop("sd3")  # SD 3.5 Medium's layout (tiny), T = 1: one main pass of 2 (7 + 1) + 4 windows
    assert (sd3["model"], sd3["unet_samples"], sd3["expected"]["samples"], sd3["samples_match"]) == ("sd35m", 20, 20, True)
    assert report["sd3"]["floor"]["best_per_sample_s"] > 0 and "sd35m eager" in log_text(tmp_path)
    # The sd3 stage ran benchmarks/benchmark.py's main in-process: its own JSON report, complete.
    bench = json.loads((tmp_path / "sd3.json").read_text())
    assert bench["all_checks_passed"] and not bench["failures"] and bench["model"] == "sd35m"
    for key in ("command", "date", "versions", "card", "floor", "params_m", "table"):
        assert key in bench
    assert bench["versions"]["torch"] and bench["versions"]["diffusers"]
    assert bench["table"].splitlines()[-1].startswith("| 3 | 512x1024 | 7 | 20 | 2 |")  # sizes at its 512 px
    assert list(runs) == ["table", "low_vram", "view_batch"]
    table = runs["table"]
    # Preset 3 (1024x2048, R = 7, V = 4), T = 2: 2 (2*8 + 4) + 1 (2 + 4) = 46 samples, in 2 + 2 + 1 calls.
    assert (table["width"], table["height"], table["resampling_steps"], table["num_views"]) == (1024, 2048, 7, 4)
    assert table["unet_samples"] == table["expected"]["samples"] == 46
    assert table["vae_encodes"] == table["expected"]["vae_encodes"] == 2 * 2  # left/right strips, 2 steps
    assert table["peak_memory_gib"] is None and table["plain_cfg_samples"] == 4  # no GPU; plain CFG: 2 x T
    assert table["floor_s"] > 0 and table["wall_s"] > 0 and table["ratio"] > 0
    # The 2x upscale to the same size at strength 0.5 runs the last of the 2 steps: one main pass, no repaint.
    upscale = table["upscale"]
    assert upscale["unet_samples"] == upscale["expected_samples"] == 2 * 8 + 4 and upscale["from_size"] == [512, 1024]
    assert upscale["text_unet_samples"] == 46 and upscale["wall_s"] > 0
    assert [(r["view_batch_size"], r["low_vram"], r["unet_calls"]) for r in runs.values()] == [
        (16, False, 5), (16, True, 5), (40, False, 3)]
    # T = 2 at 1024x2048: main passes of 20 samples (10 + 10 at v = 16, one call at 40), one repaint pass of 6
    assert runs["table"]["unet_batch_sizes"] == {"6": 1, "10": 4} and runs["view_batch"]["unet_batch_sizes"] == {"6": 1, "20": 2}
    for r in runs.values():
        assert r["samples_match"] and r["calls_match"] and r["planned_batch_sizes_match"]
        assert set(r["per_sample_at_used_batches_s"]) == set(r["unet_batch_sizes"])
        assert all(cost > 0 for cost in r["per_sample_at_used_batches_s"].values())
        assert r["calls_floor_s"] == pytest.approx(sum(
            count * int(size) * r["per_sample_at_used_batches_s"][size] for size, count in r["unet_batch_sizes"].items()))
    # the floor timed the sizes of both view batch sizes before any run
    assert {"6", "10", "20"} <= set(report["floor"]["per_sample_s"])
    comparison = {row["view_batch_size"]: row for row in report["view_batch_comparison"]}
    assert comparison[16]["batch_sizes"] == {"6": 1, "10": 4} and comparison[40]["batch_sizes"] == {"6": 1, "20": 2}
    tests = report["tests"]
    assert tests["returncode"] == 0 and tests["counts"] == {"skipped": 4}  # the compile check is the other stage's
    assert all("needs a CUDA GPU" in t["message"] for t in tests["tests"].values())
    assert "test_compiled_unet_gives_the_eager_image" not in tests["tests"]
    log = log_text(tmp_path)
    assert "== summary" in log and "tests: {'skipped': 4}" in log and (tmp_path / "tests.xml").exists()


def test_gpu_check_budget_skips_stages_that_do_not_fit(tmp_path):
    """Each stage is skipped, with its estimate, when the time left would not cover it; nothing is built then."""
    gpu_check = _load_gpu_check()
    report = gpu_check.main(["--mode", "gpu", "--out", str(tmp_path), "--budget_s", "100",
                             "--stages", "table,low_vram,compile,view_batch"])
    assert {name: stage["status"] for name, stage in report["stages"].items()} == dict.fromkeys(
        ["table", "low_vram", "compile", "view_batch"], "skipped")
    setup = gpu_check.ESTIMATE_S["setup"]
    for name, stage in report["stages"].items():  # no stage ran, so each would have paid for the model build
        assert stage["reason"].startswith(f"estimated {gpu_check.ESTIMATE_S[name] + setup} s, ")
    assert "card" not in report and report["results"] == []
    assert json.loads((tmp_path / "gpu_check.json").read_text())["stages"] == report["stages"]
    with pytest.raises(SystemExit, match="unknown"):
        gpu_check.main(["--mode", "tiny", "--out", str(tmp_path), "--stages", "table,benchmark"])


def test_gpu_check_targets():
    gpu_check = _load_gpu_check()
    reference = {"wall_s": 95.9}

    def result(stage, width, wall, ratio, peak, low_vram=False):
        return dict(stage=stage, width=width, height=2048, wall_s=wall, ratio=ratio, peak_memory_gib=peak,
                    low_vram=low_vram, reference_h200=reference if width == 2048 else None)

    rows = gpu_check.targets({"results": [result("table", 2048, 47.0, 1.1, 11.5), result("low_vram", 2048, 50.0, 1.2, 8.5, True),
                                          result("compile", 1024, 30.0, 1.2, 9.0)]})
    got = {row["target"]: (round(row["measured"], 3), row["met"]) for row in rows}
    assert got == {
        "table 2048x2048: wall <= 1.15 x eager floor": (1.1, True),
        "table 2048x2048: >= 2.0x faster than the reference's 95.9 s": (round(95.9 / 47.0, 3), True),
        "table 2048x2048: peak <= 12.0 GiB": (11.5, True),
        "low_vram 2048x2048: peak <= 8.0 GiB": (8.5, False),
        "compile 1024x2048: wall <= 1.15 x eager floor": (1.2, False),
    }


@pytest.mark.slow  # about 1.5 minutes of inductor compilation on 2 CPU cores
def test_gpu_check_compile_stages_dry_run(tmp_path):
    # v = 8: on a CPU, fp32 convolutions switch backend (oneDNN) at batch 16, so a graph traced at batch < 16
    # holds only up to 15 and timing the compiled UNet at 16 would compile again (flagged as a failure)
    gpu_check = _load_gpu_check()
    report = gpu_check.main(["--mode", "tiny", "--out", str(tmp_path), "--presets", "3", "--view_batch_size", "8",
                             "--stages", "compile,tests_compile"])
    assert [stage["status"] for stage in report["stages"].values()] == ["done", "done"] and not report["failures"]
    assert report["compile"]["graphs_compiled"] >= 1 and report["compile"]["first_call_s"] > 0
    assert report["compile"]["graphs_compiled_timing_the_unet"] == 0  # time_unet calls it as the sampler does
    (run,) = report["results"]
    assert run["compiled"] and run["graphs_compiled_in_timed_run"] == 0 and run["ratio_compiled"] > 0
    assert run["graphs_compiled_timing_the_unet"] == 0 and run["calls_floor_s"] > 0
    assert report["tests_compile"]["counts"] == {"skipped": 1}
    assert "test_compiled_unet_gives_the_eager_image" in report["tests_compile"]["tests"]


def test_look_inside_cost_script_times_the_apps_drawing(tmp_path):
    """benchmarks/look_inside_cost.py runs the app's own drawing on a synthetic recording and reports every file."""
    spec = importlib.util.spec_from_file_location("look_inside_cost", os.path.join(ROOT, "benchmarks",
                                                                                  "look_inside_cost.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "look_inside.json"
    (result,) = script.main(["--model", "sd15", "--sizes", "1024x512", "--steps", "3", "--json", str(out)])
    assert json.loads(out.read_text())["results"] == [result]
    assert (result["width"], result["height"], result["steps"]) == (1024, 512, 3)
    assert set(result["bytes"]) == {"sheet", "animation", "windows"} and min(result["bytes"].values()) > 0
    recording = script.synthetic_recording(1024, 512, 512, 3)  # the shapes SD 1.5 records at 2x width
    assert recording.direction.shape == (3, 4, 64, 128) and recording.reference_direction.shape == (3, 4, 32, 64)
    assert recording.views == script.ed.local_views(64, 128, 64, 32)
