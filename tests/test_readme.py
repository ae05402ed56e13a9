"""The README's Python quick start runs as written (docs/method.md#fix-readme-keyword), with a tiny model in place
of SDXL; its numbers and its knob table match what the project measured and the knobs table."""
import os
import re
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
sys.path.insert(0, os.path.dirname(README))  # `python tests/test_readme.py` from anywhere

import elastic_diffusion as ed  # noqa: E402


def quickstart_code() -> str:
    text = open(README, encoding="utf-8").read()
    match = re.search(r"<!-- quickstart[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its quick-start block"
    return match.group(1)


def test_readme_quickstart_runs(tiny_sdxl_path, tmp_path, monkeypatch):
    code = quickstart_code()
    assert "sd_version='XL1.0'" in code and "drop_p=0.7" in code
    assert "device" not in re.sub(r"#.*", "", code)  # the sampler picks cuda, mps or the CPU: it runs anywhere
    assert f'negative_prompt = "{ed.DEFAULT_NEGATIVE_PROMPT}"' in code  # the command line's default
    code = (code.replace("sd_version='XL1.0'", f"sd_version={tiny_sdxl_path!r}")
                .replace("num_inference_steps=50", "num_inference_steps=2"))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    images, info = namespace["images"], namespace["verbose_info"]
    assert images[0].size == (2048, 1024)
    assert info["settings"]["new_p"] == 0.3 and info["settings"]["resampling_steps"] == 7
    assert (tmp_path / "ostrich.png").is_file()


KNOBS_BEGIN = "<!-- knobs table: checked against elastic_diffusion.KNOBS by tests/test_readme.py, which prints it -->"
KNOBS_END = "<!-- end of the knobs table -->"


# The paper's symbols of the knobs that have one (docs/method.md#notation).
SYMBOLS = dict(num_inference_steps="T", guidance_scale="ω", resampling_steps="R", new_p="ρ", rrg_init_weight="λ0",
               cosine_scale="κ", patch_size="p")


def knob_table() -> str:
    """The README's knob table, one line per row of `elastic_diffusion.KNOBS`."""
    lines = ["| knob | meaning | default | sampler accepts (demos accept) |", "|---|---|---|---|"]
    for k in ed.KNOBS:
        symbol = SYMBOLS.get(k.name)
        name = f"`{k.name}`" + (f" ({symbol})" if symbol else "") + (", *memory*" if k.memory else "")
        if k.type is bool:
            default, allowed = ("on" if k.default else "off"), "on or off"
        elif k.choices:
            default, allowed = ed.format_number(k.default), " or ".join(ed.format_number(c) for c in k.choices)
        else:
            default = k.preset if k.default == ed.PRESET else ed.format_number(k.default)
            low, high = ("D" if v == ed.NATIVE_LATENT else v for v in (k.minimum, k.maximum))
            rule = ed.describe_range(low, high, k.open_minimum, k.open_maximum)
            allowed = f"{'whole numbers' if k.type is int else 'numbers'} {rule}" if rule else "any finite number"
            if k.demo_range:
                allowed += f" ({ed.describe_range(*('D' if v == ed.NATIVE_LATENT else v for v in k.demo_range))})"
        lines.append(f"| {name} | {k.help} | {default} | {allowed} |")
    return "\n".join(lines)


def test_readme_knob_table_is_the_knobs_table():
    """Checked, not generated at run time: after a change to KNOBS, paste `python tests/test_readme.py`'s output."""
    text = open(README, encoding="utf-8").read()
    assert KNOBS_BEGIN in text and KNOBS_END in text, "README lost its knob-table markers"
    table = text.split(KNOBS_BEGIN, 1)[1].split(KNOBS_END, 1)[0].strip()
    assert table == knob_table(), "README's knob table differs from KNOBS: run `python tests/test_readme.py`"


def test_readme_documents_every_knob():
    text = open(README, encoding="utf-8").read()
    for row in ed.KNOBS:
        assert f"`{row.name}`" in text, row.name


def _front_matter() -> str:
    text = open(README, encoding="utf-8").read()
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README lost its Spaces front matter"
    return match.group(1)


def test_download_size_is_the_fp16_parameter_count(tmp_path):
    """The set-up section's numbers come from the real SDXL architectures (built empty, benchmarks/benchmark.py):
    parameters in billions, and 2 (fp16 files) or 4 (full fp32 files) bytes each, in GB."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", os.path.join(os.path.dirname(README),
                                                                                  "benchmarks", "benchmark.py"))
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    parameters = sum(bm.count_params(m) for m in bm.build_empty_components("sdxl").values())
    text = " ".join(open(README, encoding="utf-8").read().split())
    assert f"{parameters / 1e9:.2f} billion parameters at 2 bytes, about {round(2 * parameters / 1e9)} GB" in text
    assert f"full files, about {round(4 * parameters / 1e9)} GB" in text


def test_space_preloads_only_what_a_half_precision_load_reads(tmp_path):
    """preload_from_hub names, for the demo's default model, model_index.json and per component its config and
    its fp16 weight file (the files `load_pipeline` reads for fp16, see test_sampler), plus the CLIP tokenizer
    files: no full-precision weights, nothing of the repository's other folders."""
    from tiny_models import build_tiny_pipeline

    import app_gradio

    (entry,) = re.findall(r"preload_from_hub:\n((?:  - .*\n?)+)", _front_matter() + "\n")
    (line,) = entry.strip().splitlines()
    repo, files = line.strip().removeprefix("- ").split()
    assert repo == ed.MODEL_IDS.get(app_gradio.DEFAULT_MODEL, app_gradio.DEFAULT_MODEL)
    listed = set(files.split(","))
    build_tiny_pipeline("sdxl").save_pretrained(tmp_path, variant="fp16")  # the same layout and file names
    weights = {os.path.relpath(os.path.join(folder, name), tmp_path) for folder, _, names in os.walk(tmp_path)
               for name in names if name.endswith(".safetensors")}
    assert weights and all(".fp16." in name for name in weights)
    assert {name for name in listed if name.endswith(".safetensors")} == weights
    components = {name for name in os.listdir(tmp_path) if os.path.isdir(tmp_path / name)}
    configs = {f"{c}/scheduler_config.json" if c == "scheduler" else f"{c}/config.json"
               for c in components if not c.startswith("tokenizer")}
    tokenizer_files = {f"{c}/{f}" for c in components if c.startswith("tokenizer")
                       for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")}
    assert listed == {"model_index.json"} | weights | configs | tokenizer_files


def test_torch_floor_is_the_tested_version():
    root = os.path.dirname(README)
    runtime = open(os.path.join(root, "requirements.txt"), encoding="utf-8").read()
    dev = open(os.path.join(root, "requirements-dev.txt"), encoding="utf-8").read()
    (floor,) = re.findall(r"^torch>=([\d.]+)", runtime, re.M)
    (pinned,) = re.findall(r"^torch==([\d.]+)", dev, re.M)
    assert pinned.startswith(floor + ".") or pinned == floor
    assert f"`torch>={floor}`" in open(README, encoding="utf-8").read()


def test_test_time_is_the_measured_one():
    """The README's and docs/testing.md's suite time is the one docs/testing.md records as measured."""
    testing = open(os.path.join(os.path.dirname(README), "docs", "testing.md"), encoding="utf-8").read()
    testing = " ".join(testing.split())
    (minutes,) = re.findall(r"took (\d+) minutes", testing)
    assert f"about {minutes} minutes on 2 cores" in " ".join(open(README, encoding="utf-8").read().split())


if __name__ == "__main__":
    print(KNOBS_BEGIN, knob_table(), KNOBS_END, sep="\n\n")
