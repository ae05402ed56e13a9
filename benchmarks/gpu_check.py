#!/usr/bin/env python
"""The GPU session of issue 14 in one process: the benchmark table, the memory modes and tests/test_gpu.py.

Run it through `benchmarks/gpu_check.sh` (which installs the carried wheels first); the header of that
file has the exact device call. Stages run in the order given (`--stages`, default all, in this order):

    table          eager sampler, presets 1 (2048x2048, R = 10) and 3 (1024x2048, R = 7), v = 16, T = 50;
                   and beside each a 2x upscale to its size (image-to-image, strength 0.5);
                   first the eager UNet floor, timed also at every batch size those runs use at v = 16
                   and at the wide view batch (40: one call per pass)
    tests          tests/test_gpu.py except the compile check
    sd3            SD 3.5 Medium's architecture (random weights, no T5), eager: its own transformer floor, then
                   preset 3 (1024x2048, R = 7) at its 28 steps, wall against floor (benchmark.py --model sd35m)
    low_vram       low_vram=True, preset 1: peak memory and wall time
    compile        compile_unet=True: the first call's time (compilation) separately, then presets 1 and 3
    tests_compile  tests/test_gpu.py's compile check (after `compile`, inductor's on-disk cache is warm)
    view_batch     the wide view batch (40), presets 1 and 3, measured wall times

Every result is written to OUT/gpu_check.json the moment it is measured, so a run stopped at its time
limit keeps what it measured. With `--budget_s`, a stage (or preset) is skipped, and says so, when its
estimated time no longer fits; `--stages` with the skipped names continues in a second call.

Planning estimates on an H100/H200 (fp16 SDXL, T = 50), not measurements: the reference
implementation's component costs on an H200 were about 17 ms per UNet sample at batch 16-32 eager
and about 2 minutes per torch.compile; 2,782 samples at 2048x2048 and 1,294 at 1024x2048 (the cost
model). `ESTIMATE_S` below adds warm-ups, model builds and process starts to that.

On a CPU, `--mode tiny` runs every stage with the tiny test models (T = 2): the plumbing, not the
numbers (tests/test_benchmark_smoke.py runs it; tests/test_gpu.py is then skipped, and reported so).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

STAGES = ("table", "tests", "sd3", "low_vram", "compile", "tests_compile", "view_batch")
# Seconds each stage is planned to take on an H100/H200 (see the module docstring); `setup` is the
# imports, the model build and the floor (13 batch sizes), paid by the first stage that needs the
# models. tests_compile compiles the UNet again: about 75 s with the compile stage's graphs in
# inductor's on-disk cache, a full compilation (COLD_COMPILE_S) more without.
ESTIMATE_S = dict(setup=45, table=135, tests=75, sd3=100, low_vram=65, compile=230, tests_compile=75, view_batch=80)
SELF_CONTAINED = ("tests", "tests_compile", "sd3")  # stages that build their own models (no SDXL `setup`)
COLD_COMPILE_S = 150
COMPILE_TEST = "compiled"  # pytest -k expression that selects test_gpu.py's compile check
TARGETS = dict(ratio=1.15, speedup_vs_reference=2.0, peak_2048_gib=12.0, peak_2048_low_vram_gib=8.0)


def load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", os.path.join(ROOT, "benchmarks", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bm = load_benchmark()
import elastic_diffusion as ed  # noqa: E402  (after benchmark.py put the repository on sys.path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stages", default="all", help=f"comma-separated, run in the order given: {', '.join(STAGES)}")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "gpu_check"),
                   help="folder for gpu_check.json and the test reports")
    p.add_argument("--mode", choices=["gpu", "tiny"], default=None,
                   help="gpu: real SDXL architecture (default with CUDA); tiny: tiny CPU models (dry run)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds this process may take; stages whose estimate does not fit are skipped")
    p.add_argument("--presets", default="1,3", help="presets of the table, compile and view_batch stages")
    p.add_argument("--upscale_strength", type=float, default=0.5,
                   help="the table stage also times a 2x upscale to each preset's size at this strength (0: off)")
    p.add_argument("--low_vram_presets", default="1", help="presets of the low_vram stage")
    p.add_argument("--sd3_presets", default="3", help="presets of the sd3 stage")
    p.add_argument("--steps", type=int, default=None, help="T (default 50 gpu, 2 tiny)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                   help="UNet and text encoder weights (float16: the sampler's default on CUDA; the SDXL VAE "
                        "then runs in bf16)")
    p.add_argument("--view_batch_size", type=int, default=16, help="v of the table, low_vram and compile stages")
    p.add_argument("--wide_view_batch_size", type=int, default=40,
                   help="v of the view_batch stage: one UNet call per main pass at both presets")
    p.add_argument("--seed", type=int, default=0)
    return p


class Session:
    """The run's report, written after every result; the models, built once when a stage first needs them."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args = args
        self.start = time.monotonic()
        self.path = os.path.join(args.out, "gpu_check.json")
        os.makedirs(args.out, exist_ok=True)
        self.tiny = args.mode == "tiny"
        self.presets = bm.parse_ints(args.presets)
        self.report = dict(
            command=" ".join(shlex.quote(a) for a in ["python", "benchmarks/gpu_check.py", *argv]),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            mode=args.mode, environment=environment(), stages={}, results=[], failures=[])
        self.bench_args = self._bench_args()
        self.built = None
        self.eager_costs, self.compiled_costs = {}, {}
        self.write()

    def _bench_args(self) -> argparse.Namespace:
        argv = ["--mode", self.args.mode, "--model", "sdxl", "--dtype", self.args.dtype,
                "--view_batch_size", str(self.args.view_batch_size), "--seed", str(self.args.seed)]
        if self.args.steps:
            argv += ["--steps", str(self.args.steps)]
        bench = bm.build_parser().parse_args(argv)
        bm.resolve_defaults(bench)
        return bench

    # -- time and output

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return float("inf") if self.args.budget_s is None else self.args.budget_s - self.elapsed()

    def fits(self, seconds: float) -> bool:
        return seconds <= self.remaining()

    def estimate(self, stage: str) -> float:
        """Planned seconds of `stage` (0 in tiny mode: only the budget itself then decides)."""
        if self.tiny:
            return 0.0
        setup = ESTIMATE_S["setup"] if self.built is None and stage not in SELF_CONTAINED else 0
        cold = stage == "tests_compile" and self.report["stages"].get("compile", {}).get("status") != "done"
        return ESTIMATE_S[stage] + setup + (COLD_COMPILE_S if cold else 0)

    def write(self) -> None:
        self.report["elapsed_s"] = self.elapsed()
        tmp = self.path + ".part"
        with open(tmp, "w") as f:
            json.dump(self.report, f, indent=2, default=str)
        os.replace(tmp, self.path)  # a reader (or a kill) never sees half a file

    def add_result(self, stage: str, result: dict) -> None:
        result["stage"] = stage
        self.report["results"].append(result)
        self.report["failures"] += bm.check_results([result])
        self.write()

    # -- models

    def models(self) -> dict:
        """The pipeline and the eager floor (at the default batches and every size the runs will use)."""
        if self.built is None:
            tic = time.monotonic()
            self.built = bm.build(self.bench_args)
            b, args = self.bench_args, self.args
            sizes = set(bm.parse_ints(b.floor_batches))
            for index in sorted(set(self.presets) | set(bm.parse_ints(args.low_vram_presets))):
                for v in (args.view_batch_size, args.wide_view_batch_size):
                    sizes |= set(bm.planned_batch_sizes(self.expected(index, v), b.steps, v))
            print("UNet floor (eager):", flush=True)
            floor = bm.measure_floor(self.built["pipe"].unet, sorted(sizes), self.built["device"], self.built["dtype"],
                                     b.floor_iters, warmup=1 if self.tiny else 2, known=self.eager_costs)
            self.report.update(card=self.built["card"], dtype=str(self.built["dtype"]).replace("torch.", ""),
                               params_m=self.built["params_m"], build_s=self.built["build_s"], floor=floor,
                               settings=vars(b), setup_s=time.monotonic() - tic)
            self.write()
        return self.built

    def sampler(self, **kwargs):
        built = self.models()
        return ed.ElasticDiffusion.from_pipe(built["pipe"], device=built["device"], **kwargs)

    def expected(self, index: int, v: int) -> dict:
        """The cost model's counts for preset `index` at view batch size `v` (SDXL, the only model run here)."""
        request = bm.preset_request(index, 1024)
        D = 128  # SDXL's native latent size
        return bm.expected_cost(request["height"], request["width"], D, D // 2, request["resampling_steps"],
                                self.bench_args.steps, self.bench_args.batch, v)

    def preset_estimate(self, index: int, args: argparse.Namespace) -> float:
        """Seconds the (warm-up and) timed run of preset `index` should take, from the measured floor."""
        if self.tiny or self.built is None:
            return 0.0
        per_sample = self.report["floor"]["best_per_sample_s"]
        samples = self.expected(index, args.view_batch_size)["samples"] * (1 + (args.upscale_strength or 0))
        warmup = args.warmup_steps / args.steps if args.warmup else 0.0
        return samples * per_sample * 1.25 * (1 + warmup) + 10

    def run_presets(self, stage: str, sampler, presets: list[int], args: argparse.Namespace, costs: dict,
                    compiled_per_sample: float | None = None) -> list[int]:
        """Run and record each preset that still fits the budget; returns those skipped."""
        skipped = []
        for index in presets:
            if not self.fits(self.preset_estimate(index, args)):
                skipped.append(index)
                print(f"  preset {index} skipped: {self.remaining():.0f} s left", flush=True)
                continue
            result = bm.run_preset(sampler, index, args, self.report["floor"], compiled_per_sample, costs)
            planned = bm.planned_batch_sizes(result["expected"], args.steps, args.view_batch_size)
            result["planned_batch_sizes_match"] = {str(k): v for k, v in planned.items()} == result["unet_batch_sizes"]
            if not result["planned_batch_sizes_match"]:
                self.report["failures"].append(f"{stage} preset {index}: batch sizes {result['unet_batch_sizes']} "
                                               f"!= planned {planned}")
            self.add_result(stage, result)
        return skipped


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def stage_table(s: Session) -> dict:
    sampler = s.sampler(view_batch_size=s.args.view_batch_size)
    args = copy.copy(s.bench_args)
    args.upscale_strength = s.args.upscale_strength or None  # the 2x upscale beside each preset, in this stage only
    skipped = s.run_presets("table", sampler, s.presets, args, s.eager_costs)
    s.report["view_batch_comparison"] = view_batch_comparison(s)
    return dict(skipped_presets=skipped)


def view_batch_comparison(s: Session) -> list[dict]:
    """Per preset and view batch size: the call sizes a run makes, the per-sample cost measured at each, and
    the UNet time of those calls (computed from the measured per-sample costs)."""
    rows = []
    for index in s.presets:
        for v in (s.args.view_batch_size, s.args.wide_view_batch_size):
            sizes = bm.planned_batch_sizes(s.expected(index, v), s.bench_args.steps, v)
            rows.append(dict(preset=index, view_batch_size=v, batch_sizes={str(k): c for k, c in sizes.items()},
                             per_sample_s={str(k): s.eager_costs.get(k) for k in sizes},
                             calls_floor_s=bm.calls_floor(sizes, s.eager_costs)))
    return rows


def without_warmup(args: argparse.Namespace) -> argparse.Namespace:
    args = copy.copy(args)
    args.warmup = False
    return args


def stage_low_vram(s: Session) -> dict:
    """No warm-up run: the table stage has run every kernel already; the model moves are part of each run."""
    presets = bm.parse_ints(s.args.low_vram_presets)
    sampler = s.sampler(view_batch_size=s.args.view_batch_size, low_vram=True)
    try:
        skipped = s.run_presets("low_vram", sampler, presets, without_warmup(s.bench_args), s.eager_costs)
    finally:
        sampler.set_low_vram(False)  # the shared modules back on the device for the next stages
    return dict(skipped_presets=skipped)


def stage_compile(s: Session) -> dict:
    """The first call compiles; the presets then run without a warm-up (the timed runs are checked to compile
    nothing: the batch dimension is dynamic, so other sizes need no new graph)."""
    built = s.models()
    sampler = s.sampler(view_batch_size=s.args.view_batch_size, compile_unet=True)
    first = bm.compile_first_call(sampler, s.presets[0], s.bench_args)
    s.report["compile"] = first
    s.write()
    v = s.args.view_batch_size
    graphs = bm.compiled_graphs()
    compiled_per_sample = bm.per_sample_costs(sampler.unet, [v], built["device"], built["dtype"],
                                              s.bench_args.floor_iters, warmup=1, known=s.compiled_costs,
                                              label="compiled UNet")[v]
    first["graphs_compiled_timing_the_unet"] = bm.compiled_graphs() - graphs
    if first["graphs_compiled_timing_the_unet"]:
        s.report["failures"].append(f"compile: timing the compiled UNet alone compiled "
                                    f"{first['graphs_compiled_timing_the_unet']} graph(s)")
    s.report["floor"]["compiled_per_sample_s"] = compiled_per_sample
    skipped = s.run_presets("compile", sampler, s.presets, without_warmup(s.bench_args), s.compiled_costs,
                            compiled_per_sample)
    return dict(first_call_s=first["first_call_s"], skipped_presets=skipped)


def stage_view_batch(s: Session) -> dict:
    """No warm-up run: the eager UNet and the VAE have run every kernel by now (new batch sizes compile nothing)."""
    args = without_warmup(s.bench_args)
    args.view_batch_size = s.args.wide_view_batch_size
    sampler = s.sampler(view_batch_size=args.view_batch_size)
    skipped = s.run_presets("view_batch", sampler, s.presets, args, s.eager_costs)
    return dict(skipped_presets=skipped)


def stage_sd3(s: Session) -> dict:
    """benchmarks/benchmark.py --model sd35m in this process: it builds, times and frees its own pipeline."""
    argv = ["--mode", s.args.mode, "--model", "sd35m", "--presets", s.args.sd3_presets, "--seed", str(s.args.seed),
            "--view_batch_size", str(s.args.view_batch_size), "--json", os.path.join(s.args.out, "sd3.json")]
    argv += (["--steps", "1", "--floor_batches", "2", "--no-warmup"] if s.tiny
             else ["--steps", "28", "--dtype", "bfloat16"])  # SD 3.5's own step count and dtype
    report = bm.main(argv)
    for result in report["results"]:
        s.add_result("sd3", result)
    s.report["sd3"] = {key: report.get(key) for key in ("card", "params_m", "build_s", "floor", "table")}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # bm.main's pipeline was freed when it returned
    return dict(all_checks_passed=report["all_checks_passed"])


def run_gpu_tests(s: Session, name: str, selection: str) -> dict:
    """tests/test_gpu.py in its own process (-k `selection`); outcomes and printed figures from its JUnit XML."""
    if s.built is not None and s.built["device"].type == "cuda":
        torch.cuda.empty_cache()  # the test process builds its own models
    xml = os.path.join(s.args.out, f"{name}.xml")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", "tests/test_gpu.py",
               "-k", selection, f"--junitxml={xml}", "-o", "junit_logging=system-out"]
    timeout = None if s.args.budget_s is None else max(30.0, s.remaining())
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    tic = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        output, returncode = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as stopped:
        output, returncode = (stopped.stdout or b"").decode(errors="replace") if isinstance(stopped.stdout, bytes) \
            else (stopped.stdout or ""), None
    print(output, flush=True)
    tests = junit_outcomes(xml) if os.path.exists(xml) else {}
    counts = {}
    for test in tests.values():
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    summary = dict(command=" ".join(command), returncode=returncode, seconds=time.monotonic() - tic, counts=counts,
                   tests=tests, timed_out=returncode is None)
    # pytest exits 5 when -k selects nothing; 0 with only skips: both are no failure of the code
    if returncode not in (0, 5) or not tests:
        s.report["failures"].append(f"{name}: pytest returned {returncode}, outcomes {counts}")
    s.report[name] = summary
    s.write()
    return dict(counts=counts, returncode=returncode)


def junit_outcomes(path: str) -> dict:
    """test name -> dict(outcome, seconds, message, output) from pytest's JUnit XML."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = node.get("message", "") or (node.text or "")[:2000]
                break
        out = case.find("system-out")
        outcomes[case.get("name")] = dict(outcome=outcome, seconds=float(case.get("time", 0)), message=message,
                                          output=(out.text or "").strip() if out is not None else "")
    return outcomes


STAGE_FUNCTIONS = dict(
    table=stage_table,
    tests=lambda s: run_gpu_tests(s, "tests", f"not {COMPILE_TEST}"),
    sd3=stage_sd3,
    low_vram=stage_low_vram,
    compile=stage_compile,
    tests_compile=lambda s: run_gpu_tests(s, "tests_compile", COMPILE_TEST),
    view_batch=stage_view_batch,
)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def environment() -> dict:
    """What the numbers were measured on: the card, the driver, the library versions."""
    import accelerate
    import diffusers
    import transformers

    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               diffusers=diffusers.__version__, transformers=transformers.__version__,
               accelerate=accelerate.__version__, cpu_count=os.cpu_count(), cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2 ** 30,
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   bf16_supported=torch.cuda.is_bf16_supported())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                                  "power.limit", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as error:
            env["nvidia_smi"] = f"not available: {error}"
    return env


def targets(report: dict) -> list[dict]:
    """The issue's targets against what was measured (only rows that were measured)."""
    rows = []
    for r in report["results"]:
        size = f"{r['width']}x{r['height']}"
        name = f"{r['stage']} {size}"
        if r["stage"] in ("table", "compile") and r.get("ratio") is not None:
            rows.append(dict(target=f"{name}: wall <= {TARGETS['ratio']} x eager floor", measured=r["ratio"],
                             limit=TARGETS["ratio"], met=r["ratio"] <= TARGETS["ratio"]))
        reference = r.get("reference_h200")
        if reference and r["stage"] in ("table", "compile"):
            speedup = reference["wall_s"] / r["wall_s"]
            rows.append(dict(target=f"{name}: >= {TARGETS['speedup_vs_reference']}x faster than the reference's "
                                    f"{reference['wall_s']} s", measured=speedup,
                             limit=TARGETS["speedup_vs_reference"], met=speedup >= TARGETS["speedup_vs_reference"]))
        if (r["width"], r["height"]) == (2048, 2048) and r.get("peak_memory_gib") is not None:
            key = "peak_2048_low_vram_gib" if r["low_vram"] else "peak_2048_gib"
            if r["stage"] in ("table", "low_vram"):
                rows.append(dict(target=f"{name}: peak <= {TARGETS[key]} GiB", measured=r["peak_memory_gib"],
                                 limit=TARGETS[key], met=r["peak_memory_gib"] <= TARGETS[key]))
    return rows


def summary_text(report: dict) -> str:
    lines = [f"card: {report.get('card', '-')}, {report.get('dtype', '-')}; " +
             ", ".join(f"{k} {v}" for k, v in report["environment"].items()
                       if k in ("torch", "cuda", "diffusers", "transformers"))]
    if report["results"]:
        lines.append(bm.markdown_table(report["results"], report.get("card", "-")))
    for label, floor in (("eager UNet floor", report.get("floor")), ("SD 3.5 Medium transformer floor (eager)",
                                                                   (report.get("sd3") or {}).get("floor"))):
        if floor:
            lines.append(f"{label}: {1000 * floor['best_per_sample_s']:.2f} ms/sample at batch {floor['best_batch']}")
    floor = report.get("floor") or {}
    compiled = report.get("compile")
    if compiled:
        per_sample = floor.get("compiled_per_sample_s")
        lines.append(f"compile: first call {compiled['first_call_s']:.1f} s (preset {compiled['preset']}, "
                     f"T={compiled['steps']}, {compiled['graphs_compiled']} graph(s)); compiled UNet "
                     + ("-" if per_sample is None else f"{1000 * per_sample:.2f}") + " ms/sample at batch v; "
                     + ", ".join(f"preset {r['preset']} wall / compiled floor {r['ratio_compiled']:.2f}"
                                 for r in report["results"] if r.get("ratio_compiled") is not None))
    for row in report.get("view_batch_comparison", []):
        shown = ", ".join(f"{k}: {'-' if c is None else f'{1000 * c:.2f}'}" for k, c in row["per_sample_s"].items())
        floor = "-" if row["calls_floor_s"] is None else f"{row['calls_floor_s']:.2f} s"
        lines.append(f"preset {row['preset']}, v={row['view_batch_size']}: calls {row['batch_sizes']}, "
                     f"ms/sample {{{shown}}}, UNet time of these calls {floor}")
    for name in ("tests", "tests_compile"):
        if name in report:
            t = report[name]
            lines.append(f"{name}: {t['counts']} (pytest returned {t['returncode']}, {t['seconds']:.0f} s)")
            for test, outcome in t["tests"].items():
                lines.append(f"  {outcome['outcome']:7s} {test}" + (f": {outcome['message'][:200]}"
                                                                    if outcome["outcome"] != "passed" else ""))
    for row in report.get("targets", []):
        lines.append(f"target {'met   ' if row['met'] else 'MISSED'} {row['target']}: {row['measured']:.2f}")
    for name, stage in report["stages"].items():
        if stage["status"] != "done":
            lines.append(f"stage {name}: {stage['status']}" + (f" ({stage['reason']})" if stage.get("reason") else ""))
    lines += [f"FAILURE: {f}" for f in report["failures"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.mode is None:
        args.mode = "gpu" if torch.cuda.is_available() else "tiny"
    stages = list(STAGES) if args.stages == "all" else [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = [name for name in stages if name not in STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)} or all")
    s = Session(args, argv)
    env = s.report["environment"]
    print(f"gpu_check {args.mode}: {env.get('gpu', 'no GPU')}, torch {env['torch']} (CUDA {env['cuda']}), diffusers "
          f"{env['diffusers']}, transformers {env['transformers']}; stages {', '.join(stages)}"
          + ("" if args.budget_s is None else f"; budget {args.budget_s:.0f} s"), flush=True)
    if env.get("nvidia_smi"):
        print(f"nvidia-smi: {env['nvidia_smi']}", flush=True)
    for name in stages:
        needed = s.estimate(name)
        if not s.fits(needed):
            s.report["stages"][name] = dict(status="skipped", reason=f"estimated {needed:.0f} s, {s.remaining():.0f} s left")
            print(f"== {name}: skipped ({s.report['stages'][name]['reason']})", flush=True)
            s.write()
            continue
        print(f"== {name} (at {s.elapsed():.0f} s)", flush=True)
        tic = time.monotonic()
        s.report["stages"][name] = dict(status="running")
        s.write()
        try:
            outcome = STAGE_FUNCTIONS[name](s)
            s.report["stages"][name] = dict(status="done", seconds=time.monotonic() - tic, **(outcome or {}))
        except Exception as error:  # one stage's failure must not lose the others' results
            import traceback

            traceback.print_exc()
            s.report["stages"][name] = dict(status="failed", seconds=time.monotonic() - tic,
                                            reason=f"{type(error).__name__}: {error}")
            s.report["failures"].append(f"stage {name}: {type(error).__name__}: {error}")
            if s.built is not None and s.built["device"].type == "cuda":
                torch.cuda.empty_cache()
        s.write()
    s.report["targets"] = targets(s.report) if args.mode == "gpu" else []  # tiny numbers mean nothing
    s.report["summary"] = summary_text(s.report)
    s.write()
    print(f"\n== summary ({s.elapsed():.0f} s; {s.path})\n{s.report['summary']}", flush=True)
    return s.report


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
