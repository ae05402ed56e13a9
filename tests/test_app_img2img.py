"""The ControlNet image-to-image demo (`app_gradio_img2img.py`) end to end on tiny random models, on the CPU.

A tiny SDXL, a tiny ControlNet (random output layers, so it reacts to the condition) and a tiny depth model
are saved to temporary folders and loaded as a user loads real ones. The app is launched in-process and
driven through `gradio_client` with the shipped photograph, as an API user would. What the text-to-image
demo shares with it (queue, knob validation, cancel, previews, ZeroGPU) is tested in `test_app.py`.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app_gradio as text_app  # noqa: E402
import app_gradio_img2img as app  # noqa: E402
from elastic_diffusion_w_controlnet import (DEFAULT_INPUT, ElasticDiffusionControlNet, canny_condition,  # noqa: E402
                                            fit_image, load_image)
from test_app import call_raw, final_data, free_port, served  # noqa: E402
from tiny_models import save_tiny_controlnet, save_tiny_depth_model  # noqa: E402

PHOTO = DEFAULT_INPUT  # the shipped photograph (512x512)
FAST = dict(prompt="a portrait photo of an astronaut", condition="canny", width=1024, height=512,
            num_inference_steps=2, seed=5, randomize_seed=False)


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    return save_tiny_depth_model(tmp_path_factory.mktemp("tiny_dpt"))


@pytest.fixture(scope="module")
def controlnet_path(tiny_sdxl_path, tmp_path_factory):
    return save_tiny_controlnet(tiny_sdxl_path, tmp_path_factory.mktemp("controlnet-canny"))


@pytest.fixture(scope="module")
def sampler(tiny_sdxl_path, controlnet_path, tiny_depth_model):
    return ElasticDiffusionControlNet(device="cpu", sd_version=tiny_sdxl_path, controlnet_model=controlnet_path,
                                      depth_model=tiny_depth_model)


@pytest.fixture(scope="module")
def image_to_image(sampler):
    return app.ImageToImageApp(sampler, preview_every=1)


@pytest.fixture(scope="module")
def server(image_to_image, examples_cache):
    with served(image_to_image) as (demo, url):
        yield demo, url


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False)


def generate(client, image=PHOTO, **overrides):
    return client.predict(image=handle_file(image), **dict(FAST, **overrides), api_name="/generate")


def preview(client, image=PHOTO, **overrides):
    values = dict(condition="canny", width=1024, height=512, canny_low=100, canny_high=200)
    return client.predict(image=handle_file(image), **dict(values, **overrides), api_name="/condition_preview")


def opened(path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def record(image: Image.Image) -> dict:
    return json.loads(image.text["elastic_diffusion"])


def expected_canny(width, height, low=100, high=200) -> np.ndarray:
    return np.asarray(canny_condition(fit_image(load_image(PHOTO), width, height), low, high))[:, :, 0]


def test_generate_follows_the_input_image(client):
    gallery, seed, summary, *_ = generate(client)
    assert seed == 5 and len(gallery) == 2
    image, condition_map = (opened(item["image"]) for item in gallery)
    assert image.format == "PNG" and image.size == condition_map.size == (1024, 512)
    meta = record(image)
    assert (meta["width"], meta["height"], meta["seed"], meta["num_inference_steps"]) == (1024, 512, 5, 2)
    assert meta["condition"] == "canny" and meta["controlnet_conditioning_scale"] == 0.5
    assert (meta["canny_low"], meta["canny_high"]) == (100, 200)
    assert meta["condition_image"] == "astronaut.jpg"  # the upload's own name, no server path
    assert "controlnet-canny" in meta["controlnet_model"] and not meta["controlnet_model"].startswith("/")
    assert not [value for value in meta.values() if str(value).startswith("/")]  # no server path at all
    assert "condition_image:" in image.text["parameters"]
    assert np.array_equal(np.asarray(condition_map), expected_canny(1024, 512))  # the map it followed
    assert record(condition_map)["image"] == "condition map"
    assert "Condition map (canny 100/200), 1024x512" in gallery[1]["caption"]
    assert "ControlNet" in summary and "canny 100/200" in summary and "scale 0.5" in summary


def test_the_input_image_steers_the_result(client, tmp_path):
    flat = tmp_path / "flat.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(flat)  # no edges at all
    strong = dict(controlnet_conditioning_scale=2.0)
    with_edges = np.asarray(opened(generate(client, **strong)[0][0]["image"]), dtype=np.float32)
    without = np.asarray(opened(generate(client, image=str(flat), **strong)[0][0]["image"]), dtype=np.float32)
    assert np.abs(with_edges - without).mean() > 0.1  # same seed and prompt: only the condition differs


def test_condition_preview_is_the_binary_canny_map_at_the_output_size(client):
    edges = np.asarray(opened(preview(client)))
    assert edges.shape == (512, 1024)  # (height, width): the requested size, one grey channel
    assert set(np.unique(edges)) <= {0, 255} and 0 < (edges == 255).mean() < 0.5
    assert np.array_equal(edges, expected_canny(1024, 512))
    fewer = np.asarray(opened(preview(client, canny_low=250, canny_high=255)))
    assert (fewer == 255).sum() < (edges == 255).sum()
    portrait = opened(preview(client, width=512, height=768))
    assert portrait.size == (512, 768)


def test_condition_preview_of_a_ready_map_and_of_depth(client):
    ready = opened(preview(client, condition="image", width=768, height=384))
    assert ready.size == (768, 384) and ready.mode == "RGB"
    assert np.array_equal(np.asarray(ready), np.asarray(fit_image(load_image(PHOTO), 768, 384)))
    depth = opened(preview(client, condition="depth"))
    assert depth.size == (1024, 512) and np.asarray(depth).std() > 0


def test_depth_with_a_canny_controlnet_warns_and_follows_a_depth_map(client, monkeypatch):
    warnings = []
    monkeypatch.setattr(app.gr, "Warning", lambda message, *args, **kwargs: warnings.append(message))
    gallery, _, summary, *_ = generate(client, condition="depth")
    depth_map = np.asarray(opened(gallery[1]["image"]))
    assert depth_map.shape == (512, 1024) and len(np.unique(depth_map)) > 2  # grey levels, not edges
    assert record(opened(gallery[0]["image"]))["condition"] == "depth" and "depth map" in summary
    assert len(warnings) == 1 and "trained on Canny edges" in warnings[0] and "--controlnet depth" in warnings[0]


def test_previews_stream_and_cancel_frees_the_sampler(client, sampler, monkeypatch):
    long_run = dict(FAST, width=1024, height=1024, num_inference_steps=150, resampling_steps=0, rrg_init_weight=0)
    finished = threading.Event()  # set when the run ends (`finish_run` runs after a cancel too)
    monkeypatch.setattr(sampler, "finish_run", lambda run, end=sampler.finish_run: (end(run), finished.set()))
    job = client.submit(image=handle_file(PHOTO), **long_run, api_name="/generate")
    deadline = time.monotonic() + 60
    while not any(isinstance(out[0], list) for out in job.outputs()):  # the first preview: denoising runs
        assert time.monotonic() < deadline and not job.done(), "no preview arrived"
        time.sleep(0.05)
    preview_item = next(out[0] for out in job.outputs() if isinstance(out[0], list))[0]
    assert preview_item["caption"].startswith("Preview, step")
    job.cancel()
    assert finished.wait(15), "the sampler kept running after the cancel"
    assert opened(generate(client)[0][0]["image"]).size == (1024, 512)


def zero_size_png() -> bytes:
    """A PNG whose header declares 0x0 pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def huge_png() -> bytes:
    """A PNG that declares 10,000 x 10,000 pixels (100 MP) but holds almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def corrupt_qoi() -> bytes:
    """A QOI header (a format Pillow reads) over data whose decoder raises IndexError."""
    return (b"qoif" + struct.pack(">IIBB", 16, 16, 3, 0) + bytes([0xFE, 1, 2, 3]) + bytes([0x3F] * 40)
            + bytes([0xFD] * 3) + b"\x00" * 7 + b"\x01")


def small_bmp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="BMP")
    return buffer.getvalue()


BAD_FILES = [
    ("corrupt.jpg", b"this is not an image" * 20, "not a readable image"),
    ("corrupt.qoi", corrupt_qoi(), "not a readable image"),  # no decoder's own error reaches the visitor
    ("image.bmp", small_bmp(), "not a readable image file: upload a JPEG, PNG or WebP"),  # other formats refused
    ("empty.png", b"", "not a readable image"),
    ("zero.png", zero_size_png(), "not a readable image"),
    ("truncated.jpg", open(PHOTO, "rb").read()[:3000], "could not be decoded"),
    ("huge.png", huge_png(), "100 MP\\); at most 67 MP"),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[name for name, _, _ in BAD_FILES])
def test_bad_images_are_refused_by_name_then_the_app_keeps_serving(client, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    for call in (generate, preview):
        with pytest.raises(AppError, match=f"Input image.*{name}.*{message}") as error:
            call(client, image=str(path))
        assert str(tmp_path) not in str(error.value) and "/tmp/gradio" not in str(error.value)
    assert opened(preview(client)).size == (1024, 512)
    if name == BAD_FILES[0][0]:  # one full generation after an error is enough
        assert opened(generate(client)[0][0]["image"]).size == (1024, 512)


# --------------------------------------------------------------------------------------------------
# A stranger's requests: only uploaded files are read, nothing stalls the queue
# --------------------------------------------------------------------------------------------------

FILE_META = {"_type": "gradio.FileData"}
PREVIEW_ARGS = ["canny", 512, 512, 100, 200]


@pytest.fixture
def hostile_paths(image_to_image):
    """Paths a stranger may send: server files, planted links and pipes, folders, another request's output."""
    upload_folder = image_to_image.upload_roots[0]
    planted = tempfile.mkdtemp(prefix="planted_", dir=upload_folder)  # as if written there by someone else
    os.mkfifo(os.path.join(planted, "fifo.png"))  # opening it for reading would wait for a writer forever
    os.symlink(PHOTO, os.path.join(planted, "link.png"))  # a link out of the upload folder
    read_end, write_end = os.pipe()  # a pipe the server process (this one) holds
    paths = {
        "a server image": PHOTO, "a missing file": "/no/such/image.png", "a server file": "/etc/hostname",
        "a FIFO": os.path.join(planted, "fifo.png"), "a symlink out": os.path.join(planted, "link.png"),
        "a pipe held by the server": f"/proc/self/fd/{read_end}", "a folder": planted,
        "the upload folder": upload_folder, "a way out": os.path.join(upload_folder, "..", "..", PHOTO[1:]),
    }
    yield paths
    os.close(read_end)
    os.close(write_end)
    shutil.rmtree(planted)


def timed_raw(url, endpoint, data):
    started = time.monotonic()
    stream = call_raw(url, json.dumps({"data": data}), endpoint, timeout=20)
    return stream, time.monotonic() - started


def test_only_uploaded_files_are_read_with_one_message_within_seconds(server, hostile_paths, image_to_image):
    url, paths = server[1], hostile_paths
    a_result = final_data(call_raw(url, json.dumps({"data": [{"path": uploaded(url), "orig_name": "a.jpg",
                                                             "meta": FILE_META}, *PREVIEW_ARGS]}),
                                   "condition_preview"))[0]["path"]
    assert a_result.startswith(image_to_image.outputs.root)  # an output of this app is not an upload either
    paths["another request's output"] = a_result
    without_meta, with_meta = {}, {}
    for name, path in paths.items():
        stream, seconds = timed_raw(url, "condition_preview", [{"path": path}, *PREVIEW_ARGS])
        assert seconds < 5, name
        without_meta[name] = stream.split("data: ", 1)[-1].strip()
        stream, seconds = timed_raw(url, "condition_preview", [{"path": path, "meta": FILE_META}, *PREVIEW_ARGS])
        assert seconds < 5 and "event: error" in stream, name
        with_meta[name] = stream.split("data: ", 1)[-1].strip()
    # One message, whatever the path and whether it exists: nothing to learn about the server's files.
    ours = json.dumps(dict(error=app.UPLOAD_REFUSED, duration=10, visible=True, title="Error"))
    assert set(without_meta.values()) == {ours}, without_meta
    # With `meta`, Gradio refuses paths outside its upload folder itself (no message); the rest reach the app.
    assert set(with_meta.values()) <= {ours, json.dumps(dict(error=None))}, with_meta
    assert with_meta["a missing file"] == with_meta["a server image"] == with_meta["a server file"]
    names = app.ImageToImageApp.api_inputs()  # the order in which positional clients send them
    values = {**FAST, **text_app.preset(1024, 512, 1024), "negative_prompt": "", "controlnet_conditioning_scale": 0.5,
              "view_batch_size": 16, "low_vram": False, "canny_low": 100, "canny_high": 200, "look_inside": False,
              "strength": 1.0}
    for name in ("a server image", "a FIFO", "a pipe held by the server", "a symlink out"):  # /generate alike
        stream, seconds = timed_raw(url, "generate", [{"path": paths[name]}] + [values[n] for n in names[1:]])
        assert seconds < 5 and app.UPLOAD_REFUSED in stream, name
    client = Client(url, verbose=False)  # gradio_client sends a plain dict as it is: refused the same way
    with pytest.raises(AppError, match="must be an image file uploaded to this app"):
        client.predict(image={"path": PHOTO}, **dict(condition="canny", width=512, height=512, canny_low=100,
                                                     canny_high=200), api_name="/condition_preview")
    assert opened(preview(client)).size == (1024, 512)  # and the next, normal requests are served
    assert opened(generate(client)[0][0]["image"]).size == (1024, 512)


def test_an_uploads_name_from_the_client_is_cut_to_a_bound(tmp_path):
    """The name comes from the client's payload and goes into every PNG's metadata: bounded."""
    (tmp_path / "a.jpg").write_bytes(b"bytes")
    data, name = app.read_upload({"path": str(tmp_path / "a.jpg"), "orig_name": "n" * 5000 + ".jpg"},
                                      [str(tmp_path)])
    assert data == b"bytes" and name == "n" * app.MAX_NAME_CHARS
    assert app.read_upload({"path": str(tmp_path / "a.jpg"), "orig_name": "../../x/photo.jpg"},
                                [str(tmp_path)])[1] == "photo.jpg"


def test_uploads_come_one_bounded_file_a_request_and_are_bounded_in_all(tmp_path, monkeypatch):
    """As `serve` runs the app (the command line's path): Gradio limits each file, but a request may carry
    many, and its sweep removes uploads by age only; the app refuses a request body larger than one file and
    keeps all uploads under --max-uploads-mb, the oldest going first, the page's own files staying."""
    import http.client

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # private_storage makes its folder there
    sigterm = signal.getsignal(signal.SIGTERM)
    outputs = text_app.private_storage(64)
    folder = os.path.dirname(outputs.root)
    port = free_port()
    args = app.build_parser().parse_args(["--model", "/no/model", "--port", str(port), "--max-uploads-mb", "1"])
    demo = app.ImageToImageApp(None, "no model", outputs=outputs).build()
    own = set(os.listdir(folder))  # what building the page stored (the example's image)
    server = threading.Thread(target=app.serve, args=(demo, args, outputs),
                              kwargs=dict(max_file_size=600 * 2 ** 10), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while not demo.is_running or not getattr(demo, "local_url", None):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        paths = []
        for n in range(3):  # 400 KB each, different bytes: three folders of Gradio's cache
            source = tmp_path / f"upload{n}.jpg"
            source.write_bytes(bytes([n]) * 400 * 2 ** 10)
            paths.append(uploaded(url, str(source)))
        assert not os.path.exists(paths[0]) and os.path.exists(paths[1]) and os.path.exists(paths[2])
        uploads = [e.path for e in os.scandir(folder) if e.name not in own and e.path != outputs.root]
        assert sum(os.path.getsize(os.path.join(d, f)) for d in uploads for f in os.listdir(d)) <= 2 ** 20
        assert own <= set(os.listdir(folder))  # the page's own files stay
        stored = set(os.listdir(folder))
        big = tmp_path / "big.jpg"  # the server reads (and drops) this much of a refused body: the client gets the 413
        big.write_bytes(b"x" * 700 * 2 ** 10)
        with pytest.raises(urllib.error.HTTPError) as refused:
            uploaded(url, str(big))
        assert refused.value.code == 413 and refused.value.read() == b"Upload one file of at most 600 KB."
        big.write_bytes(b"x" * 4 * 2 ** 20)  # more than it reads: it may close the connection under the client
        with pytest.raises((urllib.error.URLError, ConnectionError)) as refused:
            uploaded(url, str(big))
        error = refused.value
        assert (error.code == 413 if isinstance(error, urllib.error.HTTPError) else
                isinstance(getattr(error, "reason", error), ConnectionError)), error
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # no Content-Length: chunked
        connection.putrequest("POST", "/gradio_api/upload")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.putheader("Content-Type", "multipart/form-data; boundary=x")
        connection.endheaders()
        connection.send(b"5\r\nhello\r\n0\r\n\r\n")
        response = connection.getresponse()
        assert response.status == 413 and response.read() == b"Upload one file of at most 600 KB."
        connection.close()
        assert set(os.listdir(folder)) == stored  # nothing refused was stored
    finally:
        demo.close()
        server.join(30)
        signal.signal(signal.SIGTERM, sigterm)
    assert not server.is_alive() and not os.path.exists(outputs.root)


def test_a_refused_upload_body_is_read_at_most_a_limit_more_for_a_short_while(monkeypatch):
    """Before its 413, UploadLimits drops at most another limit's worth of a refused body, for at most
    DRAIN_SECONDS: an endless body or a stalled client is cut off, and none of it reaches Gradio (app=None)."""
    import asyncio

    monkeypatch.setattr(app, "DRAIN_SECONDS", 0.5)
    limits = app.UploadLimits(None, "", set(), max_file_size=2 ** 20, max_bytes=0)
    scope = dict(type="http", method="POST", path="/gradio_api/upload", headers=[(b"content-length", b"9" * 12)])
    for stall in (False, True):
        read, sent = [], []

        async def receive():
            await asyncio.sleep(0)  # as a server's receive does: the event loop runs (and may time out)
            if stall and read:  # a client that sends no more for 3 s
                await asyncio.sleep(3)
                return {"type": "http.request", "body": b"", "more_body": False}
            read.append(2 ** 16)
            return {"type": "http.request", "body": bytes(2 ** 16), "more_body": True}

        async def send(message):
            sent.append(message)

        started = time.monotonic()
        asyncio.run(limits(scope, receive, send))
        assert sent[0]["status"] == 413 and sent[1]["body"] == b"Upload one file of at most 1 MB."
        assert len(read) == 1 if stall else limits.max_body < sum(read) <= limits.max_body + 2 ** 16
        assert time.monotonic() - started < 2


def uploaded(url: str, source: str = PHOTO) -> str:
    """Upload a file through Gradio's route, as the page does; returns its path on the server."""
    boundary = "elastic-diffusion-test"
    content = open(source, "rb").read()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return json.load(urllib.request.urlopen(request, timeout=10))[0]


def test_a_stalled_decode_times_out_and_the_app_keeps_serving(client, monkeypatch, tmp_path):
    real_load = app.ed.load_image

    def stalled(*args, **kwargs):
        time.sleep(3)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(app, "DECODE_SECONDS", 0.5)
    monkeypatch.setattr(app.ed, "load_image", stalled)
    slow = tmp_path / "slow.png"
    Image.new("RGB", (32, 32), (10, 20, 30)).save(slow)  # new content: not in the decoded-image cache
    started = time.monotonic()
    with pytest.raises(AppError, match="Decoding input image 'slow.png' took longer than 0.5 s"):
        preview(client, image=str(slow))
    assert time.monotonic() - started < 2.5
    monkeypatch.undo()
    assert opened(preview(client)).size == (1024, 512)


def test_depth_without_its_model_fails_fast_once_with_advice_and_clears_the_map(sampler, monkeypatch):
    no_depth = ElasticDiffusionControlNet.from_pipe(sampler.pipe, controlnet_model=sampler.controlnet,
                                                    depth_model="nobody/no-such-dpt")
    loads = []
    real = no_depth.depth_estimator
    monkeypatch.setattr(no_depth, "depth_estimator", lambda: loads.append(1) or real())
    warnings = []
    monkeypatch.setattr(app.gr, "Warning", lambda message, *args, **kwargs: warnings.append(message))
    page = app.ImageToImageApp(no_depth)
    upload = tempfile.mkdtemp(dir=page.upload_roots[0])
    photo = {"path": shutil.copy(PHOTO, upload), "orig_name": "astronaut.jpg"}
    try:
        assert page.preview(photo, "canny", 2048, 1024, 100, 200) is not None
        for _ in range(2):
            started = time.monotonic()
            assert page.preview(photo, "depth", 2048, 1024, 100, 200) is None  # cleared, not the old map
            assert time.monotonic() - started < 5
        with pytest.raises(app.gr.Error, match="--depth-model"):
            next(page.generate(image=photo, prompt="p", negative_prompt="", condition="depth", width=1024, height=512,
                               seed=0, randomize_seed=False, num_inference_steps=2, resampling_steps=0))
    finally:
        shutil.rmtree(upload)
    assert len(loads) == 1  # tried once, then said at once
    assert len(warnings) == 2 and warnings[0] == warnings[1]
    assert "`nobody/no-such-dpt` could not be loaded" in warnings[0] and "--depth-model /path/to" in warnings[0]


def test_the_pages_live_map_is_size_bounded_and_written_to_the_outputs(image_to_image):
    upload = tempfile.mkdtemp(dir=image_to_image.upload_roots[0])
    photo = {"path": shutil.copy(PHOTO, upload), "orig_name": "astronaut.jpg"}
    try:
        path = image_to_image.preview(photo, "canny", 2048, 1024, 100, 200)
    finally:
        shutil.rmtree(upload)
    assert opened(path).size == (1024, 512) and path.startswith(image_to_image.outputs.root)


BAD_CONTROLS = [
    (dict(condition="sketch"), "Condition must be one of 'refine'"),
    (dict(condition="refine", strength=1.5), "Strength must be between 0 and 1; got 1.5"),
    (dict(controlnet_conditioning_scale=5), "ControlNet scale must be between 0.1 and 2"),
    (dict(canny_low=210, canny_high=200), "Canny low threshold \\(210\\) must not be above"),
    (dict(canny_high=300), "Canny high threshold must be between 0 and 255"),
    (dict(width=1001), "multiple of 8"),
    (dict(prompt=""), "Prompt is empty"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONTROLS, ids=[str(sorted(o)) for o, _ in BAD_CONTROLS])
def test_bad_settings_give_actionable_errors(client, overrides, message):
    with pytest.raises(AppError, match=message):
        generate(client, **overrides)


def test_missing_image_is_explained(server):
    client = Client(server[1], verbose=False)
    for endpoint, values in (("/generate", FAST), ("/condition_preview", dict(condition="canny"))):
        with pytest.raises(AppError, match="Input image is missing"):
            client.predict(image=None, **values, api_name=endpoint)


def test_the_example_is_wired_lazily(server, examples_cache, controlnet_path):
    page = urllib.request.urlopen(server[1] + "config").read().decode()
    assert f"ControlNet: `{os.path.basename(controlnet_path)}`" in page  # by its folder's name:
    assert controlnet_path not in page  # no server paths on the page
    config = json.loads(page)
    datasets = [c for c in config["components"] if c.get("type") == "dataset"]
    assert len(datasets) == 1
    row, upscale = datasets[0]["props"]["samples"]
    assert row[0]["orig_name"] == upscale[0]["orig_name"] == "astronaut.jpg"  # the shipped photograph
    assert row[1:] == [app.EXAMPLE_PROMPT, "blurry, ugly, poorly drawn, deformed", "canny", 1.0, 1536, 1536, 7, 0.3,
                       1000, 0, False]
    assert upscale[3:7] == ["refine", 0.4, 1024, 1024]  # twice the 512 px photograph, refined
    assert [f for _, _, files in os.walk(examples_cache) for f in files] == []  # nothing generated at start-up
    names = {d.get("api_name") for d in config["dependencies"]}
    assert {"generate", "condition_preview", "recommended_settings"} <= names


def test_the_example_runs_through_the_lazy_cache_with_its_own_settings(server, image_to_image, sampler, monkeypatch):
    calls = []
    real_generate = sampler.generate

    def short(*args, **kwargs):  # record what the example asks for, then run it short
        calls.append(kwargs)
        return real_generate(*args, **dict(kwargs, num_inference_steps=2, resampling_steps=0))

    monkeypatch.setattr(sampler, "generate", short)
    gallery, seed, summary, *_ = image_to_image.examples.load_from_cache(0)  # what the first click does
    asked = calls[0]
    assert (asked["width"], asked["height"], asked["seed"], seed) == (1536, 1536, 0, 0)
    assert (asked["resampling_steps"], asked["new_p"], asked["rrg_init_weight"]) == (7, 0.3, 1000)
    assert (asked["condition"], asked["controlnet_conditioning_scale"]) == ("canny", 0.5)
    assert (asked["num_inference_steps"], asked["guidance_scale"], asked["rrg_stop_t"]) == (50, 10, 0.4)
    image, condition_map = (opened(item.image.path) for item in gallery.root)
    assert image.size == condition_map.size == (1536, 1536)
    assert record(image)["negative_prompt"] == app.ImageToImageApp.example_rows[0][2]
    assert record(image)["condition_image"] == "astronaut.jpg" and "canny 100/200" in summary


def test_zero_gpu_durations_count_the_controlnet_and_the_examples_presets(sampler, monkeypatch, tmp_path):
    durations = {}

    class FakeSpaces:  # what `spaces.GPU(fn, duration=callable)` receives on a ZeroGPU Space
        @staticmethod
        def GPU(fn, duration):
            durations[fn.__name__] = duration
            return fn

    monkeypatch.setattr(text_app, "spaces", FakeSpaces)
    monkeypatch.setenv("GRADIO_EXAMPLES_CACHE", str(tmp_path))
    app.ImageToImageApp(sampler).build()
    values = {**text_app.ed.recommended_settings(2048, 2048), "width": 2048, "height": 2048, "view_batch_size": 16,
              "condition": "canny"}
    unet_only = text_app.estimate_gpu_seconds(values, 1024)  # 76 s for 2048x2048 (test_app.py)
    assert durations["generate"](app.gr.Progress(), **dict(values, condition="refine", strength=1.0)) == unet_only
    assert durations["generate"](app.gr.Progress(), **values) == int(
        20 + 1.2 * 2782 * text_app.UNET_SAMPLE_SECONDS * app.CONTROLNET_COST) > unet_only
    # The example's handler takes only some knobs: the others are the size's preset, not a 30 s guess.
    example = durations["generate_example"](*app.ImageToImageApp.example_rows[0])
    preset = {**text_app.ed.recommended_settings(1536, 1536), "width": 1536, "height": 1536}
    assert example == text_app.estimate_gpu_seconds(preset, 1024, app.CONTROLNET_COST) > 30
    assert text_app.estimate_gpu_seconds(dict(width=2048, height=2048), 1024) == unet_only


def test_command_line_shares_the_text_apps_flags(monkeypatch, tiny_sdxl_path, tmp_path):
    args = app.build_parser().parse_args(["--model", tiny_sdxl_path, "--controlnet", "depth", "--depth-model", "dpt",
                                          "--port", "7861", "--share", "--low-vram", "--condition", "depth"])
    assert (args.model, args.controlnet, args.depth_model, args.port) == (tiny_sdxl_path, "depth", "dpt", 7861)
    assert args.share and args.low_vram and args.condition == "depth"
    base_flags = {a.dest for a in text_app.build_parser()._actions}
    assert base_flags <= {a.dest for a in app.build_parser()._actions}
    options = [" ".join(chunk.split()) for chunk in app.build_parser().format_help().split("\n  -")[1:]]
    assert all(option.count("(default") <= 1 for option in options)  # one default per --help entry

    launched = {}
    monkeypatch.setattr(app.base, "serve", lambda demo, args, outputs, **kwargs: launched.update(
        kwargs, demo=demo, outputs=outputs))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # main() keeps its files in a private folder there
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        app.main(["--model", "/nonexistent/model", "--controlnet", "canny", "--port", str(free_port())])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert launched["max_file_size"] == app.MAX_UPLOAD_BYTES and isinstance(launched["demo"], app.gr.Blocks)
    assert os.path.dirname(os.path.dirname(launched["outputs"].root)) == str(tmp_path)


def test_without_a_model_the_page_explains_and_canny_previews_still_work():
    args = app.build_parser().parse_args(["--model", "/nonexistent/model/folder"])
    sampler, message = text_app.load_sampler(args, ElasticDiffusionControlNet, app_file=app.APP_FILE)
    assert sampler is None and "python app_gradio_img2img.py --model /path/to/diffusers/folder" in message
    with served(app.ImageToImageApp(None, message)) as (_, url):
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="--model /path/to/diffusers/folder"):
            generate(client)
        assert opened(preview(client)).size == (1024, 512)  # Canny needs no model


def test_the_guide_menu_starts_at_refine_and_knows_the_controlnets_type(sampler):
    assert app.trained_condition(sampler.controlnet_model) == "canny"  # a folder named after its condition
    assert app.trained_condition("someone/controlnet-scribble") is None
    page = app.ImageToImageApp(sampler)
    assert (page.default_condition, page.controlnet_condition) == ("refine", "canny")
    assert app.ImageToImageApp(sampler, default_condition="depth").default_condition == "depth"


def test_refine_starts_from_the_picture_without_a_controlnet(client, tmp_path):
    gallery, seed, summary, *_ = generate(client, condition="refine", strength=0.5, width=768, height=768)
    assert len(gallery) == 1  # no condition map: the picture itself guides the run
    image = opened(gallery[0]["image"])
    meta = record(image)
    assert image.size == (768, 768) and (meta["strength"], meta["upscale"]) == (0.5, 1)
    assert "condition" not in meta and "controlnet_model" not in meta and len(meta["image_hash"]) == 16
    assert not [value for value in meta.values() if str(value).startswith("/")]
    assert "started from the input image at strength 0.5 (its last 1 of 2 steps)" in summary
    # The picture steers it: a grey picture gives another image with the same seed; strength 0 runs no step.
    grey = tmp_path / "grey.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(grey)
    other = opened(generate(client, image=str(grey), condition="refine", strength=0.5, width=768, height=768)[0][0]
                   ["image"])
    assert np.abs(np.asarray(other, dtype=np.float32) - np.asarray(image, dtype=np.float32)).mean() > 1
    _, _, untouched, *_ = generate(client, condition="refine", strength=0.0, width=768, height=768)
    assert "**0 UNet evaluations**" in untouched


def test_a_controlnet_guide_below_strength_one_starts_from_the_picture(client):
    gallery, *_ = generate(client, strength=0.5)
    meta = record(opened(gallery[0]["image"]))
    assert meta["strength"] == 0.5 and meta["condition"] == "canny"
    assert "strength" not in record(opened(generate(client)[0][0]["image"]))  # 1, the default: from noise


def test_upscale_doubles_the_pictures_size_within_the_models_limit(image_to_image, tmp_path):
    assert image_to_image.doubled_size({"path": _uploaded(PHOTO)}) == (1024, 1024)  # 512 px photo
    wide = tmp_path / "wide.png"
    Image.new("RGB", (1500, 1000)).save(wide)
    assert image_to_image.doubled_size({"path": _uploaded(str(wide))}) == (2048, 1360)  # 2048 px at most (SDXL)


def _uploaded(path: str) -> str:
    """A copy of `path` in Gradio's upload folder, where the app reads uploads from."""
    folder = tempfile.mkdtemp(dir=app.gr.utils.get_upload_folder())
    return shutil.copy(path, folder)


def test_the_gpu_reservation_follows_the_guide_and_the_strength(image_to_image):
    big = dict(width=2048, height=2048, num_inference_steps=50)
    canny = image_to_image.gpu_seconds(dict(big, condition="canny"))
    refine = image_to_image.gpu_seconds(dict(big, condition="refine", strength=0.5))
    assert refine < image_to_image.gpu_seconds(dict(big, condition="refine", strength=1.0)) < canny
    assert refine == text_app.estimate_gpu_seconds(dict(big, strength=0.5), 1024)
    assert text_app.estimate_gpu_seconds(dict(big, strength=0), 1024) == 20  # no UNet step: the fixed margin only


def test_a_base_model_app_loads_its_controlnet_on_the_first_canny_run(tiny_sdxl_path, controlnet_path, tmp_path):
    base = text_app.ed.ElasticDiffusion(device="cpu", sd_version=tiny_sdxl_path)
    page = app.ImageToImageApp(base, controlnet=controlnet_path)
    assert page._controlnet is None and "loaded on the first canny or depth run" in page.model_note()
    values = dict(FAST, image={"path": _uploaded(PHOTO)})
    refined = list(page.stream(dict(values, condition="refine"), None))[-1]
    assert page._controlnet is None and len(refined[0]) == 1  # refine needs no ControlNet
    followed = list(page.stream(values, None))[-1]
    assert page._controlnet is not None and page._controlnet.unet is base.unet  # one copy of the UNet
    assert len(followed[0]) == 2  # the image and its condition map
    broken = app.ImageToImageApp(base, controlnet=str(tmp_path / "missing"))
    with pytest.raises(app.gr.Error, match="choose Refine"):
        list(broken.stream(values, None))
    assert len(list(broken.stream(dict(values, condition="refine"), None))[-1][0]) == 1


def test_look_inside_works_through_the_controlnet_demo(client):
    """The option is the text-to-image demo's (the same request path and outputs), recorded through the ControlNet
    sampler: the image is the one without it, and the pictures carry the ControlNet's settings."""
    gallery, seed, summary, *look_inside = generate(client)
    assert look_inside == [None, None, None, ""]
    looked, _, summary, sheet, animation, windows, caption = generate(client, look_inside=True)
    assert np.array_equal(np.asarray(opened(looked[0]["image"])), np.asarray(opened(gallery[0]["image"])))
    assert len(looked) == 2 and "look inside: pictures drawn in" in summary and caption.startswith("Top row")
    meta = record(opened(sheet))
    assert (meta["image"], meta["condition"], meta["condition_image"], meta["pca_steps"]) == (
        "sheet", "canny", "astronaut.jpg", [0, 1])
    assert opened(windows).width == 1024 and opened(animation).n_frames == 2


def test_progress_names_the_controlnets_own_stage():
    """The condition map is the ControlNet sampler's stage: the image demo names it, the text demo does not know it."""
    shown = []
    run = text_app.RunProgress(lambda done_total, desc: shown.append(desc), stage_names=app.ImageToImageApp.stage_names)
    run.stage("condition", 0, 1)
    run.stage("encode_prompt", 0, 1)
    assert shown == ["Making the condition map", "Encoding the prompt"] and "condition" not in text_app.STAGE_NAMES
