"""Batch jobs (`--prompts_file`, batch.py) on the tiny SD 1 model: files, seeds, resume, interruptions, several
processes under `accelerate launch`, bad input, the folder lock and the ControlNet command line."""
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

import batch
import elastic_diffusion as ed
import elastic_diffusion_w_controlnet as edc
from tiny_models import save_tiny_controlnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--steps", "2"]
# Six items: the native size, 2x wide with its own seed, below the native size, the first prompt again with
# another knob, repaint off, 2x both sides with a non-ASCII prompt.
JOB = [
    {"prompt": "a red fox", "width": 512, "height": 512},
    {"prompt": "a lighthouse at dusk", "width": 1024, "height": 512, "seed": 7},
    {"prompt": "mountains", "width": 256, "height": 512},
    {"prompt": "a red fox", "width": 512, "height": 512, "guidance_scale": 5},
    {"prompt": "a city", "width": 768, "height": 768, "negative_prompt": "", "repaint": False},
    {"prompt": "café ☕ at night", "width": 1024, "height": 1024, "resampling_steps": 1},
]
NAMES = ["00000_a-red-fox_seed0_0.png", "00001_a-lighthouse-at-dusk_seed7_0.png", "00002_mountains_seed2_0.png",
         "00003_a-red-fox_seed3_0.png", "00004_a-city_seed4_0.png", "00005_cafe-at-night_seed5_0.png"]


def write_jsonl(path, rows, comment=True):
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    if comment:
        lines.insert(2, "# blank lines and comments are skipped")
        lines.insert(3, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return os.fspath(path)


def manifest(folder):
    with open(os.path.join(folder, batch.MANIFEST), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def pngs(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".png"))


def pixels(path):
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


class UNetSamples:
    """Counts the native-size samples through every UNet of the process (a global forward hook); `then(count)` may
    act before a call (a test-controlled interruption)."""

    def __init__(self, then=None):
        self.samples, self.then = 0, then

    def __enter__(self):
        def hook(module, args):
            if isinstance(module, UNet2DConditionModel):
                if self.then is not None:
                    self.then(self.samples)
                self.samples += args[0].shape[0]

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run_job(model, prompts_file, outdir, *extra, cli=ed):
    return cli.main(["--sd_version", model, "--prompts_file", prompts_file, "--outdir", os.fspath(outdir),
                     "--device", "cpu", *STEPS, *extra])


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("job") / "prompts.jsonl", JOB)


@pytest.fixture(scope="module")
def baseline(tiny_sd1_path, job_file, tmp_path_factory):
    """The six-item job run once, uninterrupted, in this process: (folder, UNet samples counted, stdout)."""
    outdir = tmp_path_factory.mktemp("baseline") / "out"
    with UNetSamples() as unet:
        paths = run_job(tiny_sd1_path, job_file, outdir)
    return os.fspath(outdir), unet.samples, paths


def test_six_item_job_gives_pngs_of_the_right_sizes_and_a_manifest(baseline, tiny_sd1_path, job_file):
    outdir, samples, paths = baseline
    assert pngs(outdir) == NAMES and [os.path.basename(p) for p in paths] == NAMES
    assert not [n for n in os.listdir(outdir) if n.endswith(".part") or n.startswith("manifest.process")]
    records = manifest(outdir)
    assert [r["path"] for r in records] == NAMES and all(r["status"] == "ok" for r in records)
    assert [r["seed"] for r in records] == [0, 7, 2, 3, 4, 5]  # --seed (0) + index, or the line's own
    assert [r["line"] for r in records] == [1, 2, 5, 6, 7, 8]  # a comment and a blank line come before line 5
    native = ed.native_size(tiny_sd1_path)
    for row, record in zip(JOB, records):
        with Image.open(os.path.join(outdir, record["path"])) as image:
            assert image.size == (row["width"], row["height"])
            meta = json.loads(image.info["elastic_diffusion"])
        assert meta["prompt"] == row["prompt"] and meta["seed"] == record["seed"]
        assert meta["negative_prompt"] == row.get("negative_prompt", ed.DEFAULT_NEGATIVE_PROMPT)
        assert meta["guidance_scale"] == row.get("guidance_scale", 10.0) and meta["num_inference_steps"] == 2
        assert record["settings"] == {k: meta[k] for k in record["settings"]}
        knobs = {k: v for k, v in row.items() if k in {knob.name for knob in ed.method_knobs()}}
        settings = ed.settings_for(row["width"], row["height"], native.px, num_inference_steps=2, **knobs)
        assert record["unet_samples"] == ed.unet_cost(row["width"], row["height"], settings, native.latent).samples
    assert samples == sum(r["unet_samples"] for r in records)  # what ran is what the manifest says
    # What --resume expects of a PNG is what the real save path wrote (a field added to one but not the other
    # would make every rerun redo every image).
    args = ed.build_parser().parse_args(["--sd_version", tiny_sd1_path, "--prompts_file", job_file, *STEPS])
    defaults = {key: getattr(args, key) for key in (*batch.ITEM_KEYS[1:], "default_px")}
    items = batch.read_prompts_file(job_file, defaults, ed.knob_flags(args, native.latent))
    batch.plan(items, native)
    assert sorted(batch.done_items(items, outdir, tiny_sd1_path)) == list(range(len(JOB)))
    # Same prompt, size and settings but another index: another seed, another image.
    assert pixels(os.path.join(outdir, NAMES[0])) != pixels(os.path.join(outdir, NAMES[3]))


def test_a_batch_image_is_the_single_runs_image(baseline, tiny_sd1_path, tmp_path):
    """The batch and the single run share one generate+save path: item 1 equals the single run with its values."""
    outdir, _, _ = baseline
    (path,) = ed.main(["--sd_version", tiny_sd1_path, "--device", "cpu", "--outdir", os.fspath(tmp_path), *STEPS,
                       "--prompt", "a lighthouse at dusk", "--width", "1024", "--height", "512", "--seed", "7"])
    assert pixels(path) == pixels(os.path.join(outdir, NAMES[1]))
    with Image.open(path) as single, Image.open(os.path.join(outdir, NAMES[1])) as batched:
        assert single.info == batched.info  # the same metadata


def test_rerun_resumes_without_unet_work_and_redoes_only_what_changed(baseline, tiny_sd1_path, job_file, tmp_path,
                                                                      capsys):
    outdir = tmp_path / "out"
    shutil.copytree(baseline[0], outdir)
    before = {name: os.stat(outdir / name).st_mtime_ns for name in NAMES}
    records = manifest(outdir)
    with UNetSamples() as unet:  # --resume is on: the folder has a manifest; memory knobs never change an image
        run_job(tiny_sd1_path, job_file, outdir, "--view_batch_size", "3")
    assert unet.samples == 0 and manifest(outdir) == records
    assert "6 already done" in capsys.readouterr().out
    assert {name: os.stat(outdir / name).st_mtime_ns for name in NAMES} == before

    os.unlink(outdir / batch.MANIFEST)  # a lost manifest: --resume goes by the PNGs, and records them again
    with UNetSamples() as unet:
        run_job(tiny_sd1_path, job_file, outdir, "--resume")
    assert unet.samples == 0
    assert [(r["path"], r["status"], r["settings"], r["seconds"]) for r in manifest(outdir)] == \
        [(r["path"], "ok", r["settings"], None) for r in records]

    changed = [dict(row) for row in JOB]
    changed[1]["guidance_scale"] = 7.5  # same file names, other metadata: item 1 must be made again
    edited = write_jsonl(tmp_path / "edited.jsonl", changed)
    with UNetSamples() as unet:
        run_job(tiny_sd1_path, edited, outdir)
    redone = manifest(outdir)[1]
    assert unet.samples == redone["unet_samples"] == records[1]["unet_samples"] > 0
    assert redone["settings"]["guidance_scale"] == 7.5
    after = {name: os.stat(outdir / name).st_mtime_ns for name in NAMES}
    assert [name for name in NAMES if after[name] != before[name]] == [NAMES[1]]

    with UNetSamples() as unet:  # --no-resume makes everything again
        run_job(tiny_sd1_path, edited, outdir, "--no-resume")
    assert unet.samples == sum(r["unet_samples"] for r in records)


def test_a_png_found_again_replaces_an_error_record_of_its_item(tiny_sd1_path, tmp_path, capsys):
    """Job A makes item 1; the line is edited to a size the sampler refuses, so job B records item 1 as an error
    (A's PNG keeps its name: names do not depend on the settings); the edit is reverted, so job C finds A's PNG
    with matching metadata and skips the item: its manifest record must be `ok` again, and job C succeed."""
    outdir = tmp_path / "out"
    rows = [{"prompt": "one", "width": 256, "height": 256}, {"prompt": "two", "width": 256, "height": 256}]
    path = write_jsonl(tmp_path / "p.jsonl", rows, comment=False)
    run_job(tiny_sd1_path, path, outdir)  # job A
    made = manifest(outdir)
    assert [r["status"] for r in made] == ["ok", "ok"]

    write_jsonl(tmp_path / "p.jsonl", [rows[0], dict(rows[1], width=1020)], comment=False)
    with pytest.raises(SystemExit) as exit_info:  # job B
        run_job(tiny_sd1_path, path, outdir)
    assert exit_info.value.code == 1 and [r["status"] for r in manifest(outdir)] == ["ok", "error"]
    assert pngs(outdir) == [r["path"] for r in made]

    write_jsonl(tmp_path / "p.jsonl", rows, comment=False)
    capsys.readouterr()
    with UNetSamples() as unet:  # job C: exits 0
        run_job(tiny_sd1_path, path, outdir)
    assert unet.samples == 0 and "2 already done, 0 failed" in capsys.readouterr().out
    assert [(r["path"], r["status"], r["message"], r["settings"]) for r in manifest(outdir)] == \
        [(r["path"], "ok", None, r["settings"]) for r in made]


def test_a_job_stopped_after_item_3_resumes_to_the_same_files(baseline, tiny_sd1_path, job_file, tmp_path):
    """SIGTERM (what a scheduler sends) while item 4 is in flight: it is lost, nothing else; the rerun finishes
    the job with the files of an uninterrupted run, pixel for pixel."""
    outdir = tmp_path / "out"

    def stop_after_three_items(_):
        if len(pngs(outdir)) >= 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with UNetSamples(then=stop_after_three_items), pytest.raises(SystemExit) as stopped:
        run_job(tiny_sd1_path, job_file, outdir)
    assert stopped.value.code == 130
    assert pngs(outdir) == NAMES[:3] and not [n for n in os.listdir(outdir) if n.endswith(".part")]
    assert [r["path"] for r in manifest(outdir)] == NAMES[:3]
    with batch.folder_lock(os.fspath(outdir)):  # the lock was released
        pass

    (outdir / "tmpab12cd.png.part").write_bytes(b"\x89PNG")  # what a power loss mid-write would leave
    with UNetSamples() as unet:
        run_job(tiny_sd1_path, job_file, outdir)
    records = manifest(outdir)
    assert unet.samples == sum(r["unet_samples"] for r in records[3:])  # only the three left
    assert pngs(outdir) == pngs(baseline[0]) and not (outdir / "tmpab12cd.png.part").exists()
    for name in NAMES:
        assert pixels(outdir / name) == pixels(os.path.join(baseline[0], name))
    assert [{k: v for k, v in r.items() if k not in ("seconds", "process")} for r in records] == \
        [{k: v for k, v in r.items() if k not in ("seconds", "process")} for r in manifest(baseline[0])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_accelerate_launch_give_the_same_images(baseline, tiny_sd1_path, job_file, tmp_path):
    """`accelerate launch` with two CPU processes (torchrun underneath, the gloo backend): the single process's
    pixels, one merged manifest, and the cost-balanced split."""
    outdir = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # the threads of this process's baseline
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), os.path.join(ROOT, "elastic_diffusion.py"),
               "--sd_version", tiny_sd1_path, "--prompts_file", job_file, "--outdir", os.fspath(outdir),
               "--device", "cpu", *STEPS]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 items: 6 generated" in result.stdout and result.stdout.count("6 items:") == 1  # the main process
    assert pngs(outdir) == NAMES and sorted(os.listdir(outdir)) == sorted(NAMES + [batch.MANIFEST, batch.LOCK])
    for name in NAMES:
        assert pixels(outdir / name) == pixels(os.path.join(baseline[0], name))
    records = manifest(outdir)
    costs = [r["unet_samples"] for r in records]
    assert [r["path"] for r in records] == NAMES
    assert [r["process"] for r in records] == [0 if i in batch.split_by_cost(costs, 2)[0] else 1 for i in range(6)]
    assert {r["process"] for r in records} == {0, 1}


# Run after the script by `python -i`: which module objects hold each of the project's files, and which libraries.
LOADED = """import json, os, sys
ours = {}
for name, module in list(sys.modules.items()):
    loader = getattr(module, "__loader__", None)
    path = getattr(module, "__file__", None) or getattr(loader, "path", "")  # after -i, __main__ has no __file__
    if os.path.isabs(path) and os.path.dirname(path) == os.getcwd():
        ours.setdefault(os.path.basename(path), {}).setdefault(id(module), []).append(name)
print("LOADED", json.dumps({"ours": {f: sorted(map(sorted, m.values())) for f, m in ours.items()},
                            "gradio": "gradio" in sys.modules}))
"""


def loaded_after(argv: list[str]) -> dict:
    """What `python -i ARGV` (a script or `-c`) has in sys.modules at its end, as `LOADED` prints it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-i", *argv], input=f"exec({LOADED!r})\n", cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    line = [line for line in result.stdout.splitlines() if line.startswith("LOADED ")]
    assert line, result.stdout + result.stderr
    return json.loads(line[0][len("LOADED "):])


@pytest.mark.parametrize("script, example", [("elastic_diffusion.py", "prompts.jsonl"), ("batch.py", "prompts.txt"),
                                             ("elastic_diffusion_w_controlnet.py", "controlnet.jsonl")])
def test_a_prompts_file_run_loads_each_module_once(script, example, tmp_path):
    """The script runs as __main__ and batch.py imports the sampler by name: one module object, so one
    `ElasticDiffusion` class, in the process."""
    loaded = loaded_after([script, "--sd_version", "XL1.0", "--prompts_file", f"docs/examples/{example}",
                           "--outdir", os.fspath(tmp_path / "out"), "--dry_run"])["ours"]
    imported_as = [] if script == "batch.py" else [script[:-3]]  # nothing imports batch.py by name here
    modules = loaded.pop(script)
    assert len(modules) == 1, modules  # one module object (multiprocessing adds its alias __mp_main__)
    names = modules[0]
    assert {"__main__", *imported_as} <= set(names), names
    assert {"elastic_diffusion.py", "batch.py"} <= {*loaded, script}
    assert all(len(modules) == 1 for modules in loaded.values()), loaded  # every other file: one module


def test_the_sampler_imports_no_module_above_it():
    """Layers point down: each module, imported alone, loads only the modules below it (so no import cycle)."""
    below = {"elastic_diffusion": set(), "elastic_diffusion_w_controlnet": {"elastic_diffusion.py"},
             "batch": {"elastic_diffusion.py"}}
    for module, expected in below.items():
        loaded = loaded_after(["-c", f"import {module}"])
        assert set(loaded["ours"]) == expected | {f"{module}.py"} and not loaded["gradio"], (module, loaded)


def test_the_split_is_balanced_by_cost_not_by_count():
    native = ed.Native(1024, 8, "test")
    cost = {size: ed.unet_cost(*size, ed.recommended_settings(*size), native.latent).samples
            for size in [(2048, 2048), (2048, 1024), (1024, 1024)]}
    assert cost[(2048, 2048)] > 2 * cost[(2048, 1024)] > 20 * cost[(1024, 1024)]
    costs = [cost[(2048, 2048)], cost[(2048, 1024)], cost[(2048, 1024)], cost[(1024, 1024)], cost[(1024, 1024)]]
    parts = batch.split_by_cost(costs, 2)
    assert parts == [[0], [1, 2, 3, 4]]  # by count it would be 3 + 2 items, the 2048² with a 2048x1024
    loads = [sum(costs[i] for i in part) for part in parts]
    assert abs(loads[0] - loads[1]) < cost[(2048, 1024)] / 2
    many = [costs[i % 5] for i in range(40)]
    for n in (1, 3, 8):
        split = batch.split_by_cost(many, n)
        assert sorted(i for part in split for i in part) == list(range(40)) and split == batch.split_by_cost(many, n)
        loads = [sum(many[i] for i in part) for part in split]
        assert max(loads) - min(loads) <= max(many)


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c" "width": 512}\n', ":3: not valid JSON"),
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "steps": 4}\n', ":3: unknown key 'steps' (the knob is called "
                                                                       "'num_inference_steps')"),
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"promt": "c"}\n', ":3: unknown key 'promt' (did you mean 'prompt'?)"),
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"width": 512}\n', ":3: missing prompt"),
    ('{"prompt": "a"}\n{"prompt": "b"}\n["c"]\n', ":3: expected a JSON object"),
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "seed": -1}\n', ":3: seed must be between 0 and"),
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "view_batch_size": 2}\n', ":3: unknown key 'view_batch_size' "
                                                                                 "(view_batch_size is a memory"),
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "num_images": 0}\n', ":3: num_images must be"),
    ("# only a comment\n\n", ": no prompts"),
])
def test_a_bad_line_3_fails_before_any_model_is_loaded(tmp_path, monkeypatch, capsys, content, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(ed, "load_pipeline", no_loading)
    path = tmp_path / "prompts.jsonl"
    path.write_text(content, encoding="utf-8")
    for dry_run in (["--dry_run"], []):
        with pytest.raises(SystemExit) as exit_info:
            run_job("1.5", os.fspath(path), tmp_path / "out", *dry_run)
        assert exit_info.value.code == 2
        assert f"{path}{message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unreadable_or_misnamed_files_are_named(tmp_path, capsys):
    for path, message in [(tmp_path / "missing.jsonl", "cannot be read"), (tmp_path, "a prompts file is .txt"),
                          (tmp_path / "prompts.csv", "a prompts file is .txt")]:
        with pytest.raises(SystemExit) as exit_info:
            run_job("1.5", os.fspath(path), tmp_path / "out", "--dry_run")
        assert exit_info.value.code == 2 and f"{path}" in (err := capsys.readouterr().err) and message in err
    (tmp_path / "latin1.txt").write_bytes("a\ncaf\xe9\n# caf\xe9\n".encode("latin-1"))  # every bad line, numbered
    with pytest.raises(SystemExit):
        run_job("1.5", os.fspath(tmp_path / "latin1.txt"), tmp_path / "out", "--dry_run")
    err = capsys.readouterr().err
    assert err.count("latin1.txt:") == 2 and "latin1.txt:2: not UTF-8 text" in err and "latin1.txt:3: not" in err


def test_dry_run_checks_every_size_and_knob_and_prints_the_plan(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ed, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    rows = [{"prompt": "a", "width": 2048, "height": 2048}, {"prompt": "b", "width": 2048, "height": 1024},
            {"prompt": "c", "width": 1020}, {"prompt": "d", "new_p": 0}, {"prompt": "e", "width": 1024},
            {"prompt": "f", "patch_size": 200}]
    path = write_jsonl(tmp_path / "p.jsonl", rows, comment=False)
    with pytest.raises(SystemExit) as exit_info:
        run_job("XL1.0", path, tmp_path / "out", "--dry_run", "2", "--height", "1024")
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "3 items would be refused" in err
    assert f"{path}:3: width must be a multiple of 8" in out and f"{path}:4: new_p must be in (0, 1]" in out
    assert f"{path}:6: patch_size must be" in out and "native size 1024 px (from --sd_version XL1.0)" in out
    native = ed.Native(1024, 8, "")
    costs = [ed.unet_cost(w, h, dict(ed.recommended_settings(w, h), num_inference_steps=2), native.latent).samples
             for w, h in [(2048, 2048), (2048, 1024), (1024, 1024)]]  # run_job passes --steps 2
    assert f"process 0: 1 item, 1 image, {costs[0]:,} UNet samples" in out
    assert f"process 1: 2 items, 2 images, {costs[1] + costs[2]:,} UNet samples" in out
    assert f"total: 3 items, 3 images, {sum(costs):,} UNet samples" in out
    assert not (tmp_path / "out").exists()


def test_a_refused_item_is_recorded_and_the_job_goes_on(tiny_sd1_path, tmp_path, capsys):
    rows = [{"prompt": "one", "width": 256, "height": 256, "num_images": 2}, {"prompt": "two", "width": 1020},
            {"prompt": "three", "width": 256, "height": 256}, {"prompt": "four", "width": 512, "height": 1536}]
    path = write_jsonl(tmp_path / "p.jsonl", rows, comment=False)
    with pytest.raises(SystemExit) as exit_info:
        run_job(tiny_sd1_path, path, tmp_path / "out", "--height", "256")
    assert exit_info.value.code == 1
    assert pngs(tmp_path / "out") == ["00000_one_seed0_0.png", "00000_one_seed0_1.png", "00002_three_seed2_0.png"]
    records = manifest(tmp_path / "out")
    assert [(r["index"], r["image_index"], r["status"]) for r in records] == \
        [(0, 0, "ok"), (0, 1, "ok"), (1, 0, "error"), (2, 0, "ok"), (3, 0, "error")]
    assert "width must be a multiple of 8" in records[2]["message"]
    assert "height must be between 128 and 1024" in records[4]["message"]
    out = capsys.readouterr().out
    assert "4 items: 2 generated" in out and "2 failed" in out
    assert f"failed: {path}:2 (item 1): width must be a multiple of 8" in out


def readme_commands() -> list[list[str]]:
    """The commands of the README's "Many images" block, continuation lines joined, comments dropped."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- many images[^>]*-->\s*```bash\n(.*?)```", text, re.S).group(1)
    block = re.sub(r"\\\n\s*", "", block)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip() and
            not line.startswith("#")]


@pytest.mark.parametrize("example", ["prompts.jsonl", "prompts.txt", "controlnet.jsonl"])
def test_the_readme_commands_and_the_shipped_examples_pass_a_dry_run(example, tmp_path, monkeypatch, capsys):
    """Every README command, and each example file, checked and planned as written (their models are the hub's,
    so nothing runs: no model is loaded by --dry_run)."""
    monkeypatch.setattr(ed, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    commands = readme_commands()
    assert len(commands) == 4 and all("docs/examples/prompts.jsonl" in c for c in commands)
    script = "elastic_diffusion_w_controlnet.py" if example == "controlnet.jsonl" else "elastic_diffusion.py"
    monkeypatch.chdir(ROOT)
    for command in commands:
        processes = int(command[command.index("--num_processes") + 1]) if "--num_processes" in command else 1
        argv = command[command.index("elastic_diffusion.py") + 1:]
        argv[argv.index("--prompts_file") + 1] = f"docs/examples/{example}"
        argv[argv.index("--outdir") + 1] = os.fspath(tmp_path / "out")
        argv = [a for a in argv if a != "--dry_run"] + ["--dry_run", str(processes)]
        (edc if script.endswith("controlnet.py") else ed).main(argv)
        out = capsys.readouterr().out
        assert f"plan for {processes} process" in out and "refused" not in out
    assert not (tmp_path / "out").exists()


def test_a_second_job_on_the_same_folder_is_refused(tiny_sd1_path, job_file, tmp_path, capsys):
    outdir = tmp_path / "out"
    outdir.mkdir()
    with batch.folder_lock(os.fspath(outdir)):
        with UNetSamples() as unet, pytest.raises(SystemExit) as exit_info:
            run_job(tiny_sd1_path, job_file, outdir)
        assert exit_info.value.code == 1 and unet.samples == 0
        assert f"{outdir} is in use by another job (pid {os.getpid()} on" in capsys.readouterr().err
    assert pngs(outdir) == [] and not (outdir / batch.MANIFEST).exists()
    fd = os.open(outdir / batch.LOCK, os.O_RDWR)  # a refused job does not take the lock over
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


@pytest.mark.parametrize("case", ["dry run", "dry run with a refused item", "bad line", "busy folder"])
def test_every_way_out_of_a_job_ends_its_process_group(case, tmp_path, monkeypatch):
    """Under `accelerate launch` each process must leave the group however its job ends, not only after a job."""
    from accelerate import PartialState

    ended = []
    monkeypatch.setattr(PartialState, "destroy_process_group", lambda self, group=None: ended.append(group))
    monkeypatch.setattr(ed, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    rows = [{"prompt": "a"}, {"prompt": "b", "width": 1020} if "refused" in case else {"prompt": "b"}]
    if case == "bad line":
        rows[1] = {"promt": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", rows, comment=False)
    outdir = tmp_path / "out"
    outdir.mkdir()
    flags = ["--width", "512", "--height", "512", *(["--dry_run"] if "dry run" in case else [])]
    with batch.folder_lock(os.fspath(outdir)) if case == "busy folder" else contextlib.nullcontext():
        with contextlib.nullcontext() if case == "dry run" else pytest.raises(SystemExit) as exit_info:
            run_job("1.5", path, outdir, *flags)
    assert ended == [None]
    if case != "dry run":
        assert exit_info.value.code == (1 if case == "busy folder" else 2)


def test_an_image_on_disk_means_its_whole_request_was_saved(tmp_path, monkeypatch):
    """The ControlNet's condition map is written before the images: a job stopped between the two leaves no image,
    so --resume redoes the item instead of skipping it without its map."""
    def sampler(prompt, negative_prompt, **call):
        return [Image.new("RGB", (8, 8))] * 2, ed.GenerationInfo({}, call["seed"], "m")

    def stopped_while_saving_the_map(image, path, metadata):
        if path.endswith("_condition.png"):
            raise KeyboardInterrupt
        return save_png(image, path, metadata)

    save_png = ed.save_png
    monkeypatch.setattr(ed, "save_png", stopped_while_saving_the_map)
    with pytest.raises(KeyboardInterrupt):
        ed.generate_and_save(sampler, os.fspath(tmp_path / "00000_a_seed0"), "a", "", lambda info: [
            ("condition", Image.new("RGB", (8, 8)))], seed=0)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(ed, "save_png", save_png)
    paths, _ = ed.generate_and_save(sampler, os.fspath(tmp_path / "00000_a_seed0"), "a", "", lambda info: [
        ("condition", Image.new("RGB", (8, 8)))], seed=0)
    assert [os.path.basename(p) for p in paths] == ["00000_a_seed0_0.png", "00000_a_seed0_1.png",
                                                    "00000_a_seed0_condition.png"]


def test_the_manifest_is_replaced_atomically(tmp_path, monkeypatch):
    path = os.fspath(tmp_path / batch.MANIFEST)
    batch.write_manifest(path, {"a.png": {"path": "a.png", "status": "ok"}})
    old = open(path, encoding="utf-8").read()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        batch.write_manifest(path, {name: {"path": name, "status": "ok"} for name in "abcdef"})
    assert open(path, encoding="utf-8").read() == old and os.listdir(tmp_path) == [batch.MANIFEST]


def test_records_cut_by_a_power_loss_are_skipped_and_the_rest_kept(tmp_path):
    outdir = os.fspath(tmp_path)
    written = [{"path": "00000_a_seed0_0.png", "status": "ok"}, {"path": "00001_b_seed1_0.png", "status": "ok"}]
    batch.append_records(os.path.join(outdir, batch.PART.format(rank=1)), written)
    with open(os.path.join(outdir, batch.PART.format(rank=1)), "a", encoding="utf-8") as f:
        f.write('{"path": "00002_c_seed2_0.png", "sta')  # the power went off mid-write
    reader = batch.RecordReader(os.path.join(outdir, batch.PART.format(rank=1)))
    assert [r["path"] for r in reader.read()] == ["00000_a_seed0_0.png", "00001_b_seed1_0.png"] and reader.rest
    with contextlib.ExitStack() as held:  # the main process folds a stopped job's records into the manifest
        _, records, _ = batch.claim(outdir, [], "model", False, held)
    assert sorted(records) == ["00000_a_seed0_0.png", "00001_b_seed1_0.png"]
    assert [r["path"] for r in manifest(outdir)] == sorted(records) and not batch.part_paths(outdir)

    line = (json.dumps({"path": "00003_cafe_seed3_0.png", "prompt": "café ☕"}, ensure_ascii=False) + "\n").encode()
    cut = line.index("☕".encode()) + 1  # a reader may come while a line is half written, inside a character
    part = os.path.join(outdir, batch.PART.format(rank=0))
    reader = batch.RecordReader(part)
    with open(part, "ab") as f:
        f.write(line[:cut])
        f.flush()
        assert reader.read() == []
        f.write(line[cut:])
    assert reader.read() == [{"path": "00003_cafe_seed3_0.png", "prompt": "café ☕"}]


def test_the_main_process_waits_for_every_processs_records(tmp_path, monkeypatch):
    """The manifest is merged once every process's records are in, however late they come."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "mine"}, {"prompt": "theirs", "num_images": 2}], comment=False)
    defaults = dict(negative_prompt="", width=512, height=512, seed=0, num_images=1)
    items = batch.read_prompts_file(path, defaults, {"num_inference_steps": 2})
    batch.plan(items, ed.Native(512, 8, "test"))
    outdir = os.fspath(tmp_path / "out")
    os.makedirs(outdir)
    progress = batch.Progress(outdir, items, 2)  # the main process of two: an item for each process
    for rank, item in enumerate(items):
        records = batch.item_records(item, outdir, "model", rank, "ok", unet_samples=item.cost)
        part = os.path.join(outdir, batch.PART.format(rank=rank))
        threading.Timer(0.5 * rank, batch.append_records, (part, records)).start()
    monkeypatch.setattr(batch, "POLL_S", 0.05)
    progress.finish()
    assert [(r["path"], r["process"]) for r in manifest(outdir)] == \
        [("00000_mine_seed0_0.png", 0), ("00001_theirs_seed1_0.png", 1), ("00001_theirs_seed1_1.png", 1)]
    assert not batch.part_paths(outdir)


def test_the_progress_bar_counts_finished_and_failed_items(tmp_path):
    """The bar's text as records arrive: an item counts once it has a record, and as failed once one is an error."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "num_images": 2}, {"prompt": "c"}],
                       comment=False)
    items = batch.read_prompts_file(path, dict(negative_prompt="", width=512, height=512, seed=0, num_images=1),
                                    {"num_inference_steps": 2})
    batch.plan(items, ed.Native(512, 8, "test"))
    outdir = os.fspath(tmp_path)
    progress = batch.Progress(outdir, items, 2)
    texts = [progress.bar.desc]
    for rank, item, k, status in [(0, 0, 0, "ok"), (1, 1, 0, "ok"), (0, 2, 0, "error"), (1, 1, 1, "error")]:
        batch.append_records(os.path.join(outdir, batch.PART.format(rank=rank)),
                             [batch.item_records(items[item], outdir, "model", rank, status)[k]])
        progress.poll()
        progress.poll()  # a poll with nothing new changes nothing
        texts.append(progress.bar.desc)
    assert texts == ["0/3 items", "1/3 items", "2/3 items", "3/3 items, 1 failed", "3/3 items, 2 failed"]
    assert len(progress.records) == 4


def test_txt_files_lines_and_defaults(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\ufeffa photo of the dolomites\n\n# skipped\n  Envision a portrait of a cute corgi!  \n",
                    encoding="utf-8")
    defaults = dict(negative_prompt="blurry", width=1024, height=768, seed=10, num_images=2)
    items = batch.read_prompts_file(os.fspath(path), defaults, {"guidance_scale": None})
    assert [(i.index, i.line, i.prompt, i.seed, i.num_images) for i in items] == \
        [(0, 1, "a photo of the dolomites", 10, 2), (1, 4, "Envision a portrait of a cute corgi!", 11, 2)]
    assert items[1].stem("out") == os.path.join("out", "00001_envision-a-portrait-of-a-cute-corgi_seed11")
    assert batch.slug("x" * 50) == "x" * 40 and batch.slug("☕") == "prompt"


def test_native_size_without_loading(tiny_sd1_path, tiny_sdxl_path):
    assert ed.native_size("XL1.0").px == 1024 and ed.native_size("1.5").px == 512
    assert ed.native_size(tiny_sd1_path)[:2] == (512, 8) and ed.native_size(tiny_sdxl_path).px == 1024
    assert ed.native_size("XL1.0", 768).px == 768
    for bad, message in [(100, "--native_px must be a multiple of 8; got 100"),
                         (32, "--native_px must be >= 64; got 32"),
                         (64.0, "--native_px must be a whole number >= 64; got 64.0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ed.native_size("XL1.0", bad)
    with pytest.raises(ValueError, match="pass --native_px"):
        ed.native_size("nobody/not-in-the-cache")


def test_a_wrong_native_px_is_caught_when_the_model_loads(tiny_sd1_path, job_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_job(tiny_sd1_path, job_file, tmp_path / "out", "--native_px", "1024")
    assert exit_info.value.code == 2 and "pass --native_px 512" in capsys.readouterr().err
    assert pngs(tmp_path / "out") == []


@pytest.fixture(scope="module")
def sd1_controlnet(tiny_sd1_path, tmp_path_factory):
    return save_tiny_controlnet(tiny_sd1_path, tmp_path_factory.mktemp("controlnet_sd1"))


def test_controlnet_lines_name_their_own_condition_image(tiny_sd1_path, sd1_controlnet, tmp_path, capsys):
    images = tmp_path / "inputs"
    images.mkdir()
    shutil.copy(edc.DEFAULT_INPUT, images / "astronaut.jpg")
    stripes = np.zeros((256, 256, 3), np.uint8)
    stripes[:, ::32] = 255
    Image.fromarray(stripes).save(images / "stripes.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    rows = [{"prompt": "an astronaut", "condition_image": "inputs/astronaut.jpg"},
            {"prompt": "stripes", "condition_image": "inputs/stripes.png", "controlnet_conditioning_scale": 1.5},
            {"prompt": "broken", "condition_image": "inputs/broken.jpg"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows, comment=False)  # paths relative to the file's folder
    cli = ["--controlnet_model", sd1_controlnet, "--condition", "canny", "--width", "512", "--height", "256"]

    with pytest.raises(SystemExit) as exit_info:
        run_job(tiny_sd1_path, path, tmp_path / "out", *cli, "--dry_run", cli=edc)
    assert exit_info.value.code == 2
    assert f"{path}:3: condition_image: '{tmp_path}/inputs/broken.jpg' is not a readable image" in \
        capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        run_job(tiny_sd1_path, path, tmp_path / "out", *cli, cli=edc)
    assert exit_info.value.code == 1
    records = manifest(tmp_path / "out")
    assert [(r["index"], r["status"]) for r in records] == [(0, "ok"), (1, "ok"), (2, "error")]
    assert records[2]["message"].startswith("condition_image: ") and "not a readable image" in records[2]["message"]
    for record, row in zip(records[:2], rows):
        with Image.open(tmp_path / "out" / record["path"]) as image:
            meta = json.loads(image.info["elastic_diffusion"])
        assert meta["condition_image"] == os.path.join(tmp_path, row["condition_image"])
        assert meta["controlnet_conditioning_scale"] == row.get("controlnet_conditioning_scale", edc.DEMO_SCALE)
        assert (tmp_path / "out" / record["path"].replace("_0.png", "_condition.png")).is_file()
    assert pixels(tmp_path / "out" / records[0]["path"]) != pixels(tmp_path / "out" / records[1]["path"])

    with UNetSamples() as unet, pytest.raises(SystemExit):  # the two done items are skipped, the broken one fails
        run_job(tiny_sd1_path, path, tmp_path / "out", *cli, cli=edc)
    assert unet.samples == 0 and "2 already done, 1 failed" in capsys.readouterr().out


def test_a_job_mixing_text_and_image_lines_resumes(tiny_sd1_path, tmp_path, capsys):
    """Lines may start from an image (relative to the prompts file) with their own strength and upscale; the image's
    hash is part of the item's identity: an edited picture is made again, an unchanged job is skipped."""
    (tmp_path / "inputs").mkdir()
    picture = np.zeros((128, 192, 3), np.uint8)
    picture[:, :96] = (200, 40, 40)
    Image.fromarray(picture).save(tmp_path / "inputs" / "flag.png")
    rows = [{"prompt": "a fox", "width": 256, "height": 256},
            {"prompt": "a flag", "image": "inputs/flag.png", "upscale": 2, "strength": 0.5},
            {"prompt": "a flag, refined", "image": "inputs/flag.png", "width": 256, "height": 128}]
    job = write_jsonl(tmp_path / "job.jsonl", rows, comment=False)
    outdir = tmp_path / "out"
    with UNetSamples() as unet:
        paths = run_job(tiny_sd1_path, job, outdir)
    records = manifest(outdir)
    assert [r["status"] for r in records] == ["ok"] * 3 and unet.samples == sum(r["unet_samples"] for r in records)
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(256, 256), (384, 256), (256, 128)]  # the image's size times upscale, or the line's
    meta = [json.loads(Image.open(p).info["elastic_diffusion"]) for p in paths]
    assert "strength" not in meta[0] and (meta[1]["strength"], meta[1]["upscale"]) == (0.5, 2)
    assert meta[2]["strength"] == ed.DEFAULT_STRENGTH and meta[1]["image_hash"] == meta[2]["image_hash"]
    assert str(tmp_path) not in json.dumps(meta)  # the picture by its hash, never its path
    # Half the steps: the cost model's count at strength 0.5, and fewer samples than the text-to-image run.
    native = ed.native_size(tiny_sd1_path)
    settings = ed.settings_for(384, 256, native.px, num_inference_steps=2)
    assert records[1]["unet_samples"] == ed.unet_cost(384, 256, settings, native.latent, strength=0.5).samples
    with UNetSamples() as unet:
        run_job(tiny_sd1_path, job, outdir)
    assert unet.samples == 0 and "3 already done" in capsys.readouterr().out
    picture[:, 96:] = (40, 40, 200)  # the same file name, another picture: both image items are made again
    Image.fromarray(picture).save(tmp_path / "inputs" / "flag.png")
    with UNetSamples() as unet:
        run_job(tiny_sd1_path, job, outdir)
    assert unet.samples == records[1]["unet_samples"] + records[2]["unet_samples"]
    assert "1 already done" in capsys.readouterr().out


def test_strength_without_an_image_is_refused_by_line(tiny_sd1_path, tmp_path, capsys):
    job = write_jsonl(tmp_path / "job.jsonl", [{"prompt": "a fox", "width": 256, "height": 256, "strength": 0.3}],
                      comment=False)
    with pytest.raises(SystemExit):
        run_job(tiny_sd1_path, job, tmp_path / "out", "--dry_run")
    assert "job.jsonl:1: strength and upscale go with image" in capsys.readouterr().out
