"""The Replicate / cog entry points (`predict.py`, `predict_controlnet.py`, `cog.yaml`, `cog-controlnet.yaml`).

The predictors run as cog runs them, on a tiny random SDXL (MODEL=<folder>): `setup()` once, then `predict()`
with the inputs cog would pass, and once through cog's own HTTP server (coglet). Their input schemas are read
with cog's own inspector and checked against the knobs tables. No container is built: there is no container
runtime here (docs/replicate.md says what was and was not run).

cog reads `predict()`'s inputs from the source text, so their lines are literals, checked rather than generated
at run time: after a change to a knobs table, `python tests/test_cog.py` prints the lines to paste.
"""
import ast
import base64
import inspect
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python tests/test_cog.py` from anywhere

import elastic_diffusion as ed  # noqa: E402
from elastic_diffusion_w_controlnet import CONTROLNET_KNOBS, DEMO_SCALE  # noqa: E402

SDXL_LATENT = 128  # the default model's native latent size: the schema's bound for knobs up to it
ENTRIES = {"predict.py": "cog.yaml", "predict_controlnet.py": "cog-controlnet.yaml"}  # each entry and its config
BLOCKS = {  # (first line, last line) of the rendered blocks, the knobs in them and their defaults
    "method": ("        # Method knobs: rendered from elastic_diffusion.KNOBS by `python tests/test_cog.py` "
               "(tests/test_cog.py checks).", "        # End of the method knobs.", ed.method_knobs(), {}),
    "controlnet": ("        # ControlNet knobs: rendered from elastic_diffusion_w_controlnet.CONTROLNET_KNOBS by "
                   "`python tests/test_cog.py`.", "        # End of the ControlNet knobs.", CONTROLNET_KNOBS,
                   {"controlnet_conditioning_scale": DEMO_SCALE}),  # the CLI's and the demo's default
}
FAST = dict(num_inference_steps=2)
PHOTO = os.path.join(ROOT, "imgs", "input", "astronaut.jpg")


# --------------------------------------------------------------------------------------------------
# The knobs' Input lines, rendered from the tables
# --------------------------------------------------------------------------------------------------


def _literal(value) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def knob_description(row: ed.Knob) -> str:
    """The Input description of a knob: its help line, how a blank value is filled, the model-dependent bound."""
    text = row.help[:1].upper() + row.help[1:] + "."
    if row.default == ed.PRESET:
        text += f" Leave blank for the preset: {row.preset}."
    if ed.NATIVE_LATENT in (row.maximum, *(row.demo_range or ())):
        text += f" At most the model's native latent size ({SDXL_LATENT} on SDXL)."
    return text


def knob_line(row: ed.Knob, default=None) -> str:
    """One predict() parameter: the demo's range (it bounds a stranger's GPU time), None for a preset default."""
    default = row.default if default is None else default
    preset = default == ed.PRESET
    kind = f"Optional[{row.type.__name__}]" if preset else row.type.__name__
    args = [f"default={_literal(None if preset else default)}"]
    if row.choices:
        args.append(f"choices={list(row.choices)!r}")
    elif row.type is not bool:
        low, high = row.limits(SDXL_LATENT, demo=True)
        args += [f"ge={low!r}", f"le={high!r}"]
    args.append(f"description={_literal(knob_description(row))}")
    return f"        {row.name}: {kind} = Input({', '.join(args)}),"


def rendered_block(name: str) -> str:
    first, last, knobs, defaults = BLOCKS[name]
    return "\n".join([first, *(knob_line(row, defaults.get(row.name)) for row in knobs), last])


def source(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("path, blocks", [("predict.py", ["method"]),
                                          ("predict_controlnet.py", ["method", "controlnet"])])
def test_knob_inputs_are_the_knobs_tables(path, blocks):
    """Every knob's Input line is the one rendered from its table: after a change, paste `python tests/test_cog.py`."""
    text = source(path)
    for name in blocks:
        first, last = BLOCKS[name][:2]
        assert first in text and last in text, f"{path} lost its {name} knob markers"
        block = first + text.split(first, 1)[1].split(last, 1)[0] + last
        assert block == rendered_block(name), f"{path}: {name} knobs differ from the table: run tests/test_cog.py"


def predict_parameters(path: str) -> dict[str, ast.arg]:
    """predict()'s parameters of the file's Predictor, by name, with their defaults attached as `.default`."""
    tree = ast.parse(source(path))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Predictor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "predict")
    args = fn.args.args[1:]
    defaults = [None] * (len(args) - len(fn.args.defaults)) + fn.args.defaults
    for arg, default in zip(args, defaults):
        arg.default = default
    return {arg.arg: arg for arg in args}


def _is_literal(node) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.List):
        return all(isinstance(item, ast.Constant) for item in node.elts)
    return isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)


@pytest.mark.parametrize("path", sorted(ENTRIES))
def test_inputs_are_literals_for_cogs_static_parser(path):
    """`cog predict` and `cog serve` read the inputs from the text without running it: a computed bound, default or
    choice would silently vanish from the schema, so every Input argument is a literal."""
    for name, arg in predict_parameters(path).items():
        call = arg.default
        assert isinstance(call, ast.Call) and call.func.id == "Input" and not call.args, name
        for keyword in call.keywords:
            assert _is_literal(keyword.value), f"{path}: {name}'s {keyword.arg} is not a literal"
        assert re.fullmatch(r"(Optional\[)?(str|int|float|bool|Path)\]?", ast.unparse(arg.annotation)), name


def test_the_two_entries_declare_their_shared_inputs_identically():
    text, control_text = source("predict.py"), source("predict_controlnet.py")
    plain, control = predict_parameters("predict.py"), predict_parameters("predict_controlnet.py")
    shared = [name for name in plain if name not in ("prompt", "image")]  # the ControlNet's are required
    assert set(shared) <= set(control)
    for name in shared:
        declared = ast.get_source_segment(text, plain[name]) + ast.get_source_segment(text, plain[name].default)
        assert declared == (ast.get_source_segment(control_text, control[name])
                            + ast.get_source_segment(control_text, control[name].default)), name
    assert [n for n in control if n in shared] == shared  # and in the same order


# --------------------------------------------------------------------------------------------------
# cog.yaml and the schema cog reads
# --------------------------------------------------------------------------------------------------


def test_the_entries_load_neither_gradio_nor_the_demos():
    """A Replicate container needs the sampler, not the demo: importing both entries loads no Gradio module."""
    code = ("import sys, predict, predict_controlnet; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('gradio', 'app_gradio', 'app_gradio_img2img')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_cog_yaml_files_parse_and_install_requirements_txt():
    configs = {entry: yaml.safe_load(source(config)) for entry, config in ENTRIES.items()}
    builds = [config["build"] for config in configs.values()]
    assert all(build == builds[0] for build in builds), "the two cog.yaml files must build the same image"
    build = builds[0]
    # One list of runtime requirements: the file `make run` installs, not a copy (python_packages) that drifts.
    assert build["python_requirements"] == "requirements.txt" and "python_packages" not in build
    assert build["gpu"] is True and re.fullmatch(r"\d+\.\d+", build["cuda"])
    assert build["python_version"] == "3.11"  # the version the suite runs with
    for entry, config in configs.items():
        assert config["predict"] == f"{entry}:Predictor"
    assert "torch" in {re.split(r"[<>=!~; \[]", line, 1)[0] for line in source("requirements.txt").splitlines()
                       if line.strip() and not line.startswith("#")}


def cog_schema(module: str):
    """The inputs and output as cog's runtime schema path reads them (the one `cog build` runs in the image)."""
    from cog import _adt, _inspector

    with pytest.warns(DeprecationWarning):  # cog >= 0.17 names them BaseRunner/run; both spellings are served
        info = _inspector.create_predictor(module, "Predictor")
    assert info.output.kind is _adt.OutputKind.LIST and info.output.type is _adt.PrimitiveType.PATH
    return info.inputs


def check_knob_inputs(inputs: dict, knobs, defaults: dict) -> None:
    from cog import _adt

    for row in knobs:
        field = inputs[row.name]
        default = defaults.get(row.name, row.default)
        optional = field.type.repetition is _adt.Repetition.OPTIONAL
        assert optional == (default == ed.PRESET), row.name  # blank means "the preset for this size"
        assert field.default == (None if default == ed.PRESET else default), row.name
        assert field.description.startswith(row.help[:1].upper() + row.help[1:]), row.name
        if row.type is bool:
            assert field.type.primitive is _adt.PrimitiveType.BOOL and field.ge is None and field.le is None
        elif row.choices:
            assert field.choices == list(row.choices) and field.ge is None, row.name
        else:
            assert (field.ge, field.le) == tuple(float(v) for v in row.limits(SDXL_LATENT, demo=True)), row.name
            kind = _adt.PrimitiveType.INTEGER if row.type is int else _adt.PrimitiveType.FLOAT
            assert field.type.primitive is kind and field.choices is None, row.name


def test_schema_has_one_input_per_method_knob():
    import predict

    inputs = cog_schema("predict")
    knobs = [row.name for row in ed.method_knobs()]
    assert [name for name in inputs if name in {k.name for k in ed.KNOBS}] == knobs  # no memory knob, table order
    check_knob_inputs(inputs, ed.method_knobs(), {})
    for side in ("width", "height"):
        assert (inputs[side].ge, inputs[side].le) == (ed.MIN_SIDE_PX, ed.MAX_SCALE * 8 * SDXL_LATENT)
    assert (inputs["seed"].ge, inputs["seed"].le, inputs["seed"].default) == (0, ed.MAX_SEED, None)
    assert (inputs["num_outputs"].ge, inputs["num_outputs"].le) == (1, predict.MAX_OUTPUTS)
    assert inputs["negative_prompt"].default == ed.DEFAULT_NEGATIVE_PROMPT
    assert inputs["prompt"].default in {p["prompt"] for p in ed.DEMO_PRESETS}
    assert inputs["output_format"].choices == ["png", "webp"]


def test_controlnet_schema_adds_the_image_and_the_controlnet_knobs():
    inputs = cog_schema("predict_controlnet")
    check_knob_inputs(inputs, ed.method_knobs(), {})
    check_knob_inputs(inputs, CONTROLNET_KNOBS, BLOCKS["controlnet"][3])
    assert inputs["image"].default is None and inputs["prompt"].default is None  # both required
    assert inputs["controlnet"].choices == ["canny", "depth"]


# --------------------------------------------------------------------------------------------------
# The predictors on a tiny model
# --------------------------------------------------------------------------------------------------


def defaults(predictor) -> dict:
    """What cog passes for inputs left out: each Input's default."""
    return {name: p.default.default for name, p in inspect.signature(predictor.predict).parameters.items()}


def run(predictor, **inputs):
    return predictor.predict(**{**defaults(predictor), **FAST, **inputs})


def record(path) -> dict:
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text["elastic_diffusion"])


@pytest.fixture(scope="module")
def predictor(tiny_sdxl_path):
    import predict

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODEL", tiny_sdxl_path)
        p = predict.Predictor()
        p.setup()
    return p


def test_predict_returns_the_images_with_their_settings(predictor, tiny_sdxl_path, capsys):
    from cog import Path
    from PIL import Image

    paths = run(predictor, width=1280, height=1024, seed=7, num_outputs=2, guidance_scale=7.5)
    assert len(paths) == 2 and all(isinstance(p, Path) for p in paths)
    assert [p.name for p in paths] == ["elastic_seed7_1280x1024_0.png", "elastic_seed7_1280x1024_1.png"]
    assert "Using seed: 7" in capsys.readouterr().out
    expected = ed.recommended_settings(1280, 1024, 1024)  # above the native size: R = 7, RRG on
    expected.update(FAST, guidance_scale=7.5)
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (1280, 1024)
            text = image.text["elastic_diffusion"] + image.text["parameters"]
        meta = record(path)
        assert (meta["seed"], meta["image_index"], meta["width"], meta["height"]) == (7, index, 1280, 1024)
        assert {k: meta[k] for k in expected} == expected and expected["resampling_steps"] == 7
        assert meta["prompt"] == defaults(predictor)["prompt"]
        assert meta["model"] == os.path.basename(tiny_sdxl_path)  # the folder's name, not the server path
        assert os.path.dirname(tiny_sdxl_path) not in text and "/tmp" not in text


def test_a_blank_seed_is_drawn_echoed_and_reproducible(predictor, capsys):
    import numpy as np
    from PIL import Image

    first = run(predictor, width=512, height=512, seed=None)
    seed = int(re.search(r"Using seed: (\d+)", capsys.readouterr().out).group(1))
    assert 0 <= seed <= 2 ** 32 - 1 and record(first[0])["seed"] == seed and f"_seed{seed}_" in first[0].name
    pixels = np.asarray(Image.open(first[0]))
    again = run(predictor, width=512, height=512, seed=seed)
    assert np.array_equal(np.asarray(Image.open(again[0])), pixels)


def test_webp_keeps_the_settings_in_exif(predictor):
    import numpy as np
    from PIL import ExifTags, Image

    png = run(predictor, width=512, height=256, seed=3)
    png_record, png_pixels = record(png[0]), np.asarray(Image.open(png[0]))
    with Image.open(png[0]) as image:
        parameters = image.text["parameters"]
    webp = run(predictor, width=512, height=256, seed=3, output_format="webp", output_quality=100)
    assert webp[0].name == "elastic_seed3_512x256_0.webp"
    with Image.open(webp[0]) as image:
        exif = image.getexif()
        comment = exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        assert image.format == "WEBP" and np.array_equal(np.asarray(image.convert("RGB")), png_pixels)  # lossless
    assert json.loads(exif[ExifTags.Base.ImageDescription]) == png_record
    assert comment[:8] == b"UNICODE\x00" and comment[8:].decode("utf-16-be") == parameters
    lossless_size = os.path.getsize(webp[0])
    lossy = run(predictor, width=512, height=256, seed=3, output_format="webp", output_quality=50)
    assert os.path.getsize(lossy[0]) < lossless_size


BAD_INPUTS = [
    (dict(width=1001), "width must be a multiple of 8"),
    (dict(height=4096), "height must be between 128 and 2048 pixels"),  # the sampler's check_size
    (dict(width=64), "width must be at least 128 pixels"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(prompt="x" * 1001), "prompt is 1001 characters long"),
    (dict(seed=-1), "seed must be between 0 and 4294967295; got -1"),
    (dict(seed=2 ** 32), "seed must be between 0 and 4294967295"),
    (dict(num_outputs=0), "num_outputs must be between 1 and 4; got 0"),
    (dict(num_outputs=5), "num_outputs must be between 1 and 4; got 5"),
    (dict(output_format="gif"), "output_format must be png or webp; got 'gif'"),
    (dict(output_quality=0), "output_quality must be between 1 and 100"),
    (dict(num_inference_steps=0), "num_inference_steps must be between 1 and 150; got 0"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be a whole number"),
    (dict(guidance_scale=31.0), "guidance_scale must be between 1 and 30"),
    (dict(new_p=0.0), "new_p must be between 0.05 and 1"),
    (dict(resampling_steps=41), "resampling_steps must be between 0 and 40"),
    (dict(rrg_init_weight=-1.0), "rrg_init_weight must be between 0 and 10000"),
    (dict(patch_size=129), "patch_size must be between 8 and 128"),
    (dict(repaint="yes"), "repaint must be true or false"),
    (dict(time_ids_scale=2), "time_ids_scale must be 1 or 4; got 2"),
    (dict(strength=0.5), "strength goes with image"),
    (dict(image=__file__), "image: 'test_cog.py' is not a readable image file"),  # by its name, not its path
    (dict(image=PHOTO, strength=1.5), "strength must be between 0 and 1; got 1.5"),
]


@pytest.mark.parametrize("bad, message", BAD_INPUTS, ids=[next(iter(b)) + "=" + str(next(iter(b.values())))[:12]
                                                         for b, _ in BAD_INPUTS])
def test_bad_inputs_are_refused_by_name(predictor, bad, message):
    before = sorted(os.listdir(predictor.output_root))
    with pytest.raises(ValueError) as refused:
        run(predictor, **bad)
    assert message in str(refused.value)
    assert sorted(os.listdir(predictor.output_root)) == before  # nothing written, nothing removed


def test_predict_refines_an_image(predictor):
    paths = run(predictor, image=PHOTO, strength=0.5, width=512, height=768, seed=4)
    meta = record(paths[0])
    assert (meta["width"], meta["height"], meta["strength"], meta["upscale"]) == (512, 768, 0.5, 1)
    assert len(meta["image_hash"]) == 16 and ROOT not in json.dumps(meta)
    blank = record(run(predictor, image=PHOTO, width=512, height=512, seed=4)[0])
    assert blank["strength"] == ed.DEFAULT_STRENGTH


def test_controlnet_predict_can_start_from_its_image(controlnet_predictor):
    meta = record(run(controlnet_predictor, image=PHOTO, prompt="an astronaut", strength=0.3, width=512, height=512,
                      seed=4)[0])
    assert meta["strength"] == 0.3 and meta["condition"] == "canny" and meta["condition_image"] == "astronaut.jpg"


def test_the_next_request_works_after_an_error_and_only_the_latest_files_stay(predictor):
    first = run(predictor, width=512, height=512, seed=1)
    with pytest.raises(ValueError):
        run(predictor, width=1001)
    second = run(predictor, width=512, height=512, seed=2)
    assert second[0].is_file() and record(second[0])["seed"] == 2
    assert not first[0].exists()  # sent by cog by now: removed when the next prediction starts
    assert os.listdir(predictor.output_root) == [second[0].parent.name]


def test_out_of_memory_is_an_error_with_advice(predictor, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(predictor.sampler, "sample", out_of_memory)
    with pytest.raises(RuntimeError, match="try fewer num_outputs, tiled_decoder=true or a smaller width/height"):
        run(predictor, width=512, height=512)
    monkeypatch.undo()
    assert len(run(predictor, width=512, height=512)) == 1


# --------------------------------------------------------------------------------------------------
# The ControlNet entry
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet_predictor(tiny_sdxl_path, tmp_path_factory):
    import predict_controlnet
    from tiny_models import save_tiny_controlnet, save_tiny_depth_model

    controlnet = save_tiny_controlnet(tiny_sdxl_path, tmp_path_factory.mktemp("controlnet"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODEL", tiny_sdxl_path)
        patch.setenv("CONTROLNET_CANNY", controlnet)
        patch.setenv("CONTROLNET_DEPTH", controlnet)
        patch.setenv("DEPTH_MODEL", save_tiny_depth_model(tmp_path_factory.mktemp("depth")))
        p = predict_controlnet.Predictor()
        p.setup()
    return p


def test_controlnet_entry_loads_one_base_model(controlnet_predictor):
    canny, depth = controlnet_predictor.controlnets["canny"], controlnet_predictor.controlnets["depth"]
    assert canny.unet is depth.unet is controlnet_predictor.sampler.unet  # shared, not loaded three times
    assert depth._depth_estimator is not None  # loaded at setup, not by the first depth request


@pytest.mark.parametrize("controlnet, image_is_map, condition", [("canny", False, "canny"), ("depth", False, "depth"),
                                                                 ("canny", True, "image")])
def test_controlnet_predict_follows_the_image(controlnet_predictor, controlnet, image_is_map, condition):
    paths = run(controlnet_predictor, image=PHOTO, prompt="an astronaut", controlnet=controlnet,
                image_is_map=image_is_map, width=512, height=768, seed=4)
    meta = record(paths[0])
    assert paths[0].name == "elastic_seed4_512x768_0.png" and (meta["width"], meta["height"]) == (512, 768)
    assert meta["condition"] == condition and meta["controlnet_conditioning_scale"] == DEMO_SCALE
    assert meta["condition_image"] == "astronaut.jpg" and not os.path.isabs(meta["controlnet_model"])
    assert ("canny_low" in meta) == (condition == "canny")


@pytest.mark.parametrize("bad, message", [
    (dict(image=__file__), "image: "),  # not an image: the file named by its input
    (dict(image=None), "image is required"),
    (dict(controlnet="pose"), "controlnet must be canny or depth; got 'pose'"),
    (dict(controlnet_conditioning_scale=5.0), "controlnet_conditioning_scale must be between 0.1 and 2"),
    (dict(canny_low=300), "canny_low must be between 0 and 255; got 300"),
    (dict(canny_low=150, canny_high=100), "canny_low and canny_high must satisfy low <= high"),
    (dict(width=1001), "width must be a multiple of 8"),
    (dict(image=__file__, width=1001), "width must be a multiple of 8"),  # checked before the image is decoded
])
def test_controlnet_bad_inputs_are_refused_by_name(controlnet_predictor, bad, message):
    inputs = dict(dict(image=PHOTO, prompt="an astronaut", width=512, height=512), **bad)
    with pytest.raises(ValueError) as refused:
        run(controlnet_predictor, **inputs)
    assert message in str(refused.value) and ROOT not in str(refused.value)
    assert len(run(controlnet_predictor, image=PHOTO, prompt="an astronaut", width=512, height=512)) == 1


# --------------------------------------------------------------------------------------------------
# cog's own server (coglet), as `cog predict` and Replicate run it inside the image
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, payload: dict | None = None, timeout: float = 120) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            # cog answers a synchronous request before its one slot is free again: the next one may get 409
            # ("At capacity") for a moment, which clients retry (Replicate queues instead).
            if error.code != 409 or time.monotonic() > deadline:
                raise AssertionError(f"{url}: HTTP {error.code} {error.read()[:500]!r}") from None
            time.sleep(0.2)


def test_cogs_server_serves_predictions_and_reports_errors(tiny_sdxl_path, tmp_path):
    from PIL import Image

    port = _free_port()
    env = dict(os.environ, MODEL=tiny_sdxl_path, PORT=str(port), COG_PREDICT_TYPE_STUB="predict.py:Predictor",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), TMPDIR=str(tmp_path))
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                status = _http(f"{url}/health-check", timeout=5)["status"]
            except OSError:
                status = "STARTING"
            assert status in ("STARTING", "READY"), (tmp_path / "server.log").read_text()
            if status == "READY":
                break
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        refused = _http(f"{url}/predictions", {"input": {"prompt": "a lake", "width": 1001, **FAST}})
        assert refused["status"] == "failed" and "width must be a multiple of 8" in refused["error"]
        served = _http(f"{url}/predictions", {"input": {"prompt": "a lake", "width": 512, "height": 256, "seed": 11,
                                                        **FAST}})
        assert served["status"] == "succeeded" and "Using seed: 11" in served["logs"], served.get("error")
        (output,) = served["output"]  # without an upload URL, cog returns the file inline
        with Image.open(io.BytesIO(base64.b64decode(output.split(",", 1)[1]))) as image:
            assert image.size == (512, 256) and json.loads(image.text["elastic_diffusion"])["seed"] == 11
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    for block in BLOCKS:
        print(rendered_block(block), end="\n\n")
