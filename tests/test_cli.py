"""The command line: documented knobs, booleans that behave, PNG metadata that reproduces an image."""
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

import elastic_diffusion as ed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_documents_every_knob(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ed.build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in [k.name for k in ed.KNOBS] + ["seed", "outdir", "sd_version", "drop_p"]:
        assert f"--{name}" in text, name


@pytest.mark.parametrize("argv,expected", [
    ([], dict(repaint=None, low_vram=False, tiled_decoder=None)),
    (["--no-repaint"], dict(repaint=False)),
    (["--repaint_sampling"], dict(repaint=True)),
    (["--low_vram"], dict(low_vram=True)),
    (["--no-low_vram"], dict(low_vram=False)),
    (["--tiled_decoder"], dict(tiled_decoder=True)),
    (["--rrg_scale", "2000", "--steps", "30"], dict(rrg_init_weight=2000.0, num_inference_steps=30)),
    (["--model", "some/model"], dict(sd_version="some/model")),
])
def test_boolean_and_alias_flags_parse(argv, expected):
    args = ed.build_parser().parse_args(argv)
    for key, value in expected.items():
        assert getattr(args, key) == value


def test_cli_writes_pngs_that_reproduce(tiny_sdxl_path, tmp_path):
    out = tmp_path / "out"
    argv = ["--sd_version", tiny_sdxl_path, "--prompt", "a lighthouse", "--width", "1024", "--height", "512",
            "--seed", "3", "--steps", "2", "--outdir", str(out), "--num_images", "2", "--no-repaint"]
    paths = ed.main(argv)
    assert len(paths) == 2 and all(os.path.isfile(p) for p in paths)
    assert not [f for f in os.listdir(out) if f.endswith(".part")]
    image = Image.open(paths[0])
    assert image.size == (1024, 512)
    record = json.loads(image.text["elastic_diffusion"])
    assert record["prompt"] == "a lighthouse" and record["seed"] == 3 and record["width"] == 1024
    assert record["num_inference_steps"] == 2 and record["repaint"] is False and record["model"] == tiny_sdxl_path
    for name in [k.name for k in ed.method_knobs()]:
        assert name in record
    assert "Negative prompt:" in image.text["parameters"]
    # the metadata alone regenerates the same pixels
    sampler = ed.ElasticDiffusion(device="cpu", sd_version=record["model"])
    knobs = {k.name: record[k.name] for k in ed.method_knobs()}
    images, _ = sampler(record["prompt"], record["negative_prompt"], height=record["height"], width=record["width"],
                        seed=record["seed"], num_images_per_prompt=2, progress=False, **knobs)
    assert images[0].tobytes() == image.convert("RGB").tobytes()


def test_cli_bad_size_exits_cleanly_without_writing(tiny_sdxl_path, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        ed.main(["--sd_version", tiny_sdxl_path, "--width", "1001", "--outdir", str(out)])
    assert exit_info.value.code == 2
    assert "width must be a multiple of 8" in capsys.readouterr().err
    assert not out.exists()


MISSING = "/nonexistent/model/folder"  # its native size is unknown before loading: the rules that need it wait


@pytest.mark.parametrize("argv,message", [
    (["--sd_version", MISSING, "--width", "1001"],
     "width must be a multiple of 8 (the VAE works on 8x8 pixel blocks): try 1000 or 1008 instead of 1001"),
    (["--sd_version", MISSING, "--height", "120"],
     "height must be at least 128 pixels (a smaller image would be mostly padding); got 120"),
    (["--sd_version", MISSING, "--patch_size", "0"], "--patch_size must be >= 1; got 0"),
    (["--sd_version", "XL1.0", "--width", "4096"], "width must be between 128 and 2048 pixels for this model (at "
     "most 2x its native 1024 px per side); larger sizes are experimental: set max_scale (CLI --max_scale) to 3 or 4"),
    (["--sd_version", "XL1.0", "--width", "4096", "--max_scale", "3"], "between 128 and 3072 pixels for this model "
     "(at most 3x its native 1024 px per side); got 4096"),
    (["--sd_version", "1.5", "--height", "1536"], "height must be between 128 and 1024 pixels for this model (at "
     "most 2x its native 512 px per side); larger sizes are experimental: set max_scale"),
    (["--sd_version", "tiny", "--width", "4096"],  # the native size read from the folder's configs
     "width must be between 128 and 2048 pixels for this model (at most 2x its native 1024 px per side); larger"),
    (["--sd_version", "XL1.0", "--new_p", "0"], "--new_p must be in (0, 1]; got 0"),
    (["--sd_version", "XL1.0", "--patch_size", "200"], "--patch_size must be between 1 and 128; got 200"),
    (["--sd_version", "XL1.0", "--steps", "0"], "--num_inference_steps must be between 1 and 1000; got 0"),
    (["--sd_version", "XL1.0", "--drop_p", "0.5", "--new_p", "0.3"], "drop_p=0.5 and new_p=0.3 disagree"),
    (["--sd_version", "XL1.0", "--num_images", "0"], "--num_images must be >= 1; got 0"),
])
def test_bad_sizes_and_knobs_are_refused_before_the_model_loads(argv, message, tiny_sdxl_path, monkeypatch, capsys):
    """Loading takes seconds on a tiny model and minutes on SDXL: what needs no model is checked first, by the
    sampler's own rules, each with the hint that fits (too small: the minimum; too large: max_scale)."""
    def load(**kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(ed, "ElasticDiffusion", load)
    argv = [tiny_sdxl_path if arg == "tiny" else arg for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        ed.main(argv + ["--outdir", os.devnull])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err
    assert ("max_scale" in err) == ("larger" in message)  # the hint fits the error


def test_controlnet_cli_reads_its_image_before_the_models_load(monkeypatch, capsys):
    import elastic_diffusion_w_controlnet as edc

    def load(**kwargs):
        raise AssertionError("the models were loaded before the input was checked")

    monkeypatch.setattr(edc, "ElasticDiffusionControlNet", load)
    with pytest.raises(SystemExit) as exit_info:
        edc.main(["--condition_image", "/nonexistent/input.png"])
    assert exit_info.value.code == 2 and "condition_image" in capsys.readouterr().err


def test_cli_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ed.main(["--sd_version", "9.9"])
    assert exit_info.value.code == 2
    assert "unknown" in capsys.readouterr().err


def test_without_network_the_cli_says_so_once_and_quickly(monkeypatch, capsys, caplog):
    """`make run` with no network: one clear error within seconds, not half a minute of retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        ed.main(["--sd_version", "nobody/no-such-model", "--steps", "1"])
    assert exit_info.value.code == 2 and time.monotonic() - started < 15
    err = capsys.readouterr().err + caplog.text
    assert err.count("hub cannot be used (no network: 127.0.0.1 cannot be reached") == 1
    assert "not in the local Hugging Face cache" in err and "Retrying" not in err and "model_index.json" not in err
    assert ed.TINY_MODEL_HINT in err and "`make tiny-model`" in ed.TINY_MODEL_HINT  # how to try it without the hub
    assert not constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "0"  # no process-wide switch

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline by choice: said as such, without probing
    with pytest.raises(SystemExit):
        ed.main(["--sd_version", "nobody/no-such-model"])
    assert "hub cannot be used (HF_HUB_OFFLINE is set)" in capsys.readouterr().err


def test_tiny_model_command_writes_a_model_to_try_everything_offline(tmp_path):
    """`make tiny-model` (`python tests/tiny_models.py FOLDER`): a model the command line and the ControlNet take."""
    import elastic_diffusion_w_controlnet as edc

    folder = os.fspath(tmp_path / "tiny-model")
    done = subprocess.run([sys.executable, os.path.join("tests", "tiny_models.py"), folder], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr
    assert "Its pictures are noise" in done.stdout and f'make run ARGS="--model {folder}' in done.stdout
    out = tmp_path / "out"
    common = ["--model", folder, "--width", "256", "--height", "128", "--steps", "1", "--device", "cpu",
              "--outdir", os.fspath(out)]
    (path,) = ed.main(common)
    assert Image.open(path).size == (256, 128)
    paths = edc.main(common + ["--controlnet_model", os.path.join(folder, "controlnet"), "--condition", "depth",
                               "--depth_model", os.path.join(folder, "depth")])
    assert Image.open(paths[-1]).size == (256, 128) and paths[-1].endswith("_condition.png")
