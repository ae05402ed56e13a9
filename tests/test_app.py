"""The text-to-image demo (`app_gradio.py`) end to end on a tiny random SDXL, on the CPU.

The app is launched in-process on a free port and driven through `gradio_client`, as a user of the
API would: images of the requested size with their settings in the PNG metadata, actionable errors
for bad input after which the app keeps serving, per-request isolation, cancellation, and the
no-model mode. 1024x512 is the smallest size with a reduced reference on the tiny SDXL (native 1024).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app_gradio as app  # noqa: E402
import pca_diffusion_scores as pca  # noqa: E402
from elastic_diffusion import DEMO_PRESETS, ElasticDiffusion  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(prompt="a lighthouse at dusk", width=1024, height=512, num_inference_steps=3, seed=7,
            randomize_seed=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(text_to_image: app.TextToImageApp):
    demo = text_to_image.build()
    demo.queue(max_size=8)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            css=app.PAGE_CSS)
    try:
        yield demo, url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def sampler(tiny_sdxl_path):
    return ElasticDiffusion(sd_version=tiny_sdxl_path)


@pytest.fixture(scope="module")
def server(sampler, examples_cache):
    with served(app.TextToImageApp(sampler, preview_every=1)) as (demo, url):
        yield demo, url


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def generate(client, **overrides):
    return client.predict(**dict(FAST, **overrides), api_name="/generate")


def png(gallery_item) -> Image.Image:
    image = Image.open(gallery_item["image"])
    image.load()
    return image


def record(image: Image.Image) -> dict:
    return json.loads(image.text["elastic_diffusion"])


def stored_bytes(outputs: app.OutputFolders) -> int:
    """Bytes in the outputs now, as the prune counts them."""
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(outputs.root)
               for name in names)


def test_generate_returns_full_size_png_with_settings(client):
    gallery, seed, summary, *_ = generate(client)
    assert len(gallery) == 1 and seed == 7
    image = png(gallery[0])
    assert image.format == "PNG" and image.size == (1024, 512)
    meta = record(image)
    assert (meta["seed"], meta["width"], meta["height"], meta["num_inference_steps"]) == (7, 1024, 512, 3)
    assert meta["prompt"] == FAST["prompt"] and "Negative prompt:" in image.text["parameters"]
    assert "UNet evaluations" in summary and "s**" in summary
    assert "padding strips" in summary and "denoising" in summary  # every stage's time, the preparation too


def test_metadata_and_summary_name_no_server_paths(client, tiny_sdxl_path):
    gallery, _, summary, *_ = generate(client)
    image = png(gallery[0])
    meta = record(image)
    assert meta["model"] == os.path.basename(tiny_sdxl_path)  # the model's folder name, not its path
    texts = [str(value) for value in meta.values()] + [image.text["parameters"], summary]
    assert not [text for text in texts if os.path.dirname(tiny_sdxl_path) in text or text.startswith("/")]


def test_randomized_seed_is_echoed_and_reproducible(client):
    gallery, seed, *_ = generate(client, randomize_seed=True)
    assert 0 <= seed <= app.ed.MAX_SEED and record(png(gallery[0]))["seed"] == seed
    again, *_ = generate(client, seed=seed)
    assert np.array_equal(np.asarray(png(gallery[0])), np.asarray(png(again[0])))


def test_recommended_settings_endpoint_feeds_generate(client):
    settings = client.predict(2048, 1024, api_name="/recommended_settings")
    assert (settings["resampling_steps"], settings["rrg_init_weight"]) == (7, 1000)
    gallery, *_ = generate(client, **dict(settings, num_inference_steps=2, resampling_steps=1))
    assert png(gallery[0]).size == (1024, 512)  # FAST's size; the knobs came from the endpoint


@pytest.mark.parametrize("width,height,message", [
    (1001, 1024, "Width must be a multiple of 8"), (1024, 4096, "Height must be between 128 and 2048"),
    (64, 1024, "Width must be at least 128 pixels"), ("abc", 1024, "Width must be an integer number of pixels"),
    (1024, 512.5, "Height must be an integer number of pixels"),
    (None, 1024, "Width must be an integer number of pixels"),
])
def test_recommended_settings_validates_sizes_like_generate(client, width, height, message):
    with pytest.raises(AppError, match=message):
        client.predict(width, height, api_name="/recommended_settings")


def test_recommended_settings_refuses_non_finite_json(server):
    stream = call_raw(server[1], '{"data": [NaN, 1024]}', "recommended_settings")
    assert "event: error" in stream and "Width must be an integer number of pixels" in stream


def test_recommended_settings_are_always_accepted_by_generate(sampler, monkeypatch):
    monkeypatch.setattr(sampler, "max_scale", 8)  # λ0 grows with the area: 32000 at 8x, above /generate's 10000
    text_to_image = app.TextToImageApp(sampler, preview_every=0)
    sizes = range(128, 8 * 1024 + 1, 8 * 61)
    for width in sizes:
        for height in sizes:
            settings = text_to_image.recommended(width, height)
            request = app.parse_request(dict(settings, prompt="p", width=width, height=height, seed=0,
                                             view_batch_size=16), sampler)
            assert request.knobs["rrg_init_weight"] == settings["rrg_init_weight"] <= 10000


def test_plain_comparison_uses_same_size_and_seed(client):
    gallery, seed, summary, *_ = generate(client, compare_plain=True)
    elastic, plain = (png(item) for item in gallery)
    assert elastic.size == plain.size == (1024, 512)
    assert record(plain)["seed"] == seed and record(plain)["method"] == "plain DDIM"
    assert "plain comparison" in summary


def test_plain_run_starts_from_the_samplers_noise(sampler, monkeypatch):
    import diffusers.utils.torch_utils as torch_utils

    drawn = []
    original = torch_utils.randn_tensor
    monkeypatch.setattr(torch_utils, "randn_tensor", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    sampler("p", "", height=512, width=1024, seed=3, num_inference_steps=1, progress=False, output_type="latent")
    monkeypatch.undo()
    torch.manual_seed(0)  # the draw must not depend on the global RNG
    assert torch.equal(drawn[0], sampler.initial_latents(512, 1024, 1, 3))


def test_previews_stream_before_the_result(client):
    job = client.submit(**dict(FAST, num_inference_steps=4), api_name="/generate")
    job.result(timeout=60)
    captions = [item.get("caption") or "" for out in job.outputs() if isinstance(out[0], list) for item in out[0]]
    assert any(c.startswith("Preview, step") for c in captions)
    assert captions[-1].startswith("ElasticDiffusion 1024x512")


BAD_INPUTS = [
    (dict(width=1001), "multiple of 8"),
    (dict(width=4096), "between 128 and 2048"),
    (dict(height=64), "Height must be at least 128 pixels"),
    (dict(height="tall"), "Height must be an integer number of pixels"),
    (dict(seed="abc", randomize_seed=False), "Seed must be a whole number"),
    (dict(seed=-1), "Seed must be between 0"),
    (dict(seed=app.ed.MAX_SEED + 1), "between 0 and 4294967295; got 4294967296"),  # limits as written, not 4.29e+09
    (dict(prompt=""), "Prompt is empty"),
    (dict(prompt="   "), "Prompt is empty"),
    (dict(prompt="x" * 5000), "at most 1000"),
    (dict(negative_prompt="y" * 5000), "Negative prompt is 5000 characters"),
    (dict(guidance_scale="nan"), "guidance scale"),  # JSON has no NaN: clients send text (raw NaN below)
    (dict(cosine_scale="-inf"), "cosine scale"),
    (dict(rrg_init_weight=-5), "between 0 and 10000"),
    (dict(num_inference_steps=100000), "between 1 and 150"),
    (dict(num_inference_steps=2.5), "whole number"),
    (dict(new_p=0), "between 0.05 and 1"),
    (dict(patch_size=512), "between 8 and 128"),
    (dict(view_batch_size=0), "between 1 and 64"),
    (dict(time_ids_scale=2), "must be 1 or 4"),
    (dict(randomize_seed="maybe"), "true or false"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUTS, ids=[str(sorted(o))[:40] for o, _ in BAD_INPUTS])
def test_bad_input_gives_actionable_error(client, overrides, message):
    with pytest.raises(AppError, match=f"(?i){message}"):
        generate(client, **overrides)


def call_raw(url: str, payload: str, endpoint: str = "generate", timeout: float = 60) -> str:
    """POST a hand-written JSON body to an endpoint's REST route and return the event stream's text."""
    request = urllib.request.Request(f"{url}gradio_api/call/{endpoint}", data=payload.encode(),
                                     headers={"Content-Type": "application/json"})
    event_id = json.load(urllib.request.urlopen(request))["event_id"]
    return urllib.request.urlopen(f"{url}gradio_api/call/{endpoint}/{event_id}", timeout=timeout).read().decode()


def final_data(stream: str):
    """The outputs of the event stream's `complete` event."""
    return json.loads(stream.split("event: complete\ndata: ", 1)[1].split("\n", 1)[0])


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_json_numbers_are_refused(server, token):
    marker = 7.125  # stands for guidance_scale in the body, then becomes the non-finite token
    values = {**FAST, **app.ed.recommended_settings(1024, 512), "negative_prompt": "", "compare_plain": False,
              "view_batch_size": 16, "low_vram": False, "guidance_scale": marker, "look_inside": False}
    names = app.TextToImageApp.api_inputs()  # the order in which positional clients send them
    body = json.dumps({"data": [values[name] for name in names]}).replace(str(marker), token)
    stream = call_raw(server[1], body)
    assert "event: error" in stream and "guidance scale" in stream.lower(), stream


def test_app_keeps_serving_after_errors(client):
    for overrides, _ in BAD_INPUTS[:3]:
        with pytest.raises(AppError):
            generate(client, **overrides)
    gallery, seed, *_ = generate(client, seed=8)
    assert seed == 8 and png(gallery[0]).size == (1024, 512)


def test_parallel_clients_get_their_own_images(server):
    seeds = (101, 102, 103)

    def one_user(seed):
        return Client(server[1], verbose=False).predict(**dict(FAST, seed=seed), api_name="/generate")

    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        results = list(pool.map(one_user, seeds))
    paths = [gallery[0]["image"] for gallery, *_ in results]
    assert len(set(paths)) == len(seeds)
    for seed, (gallery, echoed, *_) in zip(seeds, results):
        assert echoed == seed and record(png(gallery[0]))["seed"] == seed
    pixels = [np.asarray(png(gallery[0])) for gallery, *_ in results]
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[1], pixels[2])


def test_cancel_stops_between_steps_and_frees_the_sampler(client, sampler, monkeypatch):
    long_run = dict(FAST, width=2048, height=2048, num_inference_steps=150, resampling_steps=10,
                    rrg_init_weight=2000)
    finished = threading.Event()  # set when the run ends (`finish_run` runs after a cancel too)
    monkeypatch.setattr(sampler, "finish_run", lambda run, end=sampler.finish_run: (end(run), finished.set()))
    job = client.submit(**long_run, api_name="/generate")
    deadline = time.monotonic() + 60
    while not any(isinstance(out[0], list) for out in job.outputs()):  # the first preview: denoising runs
        assert time.monotonic() < deadline and not job.done(), "no preview arrived"
        time.sleep(0.05)
    job.cancel()
    assert finished.wait(15), "the sampler kept running after the cancel"
    gallery, seed, *_ = generate(client, seed=9)
    assert seed == 9 and png(gallery[0]).size == (1024, 512)


def test_out_of_memory_becomes_advice(client, sampler, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(sampler, "generate", out_of_memory)
    with pytest.raises(AppError, match="View batch size.*Tiled decoder.*Low VRAM.*smaller"):
        generate(client)
    monkeypatch.undo()
    assert png(generate(client)[0][0]).size == (1024, 512)


def test_sampler_value_error_becomes_gr_error(client, sampler, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError("latents must have shape (1, 4, 64, 128)")

    monkeypatch.setattr(sampler, "generate", refuse)
    with pytest.raises(AppError, match="latents must have shape"):
        generate(client)


def test_fourteen_presets_are_wired_lazily(server, examples_cache):
    demo, url = server
    config = json.load(urllib.request.urlopen(url + "config"))
    datasets = [c for c in config["components"] if c.get("type") == "dataset"]
    assert len(datasets) == 1
    samples = datasets[0]["props"]["samples"]
    assert len(samples) == 14 and [row[0] for row in samples] == [p["prompt"] for p in DEMO_PRESETS]
    ratios = {app._aspect_ratio(p["width"], p["height"]) for p in DEMO_PRESETS}
    assert {"1:1", "1:2", "2:1", "9:16", "16:9", "3:4", "4:3", "1:4", "4:1"} <= ratios
    loader = next(d for d in config["dependencies"] if d.get("api_name") == "load_example_input")
    assert len(loader["outputs"]) == len(app.TextToImageApp.example_inputs)  # a preset fills only the fields it sets
    cached = [f for _, _, files in os.walk(examples_cache) for f in files]
    assert cached == []  # lazy: nothing generated at start-up


def test_preset_example_runs_with_its_own_knobs(sampler, monkeypatch):
    calls = []
    real_generate = sampler.generate

    def two_steps(*args, **kwargs):  # record what the preset asks for, then run it short
        calls.append(kwargs)
        return real_generate(*args, **dict(kwargs, num_inference_steps=2))

    monkeypatch.setattr(sampler, "generate", two_steps)
    row = app.TextToImageApp.example_rows[2]  # 1024x2048, R = 7, lambda0 = 1000
    *_, (gallery, seed, summary, *_) = app.TextToImageApp(sampler, preview_every=0).generate_example(*row)
    asked = calls[0]
    assert (asked["width"], asked["height"], asked["seed"]) == (1024, 2048, 0)
    assert (asked["resampling_steps"], asked["new_p"], asked["rrg_init_weight"]) == (7, 0.3, 1000)
    assert (asked["num_inference_steps"], asked["guidance_scale"], asked["cosine_scale"]) == (50, 10, 10)
    assert (asked["patch_size"], asked["rrg_stop_t"], asked["repaint"]) == (64, 0.4, True)
    meta = record(Image.open(gallery[0][0]))
    assert (meta["width"], meta["height"], meta["negative_prompt"]) == (1024, 2048, row[1])


def test_size_change_follows_presets_except_edited_knobs():
    names = ["resampling_steps", "rrg_init_weight", "patch_size"]
    assert app.preset_updates(2048, 2048, frozenset(), names, 1024) == [10, 2000.0, 64]
    updates = app.preset_updates(2048, 1024, frozenset({"resampling_steps"}), names, 1024)
    assert updates[0] == app.gr.skip() and updates[1:] == [1000.0, 64]
    assert app.preset_updates(20, 1024, frozenset(), names, 1024) == [app.gr.skip()] * 3  # mid-typing
    assert app.preset_updates(3072, 1024, frozenset(), names, 1024, max_scale=3)[0] == 10


def test_outputs_are_stored_once_bounded_and_only_for_served_requests(sampler, examples_cache):
    outputs = app.OutputFolders()
    with served(app.TextToImageApp(sampler, preview_every=1, outputs=outputs)) as (_, url):
        client = Client(url, verbose=False)
        generate(client, seed=1, num_inference_steps=2)
        one_request = stored_bytes(outputs)  # the result and its preview
        outputs.max_bytes = int(one_request * 2.5)
        for seed in (2, 3, 4):
            generate(client, seed=seed, num_inference_steps=2)
        folders = list(os.scandir(outputs.root))
        assert stored_bytes(outputs) <= outputs.max_bytes and len(folders) == 2  # the oldest requests went first
        names = sorted(name for folder in folders for name in os.listdir(folder.path))
        assert names == ["elastic_seed3_1024x512.png", "elastic_seed4_1024x512.png", "preview_step1.png",
                         "preview_step1.png"]
        for overrides, _ in BAD_INPUTS[:4]:  # refused requests leave no folder behind
            with pytest.raises(AppError):
                generate(client, **overrides)
        assert len(list(os.scandir(outputs.root))) == 2
        # Stored once: Gradio serves the result from the outputs folder instead of copying it to its cache.
        values = {**FAST, **app.preset(1024, 512, 1024), "negative_prompt": "", "compare_plain": False,
                  "view_batch_size": 16, "low_vram": False, "seed": 5, "num_inference_steps": 2,
                  "look_inside": False}
        names = app.TextToImageApp.api_inputs()
        gallery, *_ = final_data(call_raw(url, json.dumps({"data": [values[name] for name in names]})))
        served_path = gallery[0]["image"]["path"]
        assert os.path.dirname(os.path.dirname(served_path)) == outputs.root and os.path.isfile(served_path)
    outputs.remove()


def test_running_requests_keep_their_folders_and_old_ones_go(tmp_path):
    outputs = app.OutputFolders(max_bytes=150, parent=str(tmp_path))
    with outputs.request() as running:
        with outputs.request() as done:
            for file in (running, done):
                with open(file("image.png"), "wb") as f:
                    f.write(b"x" * 100)
        # over the cap, but the newest result stays, and a running request's folder is never pruned
        assert os.path.isfile(running("image.png")) and os.path.isfile(done("image.png"))
    assert os.path.isfile(running("image.png")) and not os.path.exists(done("image.png"))  # now the older one goes
    outputs.keep_seconds = -1  # everything is past its age: the next request's folder is all that is left
    with outputs.request() as later:
        folder = os.path.dirname(later("image.png"))  # made on first use
        assert [entry.path for entry in os.scandir(outputs.root)] == [folder]
    outputs.remove()
    assert not os.path.exists(outputs.root)


def test_progress_shows_the_preparation_before_step_1(sampler):
    descriptions = []
    values = {**FAST, **app.preset(2048, 1024, 1024), "negative_prompt": "", "compare_plain": False,
              "view_batch_size": 16, "low_vram": False, "width": 2048, "height": 1024, "num_inference_steps": 2}
    outputs = app.OutputFolders()
    text_to_image = app.TextToImageApp(sampler, preview_every=0, outputs=outputs)
    *_, (gallery, seed, summary, *_) = text_to_image.stream(values, lambda done_total, desc: descriptions.append(desc))
    first_step = descriptions.index(next(d for d in descriptions if "step 1/2" in d))
    before = descriptions[:first_step]
    assert before[0] == "Encoding the prompt" and "Encoding the padding strips (0/" in before[1]
    assert before[-1].startswith("Encoding the padding strips (") and not [d for d in before if "step" in d]
    assert "padding strips" in summary
    outputs.remove()


def test_time_left_comes_from_measured_steps():
    times = iter([0.0, 30.0, 35.0, 37.0, 39.0])  # start, 30 s of padding strips, steps of 5 s then 2 s and 2 s
    shown = []
    run = app.RunProgress(lambda done_total, desc: shown.append((done_total, desc)), clock=lambda: next(times))
    run.stage("backgrounds", 40, 40)
    on_step = run.steps("ElasticDiffusion", 10)
    for step in range(3):
        on_step(None, step, 0, {})
    assert shown == [((40, 40), "Encoding the padding strips (40/40)"),
                     ((1, 10), f"ElasticDiffusion: step 1/10, about {5 * 9} s left"),  # the first step only until two
                     ((2, 10), f"ElasticDiffusion: step 2/10, about {2 * 8} s left"),
                     ((3, 10), f"ElasticDiffusion: step 3/10, about {2 * 7} s left")]


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        app.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    options = [" ".join(chunk.split()) for chunk in text.split("\n  -")[1:]]
    assert options and all(option.count("(default") <= 1 for option in options)
    assert "(default: None)" not in " ".join(options) and "--max-output-mb" in text


def test_gpu_duration_grows_with_the_work():
    base = dict(width=1024, height=1024, num_inference_steps=50, resampling_steps=0, patch_size=64, repaint=True)
    big = dict(base, width=2048, height=2048, resampling_steps=10)
    assert 20 <= app.estimate_gpu_seconds(base, 1024) < app.estimate_gpu_seconds(big, 1024) <= 300
    # 2048x2048, R = 10: 2,782 UNet samples (docs/method.md#cost-model) at 17 ms, plus margins
    assert app.estimate_gpu_seconds(big, 1024) == int(20 + 1.2 * 2782 * app.UNET_SAMPLE_SECONDS)
    assert app.estimate_gpu_seconds(dict(base, width="x"), 1024) == 30
    # The durations docs/app.md quotes: 1024² at the defaults, 2048x1024 and 2048² with their presets.
    assert [app.estimate_gpu_seconds(dict(width=w, height=h), 1024) for w, h in ((1024, 1024), (2048, 1024),
                                                                                (2048, 2048))] == [22, 46, 76]
    if app.spaces is None:  # without the `spaces` package the handler is used as it is
        assert app.on_gpu(free_port, lambda values: 30) is free_port


def test_zero_gpu_duration_is_estimated_from_the_request(sampler, monkeypatch):
    durations = []

    class FakeSpaces:  # what `spaces.GPU(fn, duration=callable)` receives on a ZeroGPU Space
        @staticmethod
        def GPU(fn, duration):
            durations.append(duration)
            return fn

    monkeypatch.setattr(app, "spaces", FakeSpaces)
    text_to_image = app.TextToImageApp(sampler)
    app.on_gpu(text_to_image.generate, text_to_image.gpu_seconds)
    values = {**app.ed.recommended_settings(2048, 2048), "width": 2048, "height": 2048, "view_batch_size": 16}
    # Gradio passes the progress tracker by position and the inputs by name (inputs_kwargs).
    assert durations[0](app.gr.Progress(), **values) == app.estimate_gpu_seconds(values, 1024) == 76


def test_without_a_model_the_app_starts_and_explains():
    args = app.build_parser().parse_args(["--model", "/nonexistent/model/folder"])
    sampler, message = app.load_sampler(args)
    assert sampler is None and "--model /path/to/diffusers/folder" in message and "`folder`" in message
    assert "/nonexistent" not in message  # the advice names the folder, not the server's path to it
    assert "`make tiny-model`" in message  # the way to try the demo without the hub
    with served(app.TextToImageApp(None, message)) as (demo, url):
        page = urllib.request.urlopen(url + "config").read().decode()
        assert "--model /path/to/diffusers/folder" in page and "/nonexistent" not in page
        with pytest.raises(AppError, match="--model /path/to/diffusers/folder"):
            Client(url, verbose=False).predict(**FAST, api_name="/generate")


def wait_for_config(process, port: int, seconds: float = 90) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2))
        except OSError:
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.5)


def upload_status(url: str, content: bytes) -> int:
    """The HTTP status of a multipart upload of one small file to Gradio's upload route."""
    boundary = "elastic-diffusion-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as error:
        return error.code


def test_command_line_app_refuses_uploads_and_leaves_nothing_after_sigterm(tiny_sdxl_path, tmp_path):
    port, temp = free_port(), tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", TMPDIR=str(temp),
               GRADIO_EXAMPLES_CACHE=str(tmp_path / "examples"))
    env.pop("GRADIO_TEMP_DIR", None)
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "app_gradio.py"), "--model", tiny_sdxl_path,
                                "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        config = wait_for_config(process, port)
        url = f"http://127.0.0.1:{port}/"
        assert any(d.get("api_name") == "generate" for d in config["dependencies"])
        assert os.path.dirname(tiny_sdxl_path) not in json.dumps(config)  # the model by its folder name only
        assert upload_status(url, b"\x89PNG not really" * 100) == 413  # this app takes no file
        gallery, *_ = Client(url, verbose=False).predict(**dict(FAST, num_inference_steps=2), api_name="/generate")
        assert png(gallery[0]).size == (1024, 512)
        stored = [name for _, _, names in os.walk(temp) for name in names]
        assert "elastic_seed7_1024x512.png" in stored
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    # Only the empty folders that torch and Gradio make when they are imported remain: no file, no app folder.
    assert [name for _, _, names in os.walk(temp) for name in names] == []
    assert not [name for name in os.listdir(temp) if name.startswith("elastic_diffusion")]
    assert "Storing results and previews in" in output and "GiB free on that disk. Uploads: none accepted" in output
    assert "share=True" not in output and "pass --share for a temporary public link" in output  # our flag's name


def test_request_values_reach_the_sampler_validated(sampler):
    values = dict(FAST, negative_prompt=None, compare_plain="false", seed="12", num_inference_steps=3.0,
                  guidance_scale="7.5", resampling_steps=0, new_p=0.3, rrg_init_weight=0, cosine_scale=10,
                  rrg_stop_t=0.4, patch_size=64, view_batch_size=4, repaint=True, tiled_decoder=False,
                  low_vram=False, time_ids_scale="4")
    request = app.parse_request(values, sampler)
    assert (request.seed, request.negative_prompt, request.compare_plain) == (12, "", False)
    assert request.knobs["view_batch_size"] == 4
    assert request.knobs["num_inference_steps"] == 3 and isinstance(request.knobs["num_inference_steps"], int)
    assert request.knobs["guidance_scale"] == 7.5 and request.knobs["time_ids_scale"] == 4
    assert list(request.knobs) == [k.name for k in app.ed.KNOBS if k.name != "low_vram"]
    assert not math.isnan(request.knobs["new_p"])


def test_the_plain_comparison_runs_on_the_modules_without_casting_them(tiny_sdxl_path):
    """The demo's plain comparison runs on the sampler's own modules and leaves their dtypes alone
    (diffusers' from_pipe would cast an fp16 sampler's UNet to fp32: twice the memory on a GPU)."""
    half = ElasticDiffusion(device="cpu", sd_version=tiny_sdxl_path, torch_dtype=torch.float16)
    dtypes = {name: m.dtype for name, m in half.pipe.components.items() if isinstance(m, torch.nn.Module)}
    inputs = []
    with half.unet.register_forward_pre_hook(lambda unet, args: inputs.append(args[0].dtype)):
        images, _ = app.pca.generate_plain(half, "p", "", 256, 256, 2, 5.0, 0, output_type="pt", progress=False)
    assert inputs == [torch.float16] * 2 and images.shape == (1, 3, 256, 256)  # one fp16 UNet call per step
    assert {name: m.dtype for name, m in half.pipe.components.items() if isinstance(m, torch.nn.Module)} == dtypes
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32  # the VAE upcast for decoding


def test_the_low_vram_box_switches_the_loaded_sampler_in_place(sampler, monkeypatch):
    """The demo's Low VRAM checkbox moves the loaded modules per request and back; nothing is rebuilt
    (docs/method.md#fix-low-vram-toggle)."""
    built = []
    monkeypatch.setattr(ElasticDiffusion, "__init__", lambda *args, **kwargs: built.append(args))
    unet, outputs = sampler.unet, app.OutputFolders()
    try:
        for low_vram in (True, False):
            request = app.parse_request(dict(FAST, num_inference_steps=1, low_vram=low_vram), sampler)
            switched = []
            monkeypatch.setattr(sampler, "sample", lambda *args, **kwargs: switched.append(sampler.low_vram) or args[1])
            with outputs.request() as file:
                app.run_generation(sampler, request, file)
            assert switched == [low_vram] and sampler.low_vram is low_vram
            assert (type(getattr(sampler.unet, "_hf_hook", None)).__name__ == "CpuOffload") is low_vram
    finally:
        monkeypatch.undo()
        sampler.set_low_vram(False)
        outputs.remove()
    assert built == [] and sampler.unet is unet


# --------------------------------------------------------------------------------------------------
# "Look inside": the recorded scores drawn (pca_diffusion_scores), off by default and free when off
# --------------------------------------------------------------------------------------------------


def frames(path: str) -> list[np.ndarray]:
    """Every frame of an animation, as RGB arrays."""
    with Image.open(path) as animation:
        assert animation.format == "WEBP" and animation.is_animated
        found = []
        for index in range(animation.n_frames):
            animation.seek(index)
            found.append(np.asarray(animation.convert("RGB")))
    return found


def test_look_inside_returns_the_sheet_the_animation_and_the_windows_through_the_api(client, sampler):
    values = dict(app.preset(1024, 512, 1024), **FAST, negative_prompt="blurry")
    gallery, seed, summary, sheet, animation, windows, caption = generate(client, look_inside=True, **values)
    request = app.parse_request(values, sampler)
    assert app.look_inside_steps(request.knobs["num_inference_steps"]) == "all"
    direct = pca.record_scores(sampler, request.prompt, request.negative_prompt, width=1024, height=512, seed=7,
                               progress=False, **request.knobs)
    # The image is the one the option leaves alone, and the pictures are those of its own recording.
    assert np.array_equal(np.asarray(png(gallery[0])), np.asarray(direct.image)) and len(gallery) == 1
    sheet_png = Image.open(sheet)
    assert sheet_png.format == "PNG" and np.array_equal(np.asarray(sheet_png), np.asarray(pca.contact_sheet(direct)))
    steps = frames(animation)
    assert len(steps) == 3 == len(direct.steps)  # T = 3: every step
    assert np.array_equal(steps[0], np.asarray(pca.contact_sheet(direct, steps=[0])))
    overlay = Image.open(windows)
    assert overlay.width == 1024 and overlay.height > 512  # the image, and the legend strip below it
    expected = pca.window_overlay(direct.image, direct.views, direct.reference_size, direct.vae_scale_factor)
    assert np.array_equal(np.asarray(overlay), np.asarray(expected))
    meta = record(sheet_png)
    assert (meta["image"], meta["seed"], meta["pca_basis"], meta["pca_steps"]) == ("sheet", seed, "shared", [0, 1, 2])
    assert record(overlay)["image"] == "windows" and not [v for v in meta.values() if str(v).startswith("/")]
    assert caption.startswith("Top row: the model's guess") and "reference size, 1024x512 px" in caption
    assert "animation shows all 3 steps" in caption and "look inside: pictures drawn in" in summary


def test_look_inside_is_off_by_default_and_older_positional_calls_still_work(client):
    names = app.TextToImageApp.api_inputs()
    assert names[-1] == "look_inside"  # appended: a positional call without it means what it meant before
    values = {**FAST, **app.preset(1024, 512, 1024), "negative_prompt": "", "compare_plain": False,
              "view_batch_size": 16, "low_vram": False}
    gallery, seed, summary, *look_inside = client.predict(*[values[n] for n in names[:-1]], api_name="/generate")
    assert png(gallery[0]).size == (1024, 512) and seed == 7 and "look inside" not in summary
    assert look_inside == [None, None, None, ""]
    *_, sheet, animation, windows, caption = generate(client, look_inside=False)
    assert (sheet, animation, windows, caption) == (None, None, None, "")


def test_without_look_inside_the_sampler_is_called_as_before(sampler, monkeypatch, tmp_path):
    """No recorder, no pt output, no copy: the sampler gets the progress callback alone; with the option the
    recorder sits in front of it, and the image is the same bit for bit."""
    calls = []
    real_generate = sampler.generate
    monkeypatch.setattr(sampler, "generate", lambda *args, **kwargs: calls.append(kwargs) or real_generate(*args,
                                                                                                         **kwargs))
    recordings, real_record = [], pca._StepRecorder.record
    monkeypatch.setattr(pca._StepRecorder, "record", lambda self, step, *args, **kwargs: recordings.append(step)
                        or real_record(self, step, *args, **kwargs))
    outputs = app.OutputFolders(parent=str(tmp_path))
    values = dict(FAST, negative_prompt="blurry", num_inference_steps=2)
    images = {}
    for look_inside in (False, True):
        request = app.parse_request(dict(values, look_inside=look_inside), sampler)
        with outputs.request() as file:
            gallery, *_, caption = app.run_generation(sampler, request, file)
        images[look_inside] = np.asarray(Image.open(gallery[0][0]))
        assert (caption == "") is (not look_inside)
        if not look_inside:
            assert recordings == []
    off, on = calls
    assert set(off) == {"height", "width", "seed", "view_batch_size", "progress", "callback_on_step_end",
                        "callback_on_stage", *request.knobs}
    assert off["callback_on_step_end"].__qualname__ == "RunProgress.steps.<locals>.on_step"
    assert on["output_type"] == "pt" and recordings == [0, 1]  # the recorder's callback ran at every step
    monkeypatch.undo()
    reference, _ = sampler("a lighthouse at dusk", "blurry", height=512, width=1024, seed=7, num_inference_steps=2,
                           progress=False, **{k: v for k, v in request.knobs.items() if k != "num_inference_steps"})
    assert np.array_equal(images[False], np.asarray(reference[0])) and np.array_equal(images[True], images[False])


def test_look_inside_files_are_stored_once_in_the_request_folder_and_bounded(sampler, tiny_sdxl_path,
                                                                             examples_cache):
    outputs = app.OutputFolders()
    with served(app.TextToImageApp(sampler, preview_every=0, outputs=outputs)) as (_, url):
        values = {**FAST, **app.preset(1024, 512, 1024), "negative_prompt": "", "compare_plain": False,
                  "view_batch_size": 16, "low_vram": False, "num_inference_steps": 2, "look_inside": True}
        body = json.dumps({"data": [values[name] for name in app.TextToImageApp.api_inputs()]})
        gallery, _, summary, sheet, animation, windows, caption = final_data(call_raw(url, body))
        paths = [gallery[0]["image"]["path"], sheet["path"], animation["path"], windows["path"]]
        (folder,) = {os.path.dirname(path) for path in paths}  # one request, one folder, served from there
        assert os.path.dirname(folder) == outputs.root
        assert sorted(os.listdir(folder)) == sorted(os.path.basename(path) for path in paths)
        assert stored_bytes(outputs) == sum(os.path.getsize(path) for path in paths)  # all counted in the cap
        for path in (sheet["path"], windows["path"]):
            text = " ".join(Image.open(path).text.values())
            assert os.path.dirname(tiny_sdxl_path) not in text and outputs.root not in text
        for text in (caption, summary):
            assert app.scrub_paths(text) == text and outputs.root not in text
        outputs.max_bytes = stored_bytes(outputs) + 1  # the next request's files push this one out, all of them
        generate(Client(url, verbose=False), num_inference_steps=2, look_inside=True)
        assert not os.path.exists(folder) and len(os.listdir(outputs.root)) == 1
    outputs.remove()


def test_look_inside_records_at_most_26_steps():
    assert app.look_inside_steps(25) == "all" and app.look_inside_steps(3) == "all"
    for T, count in ((26, 14), (50, 26), (150, 26), (1000, 26)):
        assert len(pca.parse_steps_to_keep(app.look_inside_steps(T), T)) == count, T


def test_gpu_duration_adds_the_look_inside_drawing():
    base = dict(width=1024, height=1024, num_inference_steps=50, resampling_steps=0, patch_size=64, repaint=True)
    samples = 100  # 1024², R = 0: a plain image's 2 samples per step
    assert app.estimate_gpu_seconds(base, 1024) == int(20 + 1.2 * samples * app.UNET_SAMPLE_SECONDS)
    assert app.estimate_gpu_seconds(dict(base, look_inside=False), 1024) == app.estimate_gpu_seconds(base, 1024)
    drawing = 2 + 0.75 * 1024 * 1024 / 1e6  # benchmarks/RESULTS.md#look-inside-drawing-cpu
    assert app.estimate_gpu_seconds(dict(base, look_inside=True), 1024) == int(
        20 + 1.2 * (samples * app.UNET_SAMPLE_SECONDS + drawing))
    big = dict(base, width=2048, height=2048, resampling_steps=10)
    assert app.estimate_gpu_seconds(dict(big, look_inside=True), 1024) == int(
        20 + 1.2 * (2782 * app.UNET_SAMPLE_SECONDS + 2 + 0.75 * 2048 * 2048 / 1e6))
    # The durations docs/app.md quotes with the option on: 1024² at the defaults and 2048² with its preset.
    assert [app.estimate_gpu_seconds(dict(width=w, height=h, look_inside=True), 1024)
            for w, h in ((1024, 1024), (2048, 2048))] == [25, 82]
