"""ElasticDiffusion image-to-image demo (Gradio): refine or upscale a picture, or follow its edges or depth with a
ControlNet (loaded on its first use); docs/app.md says what it offers.

The text-to-image demo (`app_gradio.py`) plus the input image, its guide and a live view of it, and what taking
uploads needs (`read_upload`, `UploadLimits`, `serve`).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import io
import os
import stat
import threading
import time
from typing import Sequence

import gradio as gr
import starlette.middleware
from PIL import Image
from starlette.responses import PlainTextResponse

import app_gradio as base
import elastic_diffusion as ed
import elastic_diffusion_w_controlnet as edc

APP_FILE = "app_gradio_img2img.py"
CONDITION_CHOICES = [("Refine: the picture itself (no ControlNet)", "refine"), ("Canny edges", "canny"),
                     ("Depth map", "depth"), ("My own edge or depth map", "image")]
STRENGTH = {"refine": ed.DEFAULT_STRENGTH, "canny": 1.0, "depth": 1.0, "image": 1.0}  # the slider's start per guide
STRENGTH_KNOB = ed.Knob("strength", float, ed.DEFAULT_STRENGTH, "how much of the picture to redo: 0 keeps it, 1 redoes "
                        "every step (with a ControlNet: starts from noise); the time grows with it", "Strength",
                        minimum=0, maximum=1, step=0.05)
CONDITION_NAMES = {"canny": "Canny edges", "depth": "a depth map"}  # what a ControlNet may have been trained on
CONTROLNET_COST = 1.5  # a UNet sample plus its ControlNet (an encoder copy), relative to the UNet alone
MAX_NAME_CHARS = 200  # an uploaded file's name as the client gave it, cut to this (it goes into metadata)
MAX_UPLOAD_BYTES = 50 * 2 ** 20  # the most an input file may hold; larger uploads are refused before decoding
MAX_UPLOADS_MB = 1024  # all uploads together; beyond it the oldest go first (--max-uploads-mb)
MULTIPART_OVERHEAD = 64 * 2 ** 10  # what an upload request adds to its one file (boundaries, headers)
DRAIN_SECONDS = 5  # how long a refused upload's body is read (and dropped) at most
READ_SECONDS = 10  # reading one uploaded file
DECODE_SECONDS = 30  # decoding one uploaded image (at most 64 MP)
UPLOAD_REFUSED = ("Input image must be an image file uploaded to this app: upload it again (from Python, pass "
                  "gradio_client.handle_file('photo.jpg')).")
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow's names (its JPEG reader also opens phones' MPO files)
IMAGE_CACHE_SIZE = 4  # decoded input images kept for the previews and the next generation
DEPTH_SECONDS = 120  # loading the depth model from disk, or estimating one depth map
PREVIEW_MAX_SIDE = 1024  # the page's live condition map (shown 360 px high); the API's is full size
KNOB_DEFAULTS = {**{row.name: row.default for row in edc.CONTROLNET_KNOBS},
                 "controlnet_conditioning_scale": edc.DEMO_SCALE}
PREVIEW_INPUTS = ("image", "condition", "width", "height", "canny_low", "canny_high")  # /condition_preview's

# The examples: the official prompt and settings with the shipped photograph, and a 2x upscale of it.
EXAMPLE_PROMPT = "Envision a dramatic photo of the joker, masterpiece, high quality."
UPSCALE_PROMPT = "A portrait photo of a smiling astronaut in an orange spacesuit, highly detailed, sharp"


def trained_condition(controlnet_model) -> str | None:
    """'canny' or 'depth' for the default ControlNets (their ids name their condition) and for ids or folders
    named after one; else None."""
    name = os.path.basename(os.path.normpath(str(controlnet_model))).lower()
    found = [kind for kind in ("canny", "depth") if kind in name]
    return found[0] if len(found) == 1 else None


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def read_upload(value, roots: Sequence[str], excluded: Sequence[str] = (), max_bytes: int = MAX_UPLOAD_BYTES,
                seconds: float = READ_SECONDS) -> tuple[bytes, str]:
    """The bytes and name of an uploaded file from Gradio's payload ({"path": ..., "orig_name": ...}).

    A client can send any path, so only a regular file whose real path lies inside `roots` and outside
    `excluded` is read (no link out, FIFO, device or folder), up to `max_bytes` within `seconds`; anything
    else gets UPLOAD_REFUSED, the same message whether the path exists or not.
    """
    path = value.get("path") if isinstance(value, dict) else None
    if not isinstance(path, str) or not path or "\x00" in path:
        raise base.refuse(UPLOAD_REFUSED)
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in roots) or any(_inside(real, folder) for folder in excluded):
        raise base.refuse(UPLOAD_REFUSED)
    chunks, size, deadline = [], 0, time.monotonic() + seconds
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        with open(os.open(real, flags), "rb", buffering=0) as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
                raise base.refuse(UPLOAD_REFUSED)
            while chunk := file.read(1 << 20):
                size += len(chunk)
                if size > max_bytes or time.monotonic() > deadline:
                    raise base.refuse(UPLOAD_REFUSED)
                chunks.append(chunk)
    except OSError:
        raise base.refuse(UPLOAD_REFUSED) from None
    return b"".join(chunks), os.path.basename(str(value.get("orig_name") or path))[:MAX_NAME_CHARS]


class UploadLimits:
    """ASGI middleware on Gradio's upload route: one file of at most `max_file_size` a request (else HTTP 413),
    then the oldest uploads go until all total at most `max_bytes` (Gradio bounds per file and by age only)."""

    def __init__(self, app, folder: str, keep: set[str], max_file_size: int, max_bytes: int):
        self.app, self.folder, self.keep = app, folder, keep
        self.max_body, self.max_bytes = max_file_size + MULTIPART_OVERHEAD, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit() or int(length) > self.max_body:
            limit = self.max_body - MULTIPART_OVERHEAD
            size = f"{limit / 2 ** 20:.0f} MB" if limit >= 2 ** 20 else f"{limit // 2 ** 10} KB"
            # Answering while the client still sends closes the connection under it: the client gets a broken
            # pipe or a reset, not the 413. So read and drop the body first, but at most another limit's
            # worth for at most DRAIN_SECONDS; a longer or slower body is still cut off.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    drained, message = 0, {"more_body": True}
                    while message.get("more_body") and drained <= self.max_body:
                        message = await receive()
                        drained += len(message.get("body", b""))
            return await PlainTextResponse(f"Upload one file of at most {size}.", status_code=413)(
                scope, receive, send)

        async def send_when_pruned(message):  # the file is stored once Gradio answers: prune before it does
            if message["type"] == "http.response.start":
                await asyncio.to_thread(base.prune, self.folder, self.max_bytes, self.keep)
            await send(message)

        await self.app(scope, receive, send_when_pruned)


class ImageToImageApp(base.TextToImageApp):
    """The image demo: the text-to-image demo's handlers and widgets plus an input image that guides the run."""

    title = "ElasticDiffusion: bring your own image"
    intro = ("Refine or upscale a picture at any size and aspect ratio, or generate one that follows its edges or "
             "depth with a ControlNet, with a pretrained Stable Diffusion model, training-free "
             "([paper](https://arxiv.org/abs/2311.18822), CVPR 2024). The input is scaled to cover the output "
             "size and centre-cropped.")
    cost_factor = CONTROLNET_COST
    stage_names = {**base.STAGE_NAMES, "condition": "Making the condition map"}  # the ControlNet sampler's stage
    placeholder = EXAMPLE_PROMPT
    api_before_knobs = ("image", "prompt", "negative_prompt", "condition", "controlnet_conditioning_scale", "width",
                        "height", "seed", "randomize_seed")
    api_after_knobs = ("canny_low", "canny_high", *base.TextToImageApp.api_after_knobs, "strength")
    example_inputs = ("image", "prompt", "negative_prompt", "condition", "strength", "width", "height",
                      "resampling_steps", "new_p", "rrg_init_weight", "seed", "randomize_seed")
    example_rows = [[edc.DEFAULT_INPUT, EXAMPLE_PROMPT, ed.PRESET_NEGATIVE_PROMPT, "canny", 1.0, 1536, 1536, 7, 0.3,
                     1000, 0, False],
                    [edc.DEFAULT_INPUT, UPSCALE_PROMPT, ed.PRESET_NEGATIVE_PROMPT, "refine", 0.4, 1024, 1024, 7, 0.3,
                     1000, 0, False]]
    example_labels = ["1536×1536, canny edges of the astronaut photo: " + EXAMPLE_PROMPT,
                      "2× upscale of the astronaut photo, refined at strength 0.4: " + UPSCALE_PROMPT]
    examples_title = "Examples (generated on first click, then cached)"

    def __init__(self, sampler, status: str = "", preview_every: int = base.PREVIEW_EVERY,
                 outputs: base.OutputFolders | None = None, default_condition: str | None = None,
                 controlnet: str = "canny", depth_model=edc.DEFAULT_DEPTH_MODEL):
        """`sampler`: the base model's sampler, or a ControlNet sampler (then also the one of canny/depth runs);
        otherwise `controlnet` and `depth_model` make one over the base model's modules on the first such run."""
        self._controlnet = sampler if isinstance(sampler, edc.ElasticDiffusionControlNet) else None
        self.controlnet_model = getattr(self._controlnet, "controlnet_model", controlnet)
        self.depth_model = getattr(self._controlnet, "depth_model", depth_model)
        self._controlnet_lock = threading.Lock()
        if self._controlnet is not None:  # refine runs need the base sampler: the same modules, no ControlNet
            sampler = ed.ElasticDiffusion.from_pipe(sampler.pipe, max_scale=sampler.max_scale)
        super().__init__(sampler, status, preview_every, outputs)
        if self.flow:  # SD 3 has no ControlNet here: only the refine examples
            guide = self.example_inputs.index("condition")
            rows = [(row, label) for row, label in zip(self.example_rows, self.example_labels)
                    if row[guide] == "refine"]
            self.example_rows, self.example_labels = [row for row, _ in rows], [label for _, label in rows]
        # What the ControlNet was trained on (None: unknown), and where the guide menu starts.
        self.controlnet_condition = trained_condition(self.controlnet_model)
        self.default_condition = self.condition_type(default_condition or "refine")
        self._images: dict = {}  # file digest -> RGB image, the most recently used last
        self._images_lock = threading.Lock()
        self._depth_lock = threading.Lock()  # one depth model load or estimate at a time outside generations
        self._depth_failure = ""  # why the depth model could not be loaded: said at once from then on
        self._depth_map = base.on_gpu(self._estimate_depth, lambda values: DEPTH_SECONDS)
        # Inputs come only from Gradio's upload folder of this process, never from the app's own outputs.
        self.upload_roots = [os.path.realpath(gr.utils.get_upload_folder())]
        self.excluded = [os.path.realpath(self.outputs.root)]

    def input_image(self, value) -> tuple[Image.Image, str]:
        """The uploaded image decoded to RGB, with its own name; gr.Error if unusable."""
        if value in (None, "") or (isinstance(value, dict) and not value.get("path")):
            raise base.refuse("Input image is missing: upload a photo (or your own edge or depth map) whose "
                              "structure the image should follow.")
        data, name = read_upload(value, self.upload_roots, self.excluded)
        key = hashlib.sha256(data).digest()
        with self._images_lock:
            image = self._images.pop(key, None)
        if image is None:
            image = base.within(DECODE_SECONDS, f"Decoding input image {name!r}", self._decode, data, name)
        with self._images_lock:
            self._images[key] = image
            while len(self._images) > IMAGE_CACHE_SIZE:
                del self._images[next(iter(self._images))]
        return image, name

    @staticmethod
    def _decode(data: bytes, name: str) -> Image.Image:
        label = f"Input image {name!r}"  # the user's file name: never a server path in a message
        try:
            # The header only (the size is checked before decoding), and only the formats the page accepts:
            # the decoders of rare formats are more code for a stranger's file to reach.
            Image.init()  # registers every plugin (WebP too): open() does that only for its default formats
            with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as opened:
                return ed.load_image(opened, name=label)
        except Image.DecompressionBombError:
            raise base.refuse(f"{label} is far too large (at most {ed.MAX_INPUT_PIXELS / 1e6:.0f} MP are "
                              "accepted): downscale it first.") from None
        except ValueError as error:  # load_image's: no pixels or too many pixels
            raise base.refuse(str(error)) from None
        except Exception:  # noqa: BLE001 - whatever a decoder raises on a corrupt file gets the one message
            raise base.refuse(f"{label} is not a readable image file: upload a JPEG, PNG or WebP image (a file "
                              "that is empty, corrupt or has no pixels cannot be used).") from None

    @staticmethod
    def condition_type(value) -> str:
        if isinstance(value, str) and value.strip().lower() in (*edc.CONDITIONS, "refine"):
            value = value.strip().lower()
            return "image" if value == "none" else value
        labels = ", ".join(f"'{v}' ({label})" for label, v in CONDITION_CHOICES)
        raise base.refuse(f"Condition must be one of {labels}; got {value!r}.")

    def parse_control(self, values: dict) -> tuple[str, dict]:
        """The image inputs (UI and API alike), each checked with an actionable gr.Error: the upload's own name
        (never a server path) and the sampler's keyword arguments, the image decoded. Refine starts from the
        picture; the ControlNet's conditions follow it, from noise unless the strength is below 1."""
        condition = self.condition_type(values.get("condition"))
        if self.flow and condition != "refine":
            raise base.refuse(f"Guide '{condition}' needs a ControlNet, which runs on SD 1.x, 2.x and XL models only; "
                              "with this SD 3 model choose Refine.")
        strength = base.knob_value(STRENGTH_KNOB, values.get("strength", 1.0), 0)
        image, name = self.input_image(values.get("image"))
        if condition == "refine":
            return name, dict(image=image, strength=strength)
        control = dict(condition=condition, condition_image=image)
        for row in edc.CONTROLNET_KNOBS:
            control[row.name] = base.knob_value(row, values.get(row.name, KNOB_DEFAULTS[row.name]), 0)
        if control["canny_low"] > control["canny_high"]:
            raise base.refuse(f"Canny low threshold ({control['canny_low']}) must not be above the Canny high "
                              f"threshold ({control['canny_high']}).")
        if strength < 1:
            control.update(image=image, strength=strength)
        return name, control

    def controlnet_sampler(self) -> edc.ElasticDiffusionControlNet:
        """The ControlNet sampler, made on the first run that needs it over the base model's modules (one copy of the
        UNet); gr.Error with advice if the ControlNet cannot be loaded."""
        with self._controlnet_lock:
            if self._controlnet is None:
                try:
                    self._controlnet = edc.ElasticDiffusionControlNet.from_pipe(
                        self.sampler.pipe, controlnet_model=self.controlnet_model, depth_model=self.depth_model,
                        max_scale=self.max_scale, low_vram=self.sampler.low_vram)
                except Exception as error:  # noqa: BLE001 - no hub, a bad folder, a ControlNet of another model
                    raise base.refuse(
                        f"The ControlNet `{ed.public_name(self.controlnet_model)}` could not be loaded "
                        f"({base.scrub_paths(str(error))[:300]}). Start the app with `--controlnet "
                        "/path/to/controlnet/folder`, or choose Refine, which needs no ControlNet.") from None
            return self._controlnet

    def gpu_seconds(self, values: dict) -> int:
        factor = 1.0 if values.get("condition", self.default_condition) == "refine" else CONTROLNET_COST
        return base.estimate_gpu_seconds(values, self.native_px, factor, self.flow)

    def stream(self, values: dict, progress, **run_kwargs):
        """The text-to-image request plus the image's inputs, checked first (the image is read once)."""
        self._require_model()
        name, control = self.parse_control(values)
        if "condition" not in control:  # refine: the base sampler
            yield from super().stream(values, progress, **control)
            return
        sampler = base.within(DEPTH_SECONDS, "Loading the ControlNet", self.controlnet_sampler)
        if control["condition"] == "depth":  # load the depth model now, bounded, or fail at once with advice
            base.within(DEPTH_SECONDS, "Loading the depth model", self._depth)
        expected, condition = self.controlnet_condition, control["condition"]
        if expected is not None and condition in ("canny", "depth") and condition != expected:
            gr.Warning(f"The loaded ControlNet was trained on {CONDITION_NAMES[expected]}, so it follows "
                       f"{CONDITION_NAMES[condition]} only loosely. For {CONDITION_NAMES[condition]}, start the app "
                       f"with --controlnet {condition}.")
        yield from super().stream(values, progress, sampler=sampler,
                                  finish=functools.partial(self._save_condition, name), **control)

    @staticmethod
    def _save_condition(name: str, file, request, info) -> list[tuple[str, str]]:
        """`run_generation`'s finish hook: the input's own name in the metadata, the condition map as a PNG."""
        s = info.settings
        s["condition_image"] = name  # the sampler saw a decoded image, not a file
        condition_map = info.condition_image
        if s["condition"] in ("canny", "depth"):  # grey maps replicated to RGB: one channel is enough
            condition_map = condition_map.convert("L")
        size = f"{request.width}x{request.height}"
        path = file(f"condition_{s['condition']}_seed{request.seed}_{size}.png")
        record = dataclasses.replace(info, settings=dict(s, image="condition map"))
        ed.save_png(condition_map, path, ed.png_metadata(record, request.prompt, request.negative_prompt))
        thresholds = f" {s['canny_low']}/{s['canny_high']}" if s["condition"] == "canny" else ""
        return [(path, f"Condition map ({s['condition']}{thresholds}), {size}")]

    def condition_map(self, image, condition, width, height, canny_low, canny_high, max_side: int | None = None) -> str:
        """/condition_preview: the map /generate would follow, at the output size (`max_side` shrinks it)."""
        _, control = self.parse_control(dict(image=image, condition=condition, canny_low=canny_low,
                                             canny_high=canny_high))
        condition = control.get("condition", "refine")
        width, height = base.checked_size(width, height, self.native_px, self.max_scale)
        fitted = ed.fit_image(control.get("condition_image") or control["image"], width, height)  # the sampler's rule
        if condition == "canny":
            result = edc.canny_condition(fitted, control["canny_low"], control["canny_high"]).convert("L")
        elif condition == "depth":
            self._require_model()
            result = self._depth_map(fitted).convert("L")
        else:
            result = fitted
        if max_side is not None and max(result.size) > max_side:
            result.thumbnail((max_side, max_side), Image.Resampling.BOX)  # keeps the aspect ratio
        with self.outputs.request() as file:
            path = file(f"condition_{condition}_{width}x{height}.png")
            result.save(path, format="PNG", compress_level=1)  # a quick save: previews change often
        return path

    def _depth(self, image: Image.Image | None = None) -> Image.Image | None:
        """Load the sampler's depth model (a failed load is remembered and said at once), then make `image`'s depth
        map if one is given: one load or estimate at a time outside generations."""
        with self._depth_lock:
            if not self._depth_failure:
                try:
                    estimator = self.controlnet_sampler().depth_estimator()
                except ValueError as error:
                    self._depth_failure = (
                        f"The depth model `{ed.public_name(self.depth_model)}` could not be loaded "
                        f"({base.scrub_paths(str(error))[:300]}). Start the app with `--depth-model "
                        "/path/to/depth/model` (a transformers depth-estimation model folder, e.g. Intel/dpt-large "
                        "saved with save_pretrained), or choose Canny edges or your own map.")
            if self._depth_failure:
                raise base.refuse(self._depth_failure)
            return None if image is None else edc.depth_condition(image, estimator)

    def _estimate_depth(self, image: Image.Image) -> Image.Image:
        return base.within(DEPTH_SECONDS, "Estimating the depth map", self._depth, image)

    def preview(self, image, condition, width, height, canny_low, canny_high):
        """The live preview: cleared without an image or on an error (a warning says why), kept while typing."""
        if image in (None, "") or (isinstance(image, dict) and not image.get("path")):
            return None
        if not base.size_ok(width, height, self.native_px, self.max_scale):
            return gr.skip()
        try:
            return self.condition_map(image, condition, width, height, canny_low, canny_high, PREVIEW_MAX_SIDE)
        except gr.Error as error:  # never leave an old map under a new condition's name
            gr.Warning(error.message)
            return None

    def model_note(self) -> str:
        note = super().model_note()
        if self.flow:
            return note
        loaded = "" if self._controlnet else " (loaded on the first canny or depth run)"
        return note and f"{note[:-1]}; ControlNet: `{ed.public_name(self.controlnet_model)}`{loaded}."

    def _inputs(self) -> dict:
        """Input image, guide, strength and ControlNet scale, beside the live view of the guide."""
        expects = (f"The ControlNet follows {CONDITION_NAMES[self.controlnet_condition]}."
                   if self.controlnet_condition else "The ControlNet is a custom one: choose the map it was "
                   "trained on, or give your own map ('My own edge or depth map').")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                widgets = {"image": gr.Image(label="Input image", type="filepath", sources=["upload", "clipboard"],
                                             height=360, elem_id="input-image")}
                self.upscale = gr.Button("Upscale ×2: twice the picture's size", size="sm", elem_id="upscale-2x")
                widgets["condition"] = gr.Dropdown(CONDITION_CHOICES[:1] if self.flow else CONDITION_CHOICES,
                                                   value=self.default_condition, label="Guide",
                                                   info=f"What the result follows: the picture itself, or its edges "
                                                        f"or depth through a ControlNet. {expects}",
                                                   elem_id="condition")
                # /generate's default is 1 (a ControlNet run from noise, as before refine existed); the page starts
                # the slider at its guide's own default (`_more_events`).
                widgets["strength"] = base.knob_widget(STRENGTH_KNOB, 1.0, 0)
                scale = edc.CONTROLNET_KNOBS[0]
                widgets[scale.name] = base.knob_widget(scale, KNOB_DEFAULTS[scale.name], 0)
            with gr.Column(scale=1):
                widgets["condition_map"] = gr.Image(
                    label="What the run follows, at the output size (the picture, or the ControlNet's map)",
                    type="filepath", format="png", interactive=False, height=360, elem_id="condition-preview",
                    buttons=["download", "fullscreen"])
        return widgets

    def doubled_size(self, image) -> tuple[int, int]:
        """Upscale ×2: (width, height) twice the uploaded picture's, shrunk to the model's largest size if needed,
        in multiples of 8."""
        picture, _ = self.input_image(image)
        factor = min(2.0, self.max_scale * self.native_px / max(picture.size))
        return tuple(max(ed.MIN_SIDE_PX, int(side * factor) // 8 * 8) for side in picture.size)

    def _advanced(self) -> dict:
        """The Canny thresholds."""
        with gr.Row():
            return {row.name: base.knob_widget(row, KNOB_DEFAULTS[row.name], 0) for row in edc.CONTROLNET_KNOBS[1:]}

    def _more_events(self, widgets: dict, outputs: list) -> None:
        """The live condition map (/condition_preview is its API twin), then the example."""
        preview_inputs = [widgets[name] for name in PREVIEW_INPUTS]
        # One preview at a time (they run beside the GPU queue): bounded CPU, memory and disk.
        preview_options = dict(outputs=widgets["condition_map"], preprocess=False, concurrency_id="preview",
                               concurrency_limit=1, show_progress="minimal")
        gr.on([widgets[name].change for name in PREVIEW_INPUTS], self.preview, inputs=preview_inputs,
              trigger_mode="always_last", api_visibility="private", **preview_options)
        gr.Button("Condition map", visible=False).click(self.condition_map, inputs=preview_inputs,
                                                        api_name="condition_preview", **preview_options)
        self.upscale.click(self.doubled_size, inputs=widgets["image"], outputs=[widgets["width"], widgets["height"]],
                           preprocess=False, concurrency_id="preview", api_visibility="private")
        # Each guide's own strength, when the page loads and when the guide changes (no triggers: both).
        gr.on(None, lambda guide: STRENGTH.get(guide, gr.skip()), inputs=widgets["condition"],
              outputs=widgets["strength"], queue=False, show_progress="hidden", api_visibility="private")
        super()._more_events(widgets, outputs)


def build_parser() -> argparse.ArgumentParser:
    """The text-to-image demo's flags plus the ControlNet's."""
    p = base.build_parser("ElasticDiffusion image-to-image demo (Gradio): refine, upscale, or follow a ControlNet map.")
    p.add_argument("--controlnet", "--controlnet_model", dest="controlnet", default="canny",
                   help="'canny' or 'depth' (the default ControlNet of the model's family), a hub id or a local "
                        "diffusers folder; loaded on the first canny or depth run")
    p.add_argument("--condition", choices=["refine", "canny", "depth", "image"], default=None,
                   help="where the guide menu starts (default: refine)")
    p.add_argument("--depth-model", "--depth_model", dest="depth_model", default=edc.DEFAULT_DEPTH_MODEL,
                   help="transformers depth-estimation model id or folder, for the 'Depth map' condition")
    p.add_argument("--max-uploads-mb", type=int, default=MAX_UPLOADS_MB,
                   help="most megabytes of uploaded images kept on disk; the oldest go first")
    return p


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    base.configure_logging(args.verbose)
    outputs = base.private_storage(args.max_output_mb)
    sampler, status = base.load_sampler(args, app_file=APP_FILE)  # the base model only: ControlNets on first use
    if sampler is None:
        status += (f" A ControlNet on disk is given the same way: `--controlnet /path/to/controlnet/folder` "
                   f"(now `{ed.public_name(args.controlnet)}`).")
    app = ImageToImageApp(sampler, status, preview_every=args.preview_every, outputs=outputs,
                          default_condition=args.condition, controlnet=args.controlnet, depth_model=args.depth_model)
    serve(app.build(), args, outputs)


def serve(demo: gr.Blocks, args: argparse.Namespace, outputs: base.OutputFolders,
          max_file_size: int = MAX_UPLOAD_BYTES) -> None:
    """`app_gradio.serve` with uploads bounded by `UploadLimits`."""
    folder = os.path.dirname(outputs.root)  # the page's own files, made while it was built, are never pruned
    own = {entry.path for entry in os.scandir(folder)}
    limits = starlette.middleware.Middleware(UploadLimits, folder=folder, keep=own,
                                             max_file_size=max_file_size, max_bytes=args.max_uploads_mb * 2 ** 20)
    uploads = (f"at most {max_file_size / 2 ** 20:.0f} MB each and {args.max_uploads_mb} MB in all, each kept "
               f"{base.KEEP_OUTPUTS_SECONDS // 60} min")
    base.serve(demo, args, outputs, max_file_size=max_file_size, uploads=uploads,
               app_kwargs={"middleware": [limits]})


if __name__ == "__main__":
    main()
