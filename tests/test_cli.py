"""The command line: documented knobs, booleans that behave, PNG metadata that reproduces an image."""
import json
import os
import time

import pytest
from PIL import Image

import elastic_diffusion as ed


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


def test_cli_unknown_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ed.main(["--sd_version", "9.9"])
    assert exit_info.value.code == 2
    assert "unknown" in capsys.readouterr().err


def test_without_network_the_cli_says_so_once_and_quickly(monkeypatch, capsys, caplog):
    """`make run` with no network: one clear error within seconds, not half a minute of retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(ed, "_HUB_OFFLINE_REASON", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        ed.main(["--sd_version", "nobody/no-such-model", "--steps", "1"])
    assert exit_info.value.code == 2 and time.monotonic() - started < 15
    err = capsys.readouterr().err + caplog.text
    assert err.count("hub cannot be used (no network: 127.0.0.1 cannot be reached") == 1
    assert "not in the local Hugging Face cache" in err and "Retrying" not in err and "model_index.json" not in err
    assert constants.HF_HUB_OFFLINE  # the rest of the process reads the cache instead of retrying

    with pytest.raises(SystemExit):  # already offline (HF_HUB_OFFLINE): said as such, without probing again
        ed.main(["--sd_version", "nobody/no-such-model"])
    assert "hub cannot be used (no network" in capsys.readouterr().err
    monkeypatch.setattr(ed, "_HUB_OFFLINE_REASON", None)
    with pytest.raises(SystemExit):
        ed.main(["--sd_version", "nobody/no-such-model"])
    assert "hub cannot be used (HF_HUB_OFFLINE is set)" in capsys.readouterr().err
