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


@pytest.mark.parametrize("model", ["sdxl", "sd15"])
def test_real_architectures_parameter_counts(model):
    """The published configs (docs/method.md#benchmark-architectures) on the meta device: no memory, and a
    config typo fails here, not on a GPU."""
    bm = _load_benchmark()
    counts = bm.check_param_counts(model, bm.build_empty_components(model))
    assert set(counts) == set(bm.EXPECTED_PARAMS_M[model])
    if model == "sdxl":
        assert round(counts["unet"], 1) == 2567.5 and round(counts["text_encoder_2"], 1) == 694.7


def test_param_count_check_catches_a_typo():
    bm = _load_benchmark()
    parts = bm.build_empty_components("sd15")
    parts["unet"], parts["text_encoder"] = parts["text_encoder"], parts["unet"]
    with pytest.raises(AssertionError, match="check the config"):
        bm.check_param_counts("sd15", parts)


def test_tiny_mode_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--mode", "tiny", "--presets", "3", "--steps", "2",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (result,) = report["results"]
    # Preset 3 (1024x2048, R = 7, V = 4), T = 2: 2 (2*8 + 4) + 1 (2 + 4) = 46 samples, in 2 + 2 + 1 calls.
    assert (result["width"], result["height"], result["resampling_steps"]) == (1024, 2048, 7)
    assert result["unet_samples"] == result["expected"]["samples"] == 46
    assert result["unet_calls"] == result["expected"]["calls"] == 5
    assert result["vae_encodes"] == result["expected"]["vae_encodes"] == 2 * 2  # left/right strips, 2 steps
    assert result["num_views"] == 4
    assert result["peak_memory_gib"] is None  # no GPU
    assert report["all_checks_passed"] and not report["failures"]
    for key in ("command", "date", "versions", "card", "floor", "params_m", "table"):
        assert key in report
    assert report["versions"]["torch"] and report["versions"]["diffusers"]
    assert result["floor_s"] > 0 and result["wall_s"] > 0 and result["ratio"] > 0
    assert result["plain_cfg_samples"] == 4
    # The markdown table is printed last.
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| 3 | 1024x2048 | 7 | 46 | 5 |")
