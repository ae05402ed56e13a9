"""The knobs table (`elastic_diffusion.KNOBS`) is the one source of truth: the CLI, `check_inputs`, both demos'
widgets, their checks and /generate's parameters, and the PNG metadata agree with it, and a row added to it
reaches all of them (the loop is the only other place that has to use it).
"""
import argparse

import pytest

import app_gradio as app
import app_gradio_img2img as img2img
import elastic_diffusion as ed
import elastic_diffusion_w_controlnet as edc

QUIET = dict(progress=False, output_type="latent")
NUMBERS = [k for k in ed.KNOBS if k.type is not bool and not k.choices]


@pytest.fixture(scope="module")
def xl(tiny_sdxl_path):
    return ed.ElasticDiffusion(device="cpu", sd_version=tiny_sdxl_path)


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    (action,) = [a for a in parser._actions if a.dest == dest]
    return action


def _outside(row: ed.Knob, native_latent: int, demo: bool = False) -> list:
    """Values just past each bound of `row` (a bound itself where it is open)."""
    low, high = row.limits(native_latent, demo)
    open_low, open_high = (False, False) if demo and row.demo_range else (row.open_minimum, row.open_maximum)
    step = 1 if row.type is int else 1e-6
    values = [] if low is None else [low if open_low else low - step]
    return values + ([] if high is None else [high if open_high else high + step])


def _inside(row: ed.Knob, native_latent: int, demo: bool = False) -> list:
    """The closed bounds of `row` and a value between them."""
    low, high = row.limits(native_latent, demo)
    open_low, open_high = (False, False) if demo and row.demo_range else (row.open_minimum, row.open_maximum)
    values = [v for v, is_open in ((low, open_low), (high, open_high)) if v is not None and not is_open]
    return values + [row.type(row.default if row.default != ed.PRESET else (low or 0) + 1)]


def test_table_is_consistent():
    names = [k.name for k in ed.KNOBS]
    assert len(set(names)) == len(names) and ed.method_knobs() == [k for k in ed.KNOBS if not k.memory]
    for row in ed.KNOBS:
        assert row.type in (int, float, bool) and row.help and row.label, row.name
        assert row.default == ed.PRESET or isinstance(row.default, row.type), row.name
        assert (row.default == ed.PRESET) == bool(row.preset), row.name  # a preset default says how it is set
        if row.demo_range:  # what the demos accept, the sampler accepts: only the GPU time is bounded more
            for native_latent in (64, 128):
                (low, high), (demo_low, demo_high) = row.limits(native_latent), row.limits(native_latent, demo=True)
                assert (low is None or demo_low >= low) and (high is None or demo_high <= high), row.name
    defaults = ed.recommended_settings(2048, 1024)
    assert list(defaults) == [k.name for k in ed.method_knobs()]
    assert all(defaults[k.name] == k.default for k in ed.method_knobs() if k.default != ed.PRESET)


def test_cli_flags_follow_the_table():
    for parser in (ed.build_parser(), edc.build_parser()):
        for row in ed.KNOBS:
            action = _action(parser, row.name)
            assert set(action.option_strings) >= {f"--{name}" for name in (row.name, *row.aliases)}, row.name
            assert action.default == (row.default if row.memory else None), row.name  # None: the preset
            assert row.help in action.help
            if row.type is bool:
                assert isinstance(action, argparse.BooleanOptionalAction) and f"--no-{row.name}" in action.option_strings
            else:
                assert action.type is row.type and list(action.choices or ()) == list(row.choices), row.name
    parser = edc.build_parser()
    for row in edc.CONTROLNET_KNOBS:
        action = _action(parser, row.name)
        assert action.type is row.type and row.help in action.help
    assert parser.parse_args([]).controlnet_conditioning_scale == edc.DEMO_SCALE  # the official demo's, as the app


def test_check_inputs_follows_the_table(xl):
    D = xl.native_latent
    settings = ed.recommended_settings(1024, 512)
    for row in ed.method_knobs():
        values = list(row.choices) if row.choices else [True, False] if row.type is bool else _inside(row, D)
        for value in values:
            xl.check_inputs(512, 1024, dict(settings, **{row.name: value}), None, 1)
        bad = ["x", None] + ([2.5] if row.type is int else []) + ([max(row.choices) + 1] if row.choices else [])
        bad += [] if row.type is bool or row.choices else _outside(row, D)
        for value in bad:
            with pytest.raises(ValueError, match=row.name):
                xl.check_inputs(512, 1024, dict(settings, **{row.name: value}), None, 1)
    for value in _outside(ed.knob("view_batch_size"), D) + [2.5]:
        with pytest.raises(ValueError, match="view_batch_size"):
            xl("p", height=512, width=1024, view_batch_size=value, **QUIET)
    for row in edc.CONTROLNET_KNOBS:
        with pytest.raises(ValueError, match=row.name):
            row.check(_outside(row, D)[0], D)


@pytest.mark.parametrize("app_class", [app.TextToImageApp, img2img.ImageToImageApp])
def test_both_apps_widgets_and_api_follow_the_table(app_class, examples_cache):
    demo = app_class(None, "no model").build()  # the page is built without a model too, for native 1024 px
    widgets = {c["props"]["elem_id"]: c for c in demo.config["components"]
               if str(c["props"].get("elem_id", "")).startswith("knob-")}
    preset = app.preset(app.DEFAULT_SIZE, app.DEFAULT_SIZE, app.DEFAULT_SIZE)
    for row in ed.KNOBS:
        props = widgets[f"knob-{row.name}"]["props"]
        assert props["label"] == row.label and props["value"] == preset.get(row.name, row.default), row.name
        if row.type is bool:
            assert widgets[f"knob-{row.name}"]["type"] == "checkbox"
        elif row.choices:
            assert [value for _, value in props["choices"]] == list(row.choices)
        else:
            assert (props["minimum"], props["maximum"], props["step"]) == (*row.limits(128, demo=True), row.step)
    parameters = demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]
    names = [p["parameter_name"] for p in parameters]
    assert names == app_class.api_inputs() and set(names) >= {k.name for k in ed.KNOBS}
    if app_class is img2img.ImageToImageApp:
        for row in edc.CONTROLNET_KNOBS:
            props = widgets[f"knob-{row.name}"]["props"]
            expected = (*row.demo_range, img2img.KNOB_DEFAULTS[row.name])
            assert (props["minimum"], props["maximum"], props["value"]) == expected


def test_parse_request_follows_the_table(xl):
    base = dict(prompt="p", width=1024, height=512, seed=0)
    for row in NUMBERS:
        for value in _inside(row, xl.native_latent, demo=True):
            request = app.parse_request(dict(base, **{row.name: str(value)}), xl)  # API clients may send text
            got = request.knobs[row.name]
            assert got == value and type(got) is row.type, row.name
        for value in _outside(row, xl.native_latent, demo=True):
            with pytest.raises(app.gr.Error, match=row.label.replace("(", r"\(").replace(")", r"\)")):
                app.parse_request(dict(base, **{row.name: value}), xl)
    request = app.parse_request(base, xl)  # every knob left out: the preset, as the page starts
    assert request.knobs == dict(app.preset(1024, 512, xl.native_px), view_batch_size=16) and not request.low_vram
    for name in ("time_ids_scale", "repaint"):
        with pytest.raises(app.gr.Error, match=ed.knob(name).label):
            app.parse_request(dict(base, **{name: 3}), xl)


def test_png_record_lists_every_knob_in_table_order(xl):
    _, info = xl("p", height=512, width=1024, num_inference_steps=1, **QUIET)
    record = ed.png_metadata(info, "p", "")["elastic_diffusion"]
    positions = [record.index(f'"{k.name}"') for k in ed.method_knobs()]
    assert positions == sorted(positions) and record.index('"view_batch_size"') > positions[-1]


def test_a_new_row_reaches_the_cli_the_checks_the_sampler_the_demos_and_the_metadata(xl, monkeypatch, examples_cache):
    row = ed.Knob("test_knob", float, 0.5, "a knob added by this test", "Test knob", minimum=0, maximum=1,
                  demo_range=(0, 0.9), step=0.1, aliases=("tk",))
    monkeypatch.setattr(ed, "KNOBS", ed.KNOBS + (row,))
    assert ed.build_parser().parse_args(["--tk", "0.7"]).test_knob == 0.7
    assert ed.recommended_settings(1024, 512)["test_knob"] == 0.5
    with pytest.raises(ValueError, match="test_knob must be between 0 and 1; got 2"):
        xl("p", height=512, width=1024, test_knob=2.0, **QUIET)
    _, info = xl("p", height=512, width=1024, num_inference_steps=1, test_knob=0.7, **QUIET)
    assert info["settings"]["test_knob"] == 0.7
    assert '"test_knob": 0.7' in ed.png_metadata(info, "p", "")["elastic_diffusion"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'tset_knob'"):  # a typo is not a knob
        xl("p", height=512, width=1024, tset_knob=0.7, **QUIET)
    assert app.TextToImageApp.api_inputs()[-2:] == ["test_knob", "look_inside"]  # the app's own fields stay last
    demo = app.TextToImageApp(None, "no model").build()
    (widget,) = [c for c in demo.config["components"] if c["props"].get("elem_id") == "knob-test_knob"]
    assert (widget["props"]["minimum"], widget["props"]["maximum"], widget["props"]["value"]) == (0, 0.9, 0.5)
    parameters = demo.get_api_info()["named_endpoints"]["/generate"]["parameters"]
    assert "test_knob" in [p["parameter_name"] for p in parameters]
    base = dict(prompt="p", width=1024, height=512, seed=0)
    assert app.parse_request(dict(base, test_knob="0.25"), xl).knobs["test_knob"] == 0.25
    with pytest.raises(app.gr.Error, match="Test knob must be between 0 and 0.9; got 0.95"):
        app.parse_request(dict(base, test_knob=0.95), xl)
