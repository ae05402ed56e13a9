"""ElasticDiffusion text-to-image demo (Gradio); docs/app.md says what it offers, stores and serves.

A request's path: `TextToImageApp.generate` -> `stream` (`parse_request`, then a thread) -> `run_generation`.
"""
from __future__ import annotations

try:  # ZeroGPU (Hugging Face Spaces) patches torch, so it must be imported before torch
    import spaces
except ImportError:
    spaces = None

import argparse
import atexit
import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import os
import queue
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import gradio as gr
import torch

import elastic_diffusion as ed
import pca_diffusion_scores as pca

logger = logging.getLogger("app_gradio")

DEFAULT_MODEL = "XL1.0"
DEFAULT_SIZE = 1024  # SDXL's native size: the first image (fast, R = 0), and the layout when no model could be loaded
QUEUE_SIZE = 16  # requests waiting behind the running one; more are refused with "queue full"
PREVIEW_EVERY = 10  # decode x0 every this many steps (5 previews over the default 50 steps)
PREVIEW_LATENT_SIDE = 64  # previews decode at most 64 latent pixels (512 px) per side: cheap next to a step
HEARTBEAT_SECONDS = 0.5  # a running handler yields at least this often, so a cancel can close it promptly
# ZeroGPU's reservation per native-size SDXL UNet sample: the reference authors' eager time on an H200.
UNET_SAMPLE_SECONDS = 0.017
# "Look inside" keeps at most this many steps plus the last: bounded memory (< 50 MiB at 2048²), time, animation.
LOOK_INSIDE_STEPS = 25
LOOK_INSIDE_BASIS = "shared"  # one PCA basis over all recorded steps: a colour means the same at every step
KEEP_OUTPUTS_SECONDS = 3600  # results, previews and uploads older than this are removed
CACHE_SWEEP_SECONDS = 300  # how often Gradio's cache is swept for them: nothing stays past 65 minutes
MAX_OUTPUT_MB = 2048  # the outputs' total size; beyond it the oldest requests' files go first (--max-output-mb)
STAGE_NAMES = {"encode_prompt": "Encoding the prompt", "backgrounds": "Encoding the padding strips",  # the sampler's
               "look_inside": "Drawing the look-inside pictures"}  # stages before step 1; the app's own after the last
TIMING_LABELS = {"encode_prompt": "prompt", "backgrounds": "padding strips", "denoise": "denoising",
                 "decode": "decoding"}  # the summary's time split
PAGE_CSS = """
#gallery .fixed-height { max-height: none; min-height: 0; }
#gallery .grid-wrap { overflow-y: visible; height: auto; }
#gallery .grid-container { grid-template-rows: none; grid-auto-rows: auto; align-items: start; }
#gallery .thumbnail-item { aspect-ratio: auto; height: auto; display: flex; justify-content: center; }
#gallery .thumbnail-lg > img { width: auto; height: auto; max-width: 100%; max-height: 80vh; }
#seed-value { display: none !important; }
.toast-wrap { top: auto !important; bottom: var(--size-4); }
"""  # Gradio's gallery draws square cells in a box of 55 % of the window: show each image whole instead. The seed
# output is shown by a text box (`_result_widgets`); messages go to the bottom, off the Generate button.

OUT_OF_MEMORY_ADVICE = (
    f"Out of GPU memory. Open Advanced options and try, in this order: a lower {ed.knob('view_batch_size').label} "
    f"(e.g. 4), {ed.knob('tiled_decoder').label}, {ed.knob('low_vram').label}, or a smaller width/height. The next "
    "request starts with a clean GPU.")


_SERVER_PATH = re.compile(r"(?<![\w:/.~])(?:~|\.{1,2})?(?:/[^\s'\"`()<>/]+)+/?")  # not the path part of a URL


def scrub_paths(text: str) -> str:
    """`text` with every file-system path shortened to its last part (a model's folder name, say)."""
    return _SERVER_PATH.sub(lambda match: os.path.basename(match.group(0).rstrip("/")) or "/", text)


def refuse(message: str, **kwargs) -> gr.Error:
    """A gr.Error for a request the user can fix: shown in the UI and to API clients, not logged as a crash."""
    return gr.Error(message, print_exception=False, **kwargs)


def build_parser(description: str = "ElasticDiffusion text-to-image demo (Gradio).") -> argparse.ArgumentParser:
    """The flags both apps share (docs/app.md has the table)."""
    p = argparse.ArgumentParser(description=description, formatter_class=ed.HelpFormatter)
    p.add_argument("--model", "--sd_version", dest="model", default=os.environ.get("ELASTIC_MODEL", DEFAULT_MODEL),
                   help="'1.5', '2.1', 'XL1.0', '3.5-medium', any hub id, a local diffusers folder or a .safetensors "
                        "file")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="HTTP port")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to listen on (0.0.0.0 to serve the local network)")
    p.add_argument("--share", action=argparse.BooleanOptionalAction, default=False,
                   help="also serve through a temporary public gradio.live link")
    p.add_argument("--low-vram", "--low_vram", dest="low_vram", action=argparse.BooleanOptionalAction,
                   default=False, help="start with models offloaded to the CPU (the UI can toggle it per request)")
    p.add_argument("--device", default=None, help="torch device (default: cuda, then mps, then cpu)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weight dtype (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true",
                   help="allow non-safetensors (pickle) weights; only for checkpoints you trust")
    p.add_argument("--t5", action="store_true", help="SD 3 models: also load the T5 text encoder (4.7B parameters)")
    p.add_argument("--max-scale", "--max_scale", dest="max_scale", type=int, default=ed.MAX_SCALE,
                   help="largest size as a multiple of the model's native size per side; above 2 is experimental")
    p.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="most requests waiting in the queue")
    p.add_argument("--max-output-mb", type=int, default=MAX_OUTPUT_MB,
                   help="most megabytes of results and previews kept on disk; the oldest go first")
    p.add_argument("--preview-every", type=int, default=PREVIEW_EVERY,
                   help="show a preview of the image every N steps (0: no previews)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log every library at INFO level (the app's own start-up lines are always shown)")
    return p


def load_sampler(args: argparse.Namespace, sampler_class=ed.ElasticDiffusion, app_file: str = "app_gradio.py",
                 **kwargs) -> tuple[Any, str]:
    """Load the model once: (sampler, "") or (None, a message that tells the user what to do)."""
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    try:
        sampler = sampler_class(device=args.device, sd_version=args.model, low_vram=args.low_vram, torch_dtype=dtype,
                                allow_pickle=args.allow_pickle, max_scale=args.max_scale,
                                t5=getattr(args, "t5", False), **kwargs)
    except Exception as error:  # the app must still start and explain (no hub, no GPU, bad path, ...)
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:400]
        logger.warning("%s could not be loaded: %s", args.model, reason, exc_info=logger.isEnabledFor(logging.DEBUG))
        # Markdown for the banner and the Generate button's error; no server paths.
        return None, (f"**No model is loaded.** `{ed.public_name(args.model)}` could not be loaded: "
                      f"{scrub_paths(reason)}"
                      "\n\nTo use a model on disk (e.g. on a machine without hub access or without a GPU), start the "
                      f"app with `python {app_file} --model /path/to/diffusers/folder` (a folder saved with diffusers' "
                      "`save_pretrained`, with `model_index.json` in it) or `--model /path/to/checkpoint.safetensors`. "
                      f"{ed.TINY_MODEL_HINT}.")
    logger.info("loaded %s on %s (native %d px)", args.model, sampler.device, sampler.native_px)
    return sampler, ""


def preset(width: int, height: int, native_px: int, flow: bool = False) -> dict:
    """`recommended_settings` clamped to the demos' ranges (λ0 grows with the area), so /generate takes them;
    `flow`: an SD 3 model's."""
    settings = ed.recommended_settings(width, height, native_px, flow)
    return {name: ed.knob(name).clamp(value, native_px // 8, demo=True) for name, value in settings.items()}


def knob_widget(row: ed.Knob, value, native_latent: int, is_sdxl: bool = True) -> gr.components.Component:
    """The demo's widget for one row of the knobs table: a slider in the demo's range, a checkbox or a radio."""
    common = dict(label=row.label, value=value, info=row.help[:1].upper() + row.help[1:], elem_id=f"knob-{row.name}")
    if row.type is bool:
        return gr.Checkbox(**common)
    if row.choices:
        return gr.Radio(list(row.choices), visible=is_sdxl or not row.sdxl_only, **common)
    low, high = row.limits(native_latent, demo=True)
    return gr.Slider(low, high, step=row.step, precision=0 if row.type is int else None, **common)


def knob_widgets(native_px: int = DEFAULT_SIZE, is_sdxl: bool = True, max_scale: int = ed.MAX_SCALE,
                 extra_advanced: Callable[[], dict] | None = None,
                 flow: bool = False) -> dict[str, gr.components.Component]:
    """Size row and an "Advanced options" accordion with every knob (and `extra_advanced()`'s widgets), by name."""
    limit = max_scale * native_px
    size_info = f"pixels, a multiple of 8, {ed.MIN_SIDE_PX}-{limit} (up to {max_scale}x the model's {native_px} px)"
    w = {}
    with gr.Row(equal_height=True):
        for name in ("width", "height"):
            w[name] = gr.Number(label=name.title(), value=DEFAULT_SIZE, precision=0, step=8, minimum=ed.MIN_SIDE_PX,
                                maximum=limit, info=size_info, elem_id=name)
        w["swap_size"] = gr.Button("⇄ Swap", size="sm", scale=0, min_width=80)
    values = {**{k.name: k.default for k in ed.KNOBS}, **preset(DEFAULT_SIZE, DEFAULT_SIZE, native_px, flow)}
    with gr.Accordion("Advanced options", open=False, elem_id="advanced"):
        w["negative_prompt"] = gr.Textbox(label="Negative prompt", value=ed.DEFAULT_NEGATIVE_PROMPT, lines=2,
                                          max_length=ed.MAX_PROMPT_CHARS, info="What the image should not show.")
        with gr.Row():
            w["seed"] = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=ed.MAX_SEED,
                                  info="The same seed and settings give the same image.")
            w["randomize_seed"] = gr.Checkbox(label="Randomize seed", value=True,
                                              info="Draw a new seed for every request (shown with the result).")
        if extra_advanced is not None:
            w.update(extra_advanced())
        gr.Markdown("Hyper-parameters follow the resolution-aware presets when you change the size, "
                    "except those you set yourself.")
        sliders = [k for k in ed.KNOBS if k.type is not bool and not k.choices]
        rows = [sliders[i:i + 2] for i in range(0, len(sliders), 2)]
        rows += [[k for k in ed.KNOBS if k.type is bool], [k for k in ed.KNOBS if k.choices]]
        for row in rows:
            with gr.Row():
                for k in row:
                    w[k.name] = knob_widget(k, values[k.name], native_px // 8, is_sdxl)
        w["reset_knobs"] = gr.Button("Reset hyper-parameters to the preset for this size", size="sm")
    return w


def wire_size_presets(widgets: dict, native_px: int = DEFAULT_SIZE, max_scale: int = ed.MAX_SCALE,
                      flow: bool = False) -> None:
    """Re-apply the preset when the size changes, except to knobs the user edited (`.input` marks those)."""
    names = [k.name for k in ed.method_knobs() if k.name in widgets]
    edited = gr.State(frozenset())
    for name in names:
        widgets[name].input(lambda marks, name=name: marks | {name}, inputs=edited, outputs=edited,
                            queue=False, show_progress="hidden", api_visibility="private")

    def follow_size(width, height, marks):
        return preset_updates(width, height, marks, names, native_px, max_scale, flow)

    size = [widgets["width"], widgets["height"]]
    knob_outputs = [widgets[name] for name in names]
    # Raw values (preprocess=False): sizes being typed ("2", "20", ...) are not errors here.
    gr.on([widgets["width"].change, widgets["height"].change], follow_size, inputs=size + [edited],
          outputs=knob_outputs, queue=False, show_progress="hidden", api_visibility="private", preprocess=False)
    widgets["reset_knobs"].click(lambda width, height: [frozenset(), *follow_size(width, height, frozenset())],
                                 inputs=size, outputs=[edited] + knob_outputs, queue=False, api_visibility="private",
                                 preprocess=False)
    widgets["swap_size"].click(lambda width, height: (height, width), inputs=size, outputs=size, queue=False,
                               api_visibility="private", preprocess=False)


def preset_updates(width, height, edited: frozenset, names: Sequence[str], native_px: int,
                   max_scale: int = ed.MAX_SCALE, flow: bool = False) -> list:
    """New values for the knobs `names` at this size: the preset, or gr.skip() for the user's own values."""
    if not size_ok(width, height, native_px, max_scale):  # a value being typed: leave the knobs alone
        return [gr.skip()] * len(names)
    recommended = preset(int(width), int(height), native_px, flow)
    return [gr.skip() if name in edited else recommended[name] for name in names]


@dataclasses.dataclass
class GenerationRequest:
    """One validated request: what to generate, with which seed, knobs and memory settings."""
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    knobs: dict  # the sampler's keyword arguments: every knob of the table but low_vram
    low_vram: bool  # switched on the sampler before the call (`set_low_vram`)
    compare_plain: bool
    look_inside: bool = False  # also record the scores and draw them (`save_look_inside`)


def _read(value, kind: type):
    """A widget's or API payload's value as `kind` where it reads as one (numeric text, 3.0 as 3, "true", 0 or 1);
    else as it is, for the sampler's check to refuse with its rule."""
    if isinstance(value, str):
        if kind is bool:
            return {"true": True, "false": False}.get(value.strip().lower(), value)
        try:
            value = float(value.strip())
        except ValueError:
            return value
    if kind is bool:
        return bool(value) if isinstance(value, (int, float)) and value in (0, 1) else value
    return int(value) if kind is int and isinstance(value, float) and value.is_integer() else value


def _checked(check: Callable, *args, **kwargs):
    """check(*args, **kwargs), its ValueError as an actionable gr.Error (a sentence: capital, full stop)."""
    try:
        return check(*args, **kwargs)
    except ValueError as error:
        message = str(error)
        raise refuse(f"{message[:1].upper()}{message[1:]}.") from None


def _flag(label: str, value) -> bool:
    return knob_value(ed.Knob(label, bool, False, "", label), value, 0)


def knob_value(row: ed.Knob, value, native_latent: int):
    """One knob's raw widget or API value, checked by its row in the demo's range (gr.Error naming its label)."""
    return _checked(row.check, _read(value, row.type), native_latent, demo=True, subject=row.label)


def checked_size(width, height, native_px: int, max_scale: int = ed.MAX_SCALE) -> tuple[int, int]:
    """(width, height) from widget or API values, checked by the sampler's size rule; gr.Error naming the side."""
    width, height = _read(width, int), _read(height, int)
    _checked(ed.check_size, height, width, native_px, max_scale=max_scale)
    return width, height


def size_ok(width, height, native_px: int, max_scale: int = ed.MAX_SCALE) -> bool:
    """Whether /generate takes this size: the page leaves the knobs and previews alone while a size is typed."""
    try:
        checked_size(width, height, native_px, max_scale)
    except gr.Error:
        return False
    return True


def parse_request(values: dict, sampler) -> GenerationRequest:
    """Raw widget or API values checked by the sampler's rules in the demo's ranges before the request waits for
    the GPU (a missing knob takes the size's preset), and the seed picked."""
    width, height = checked_size(values.get("width"), values.get("height"), sampler.native_px, sampler.max_scale)
    if _flag("Randomize seed", values.get("randomize_seed", False)):
        seed = secrets.randbelow(ed.MAX_SEED + 1)
    elif values.get("seed") in (None, ""):
        raise refuse("Seed is empty: enter a whole number, or tick 'Randomize seed'.")
    else:
        seed = _checked(ed.check_number, "Seed", _read(values["seed"], int), 0, ed.MAX_SEED, integer=True)
    defaults = {**{k.name: k.default for k in ed.KNOBS}, **preset(width, height, sampler.native_px, sampler.is_flow)}
    knobs = {k.name: knob_value(k, values.get(k.name, defaults[k.name]), sampler.native_latent) for k in ed.KNOBS}
    return GenerationRequest(
        prompt=_checked(ed.check_prompt, "Prompt", values.get("prompt"), True),
        negative_prompt=_checked(ed.check_prompt, "Negative prompt", values.get("negative_prompt"), False),
        width=width, height=height, seed=seed, low_vram=knobs.pop("low_vram"), knobs=knobs,
        compare_plain=_flag("Compare with plain generation", values.get("compare_plain", False)),
        look_inside=_flag("Look inside", values.get("look_inside", False)))


def prune(root: str, max_bytes: int, keep=(), cutoff: float = 0) -> None:
    """Remove the folders in `root` last changed before `cutoff` (a time), then the oldest while all of them hold
    more than `max_bytes`; never a folder in `keep` (full paths)."""
    folders = []
    for entry in os.scandir(root):
        try:  # Gradio's cache sweep may remove a file or folder while this looks at it
            if entry.is_dir(follow_symlinks=False):
                size = sum(f.stat(follow_symlinks=False).st_size for f in os.scandir(entry.path)
                           if f.is_file(follow_symlinks=False))
                folders.append((entry.stat(follow_symlinks=False).st_mtime, size, entry.path))
        except OSError:
            continue
    total = sum(size for _, size, _ in folders)
    for mtime, size, path in sorted(folders):
        if path not in keep and (mtime < cutoff or total > max_bytes):
            shutil.rmtree(path, ignore_errors=True)
            total -= size


class OutputFolders:
    """A folder per request under one root inside Gradio's cache (served, not copied), bounded in age and bytes."""

    def __init__(self, keep_seconds: float = KEEP_OUTPUTS_SECONDS, max_bytes: int = MAX_OUTPUT_MB * 2 ** 20,
                 parent: str | None = None):
        parent = parent or gr.utils.get_upload_folder()
        os.makedirs(parent, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix="elastic_diffusion_outputs_", dir=parent)
        self.keep_seconds, self.max_bytes = keep_seconds, max_bytes
        self._lock = threading.Lock()
        self._active: set[str] = set()  # folders of requests still writing: never pruned
        atexit.register(self.remove)

    @contextlib.contextmanager
    def request(self):
        """`with outputs.request() as file:` file(name) is a path in the request's own folder, made on first use
        (a refused request leaves none) and never pruned before the block ends."""
        made = []  # the folder, once made

        def file(name: str) -> str:
            if not made:
                with self._lock:  # room for it first: the folders past their age, then the oldest over the cap
                    prune(self.root, self.max_bytes, self._active, time.time() - self.keep_seconds)
                    made.append(tempfile.mkdtemp(prefix="request_", dir=self.root))
                    self._active.add(made[0])
            return os.path.join(made[0], name)

        try:
            yield file
        finally:
            if made:  # the cap again, with this request's files counted; they stay until the next requests'
                with self._lock:
                    self._active.discard(made[0])
                    prune(self.root, self.max_bytes, self._active | {made[0]}, time.time() - self.keep_seconds)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def in_thread(fn: Callable, *args) -> concurrent.futures.Future:
    """fn(*args) in a daemon thread that sees the caller's context (Gradio's progress bar), as a Future."""
    future, context = concurrent.futures.Future(), contextvars.copy_context()

    def run():
        try:
            future.set_result(context.run(fn, *args))
        except BaseException as error:  # handed to whoever asks the future
            future.set_exception(error)

    threading.Thread(target=run, daemon=True, name=f"elastic-diffusion-{fn.__name__}").start()
    return future


def within(seconds: float, what: str, fn: Callable, *args):
    """fn(*args) in a helper thread, waited for at most `seconds` (then a gr.Error; the thread runs on); running
    out of GPU memory gets the advice."""
    try:
        return in_thread(fn, *args).result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise refuse(f"{what} took longer than {ed.format_number(seconds)} s and was given up: try a smaller image, "
                     "or try again in a minute if the server is busy.") from None
    except torch.OutOfMemoryError as error:
        raise gr.Error(OUT_OF_MEMORY_ADVICE, title="Out of GPU memory") from error


# The "Look inside" view of one generation: contact sheet PNG, animated WebP, window overlay PNG, markdown caption.
LookInside = collections.namedtuple("LookInside", "sheet animation windows caption")

NO_LOOK_INSIDE = (None, None, None, "")  # /generate's look-inside outputs when the option is off
KEEP_LOOK_INSIDE = (gr.skip(),) * len(NO_LOOK_INSIDE)  # while a request runs: the page keeps what it shows


class RunProgress:
    """The sampler's stage and step callbacks: progress text, a cancel check, `on_x0(step, total, x0)` per step.

    Steps are timed from the last stage report; once two are measured the first (warming caches) is left out.
    """

    def __init__(self, progress: Callable | None = None, cancelled: threading.Event | None = None,
                 on_x0: Callable | None = None, clock: Callable[[], float] = time.perf_counter,
                 stage_names: dict[str, str] = STAGE_NAMES):
        self.progress = progress if progress is not None else lambda done_total, desc: None  # gr.Progress is falsy
        self.cancelled, self.on_x0, self.clock = cancelled, on_x0, clock
        self.stage_names = stage_names  # the progress text of each stage (a subclass's sampler may add stages)
        self.mark = clock()

    def _check(self, where: str) -> None:
        if self.cancelled is not None and self.cancelled.is_set():
            raise ed.GenerationCancelled(f"cancelled {where}")

    def stage(self, stage: str, done: int, total: int) -> None:
        """The sampler's `callback_on_stage`: the preparation before step 1."""
        name = self.stage_names.get(stage, stage)
        self._check(f"while {name.lower()}")
        self.mark = self.clock()
        self.progress((done, total), desc=f"{name} ({done}/{total})" if total > 1 else name)

    def steps(self, phase: str, total: int) -> Callable:
        """A `callback_on_step_end` (the sampler's and diffusers' alike) for the `total` steps of `phase`."""
        seconds = []

        def on_step(pipe, step, timestep, tensors) -> dict:
            self._check(f"after step {step + 1} of {total}")
            now = self.clock()
            seconds.append(now - self.mark)
            self.mark = now
            measured = seconds[1:] or seconds
            left = sum(measured) / len(measured) * (total - step - 1)
            self.progress((step + 1, total), desc=f"{phase}: step {step + 1}/{total}, about {left:.0f} s left")
            if self.on_x0 is not None and tensors.get("x0") is not None:
                self.on_x0(step + 1, total, tensors["x0"])
            return {}

        return on_step


def run_generation(sampler, request: GenerationRequest, file: Callable[[str], str], run: RunProgress | None = None,
                   finish: Callable | None = None, **sampler_kwargs) -> tuple:
    """Generate (recorded with `request.look_inside`, plus the plain image if asked) and write the PNGs at the
    paths `file(name)` gives; returns /generate's outputs: gallery, seed, summary, then the look-inside sheet,
    animation, windows and caption.

    `sampler_kwargs` go to the sampler; `finish(file, request, info)` may amend `info.settings` before the
    PNGs are written and returns more (path, caption) gallery items (the ControlNet's condition map).
    """
    run = run or RunProgress()
    steps = request.knobs["num_inference_steps"]
    plain = None  # (image, settings) of the plain comparison
    try:
        # Low VRAM moves modules in place (never a reload) and waits for any running generation.
        sampler.set_low_vram(request.low_vram)
        call = dict(height=request.height, width=request.width, seed=request.seed, progress=False,
                    callback_on_step_end=run.steps("ElasticDiffusion", steps), callback_on_stage=run.stage,
                    **request.knobs, **sampler_kwargs)
        if request.look_inside:
            recording = pca.record_scores(sampler, request.prompt, request.negative_prompt, method="elastic",
                                          steps_to_keep=look_inside_steps(steps), **call)
            images, info = [recording.image], recording.info
        else:
            recording = None
            images, info = sampler(request.prompt, request.negative_prompt, **call)
        if request.compare_plain:
            tic = time.perf_counter()
            plain_images, plain_info = pca.generate_plain(
                sampler, request.prompt, request.negative_prompt, request.height, request.width, steps,
                request.knobs["guidance_scale"], request.seed, progress=False,
                callback_on_step_end=run.steps("Plain generation", steps))
            plain = (plain_images[0], plain_info.settings)
            info.timings["plain"] = time.perf_counter() - tic
    except ValueError as error:
        raise refuse(scrub_paths(str(error))) from error
    except torch.OutOfMemoryError as error:
        raise gr.Error(OUT_OF_MEMORY_ADVICE, title="Out of GPU memory") from error
    finally:  # hand cached blocks back after any run, so that the next starts clean
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    settings = {name: ed.public_name(v) if isinstance(v, str) else v for name, v in info.settings.items()}
    info = dataclasses.replace(info, model=ed.public_name(info.model), settings=settings)  # models by name only
    extra = finish(file, request, info) if finish is not None else []
    look_inside = NO_LOOK_INSIDE
    if recording is not None:
        run.stage("look_inside", 0, 1)
        tic = time.perf_counter()
        look_inside = save_look_inside(file, recording, info)
        info.timings["look_inside"] = time.perf_counter() - tic
    gallery = save_results(file, request, images[0], info, plain) + extra
    return gallery, request.seed, summarize(info, request, sampler.native_px), *look_inside


def look_inside_steps(num_inference_steps: int) -> str:
    """The steps "Look inside" records: all, or every k-th and the last (at most LOOK_INSIDE_STEPS + 1)."""
    every = math.ceil(num_inference_steps / LOOK_INSIDE_STEPS)
    return "all" if every == 1 else f"every:{every}"


def save_look_inside(file: Callable[[str], str], recording: pca.Recording, info: ed.GenerationInfo) -> LookInside:
    """Draw a recording at the paths `file(name)` gives: sheet and windows PNGs with the metadata of `info` (the
    run's, models by name), a WebP; and the caption."""
    name, basis = f"seed{info.seed}_{info.settings['width']}x{info.settings['height']}", LOOK_INSIDE_BASIS
    record = pca.pca_record(info, recording, basis)

    def png(picture, kind: str) -> str:
        metadata = ed.png_metadata(dataclasses.replace(record, settings=dict(record.settings, image=kind)),
                                   recording.prompt, recording.negative_prompt)
        return ed.save_png(picture, file(f"look_inside_{kind}_{name}.png"), metadata)

    sheet = png(pca.contact_sheet(recording, basis), "sheet")
    animation = file(f"look_inside_steps_{name}.webp")
    frames = pca.animation(recording, basis, "webp")
    ed.write_atomically(animation, lambda f: f.write(frames))
    f = recording.vae_scale_factor
    windows = png(pca.window_overlay(recording.image, recording.views, recording.reference_size, f), "windows")
    T, kept = recording.num_inference_steps, len(recording.steps)
    recorded = f"all {T} steps" if kept == T else f"{kept} of the {T} steps"
    legend = " ".join(pca.overlay_legend(recording.views, recording.reference_size, f).split())
    caption = (f"{pca.describe(recording, basis)} The animation shows {recorded}, the sheet up to "
               f"{pca.SHEET_COLUMNS} of them.\n\n"
               f"**Local windows and reference size** (the picture beside the animation): {legend}")
    return LookInside(sheet, animation, windows, caption)


def save_results(file: Callable[[str], str], request: GenerationRequest, image, info: ed.GenerationInfo,
                 plain: tuple | None) -> list[tuple[str, str]]:
    """Full-resolution PNGs with the settings in their text chunks: the gallery's (path, caption)s."""
    size = f"{request.width}x{request.height}"
    path = file(f"elastic_seed{request.seed}_{size}.png")
    ed.save_png(image, path, ed.png_metadata(info, request.prompt, request.negative_prompt))
    gallery = [(path, f"ElasticDiffusion {size}, seed {request.seed}")]
    if plain is not None:
        plain_image, plain_settings = plain
        plain_path = file(f"plain_seed{request.seed}_{size}.png")
        ed.save_png(plain_image, plain_path, ed.png_metadata(dataclasses.replace(info, settings=plain_settings),
                                                       request.prompt, request.negative_prompt))
        gallery.append((plain_path, f"Plain generation {size}, same seed (for comparison)"))
    return gallery


def summarize(info: ed.GenerationInfo, request: GenerationRequest, native_px: int) -> str:
    """Markdown: the time taken (every stage), the UNet evaluations and what they cost next to a plain image."""
    s, timings = info.settings, info.timings
    plain_cost = 2 * request.knobs["num_inference_steps"]  # a plain native-size image's UNet samples
    split = ", ".join(f"{label} {timings[key]:.1f} s" for key, label in TIMING_LABELS.items() if key in timings)
    lines = [f"**{request.width}×{request.height}**, seed `{request.seed}`: **{timings['total']:.1f} s** ({split})",
             f"**{info.unet_samples:,} UNet evaluations** (native-size samples) in {info.unet_calls:,} calls, "
             f"{info.unet_samples / plain_cost:.1f}× a plain {native_px}² image",
             f"T {s['num_inference_steps']}, ω {s['guidance_scale']:g}, R {s['resampling_steps']}, ρ {s['new_p']:g}, "
             f"λ0 {s['rrg_init_weight']:g}, κ {s['cosine_scale']:g}, patch {s['patch_size']}, "
             f"view batch {s['view_batch_size']}"]
    if "strength" in s:
        steps = ed.run_steps(s["num_inference_steps"], s["strength"])
        lines.append(f"started from the input image at strength {s['strength']:g} (its last {steps} of "
                     f"{s['num_inference_steps']} steps)")
    if hasattr(info, "summary"):  # an extension's own line (the ControlNet's)
        lines.append(info.summary())
    if info.peak_memory_gib is not None:
        lines.append(f"peak GPU memory {info.peak_memory_gib:.1f} GiB")
    if "plain" in timings:
        lines.append(f"plain comparison: {plain_cost} UNet evaluations at full size, {timings['plain']:.1f} s")
    if "look_inside" in timings:
        lines.append(f"look inside: pictures drawn in {timings['look_inside']:.1f} s")
    return "  \n".join(lines)


def estimate_gpu_seconds(values: dict, native_px: int, cost_factor: float = 1.0, flow: bool = False) -> int:
    """GPU seconds to reserve on ZeroGPU: the cost model's UNet samples (x `cost_factor`), plain and look inside."""
    native_latent = native_px // 8
    try:
        width, height = int(values["width"]), int(values["height"])
        settings = {**preset(width, height, native_px, flow), **values}
        settings = {name: ed.knob(name).check(_read(settings[name], int), native_latent, demo=True)
                    for name in ("num_inference_steps", "resampling_steps", "patch_size")}
        settings["repaint"] = bool(values.get("repaint", True))
        strength = float(1 if values.get("strength") is None else values["strength"])  # image-to-image: last steps
        samples = ed.unet_cost(width, height, settings, native_latent, strength=strength, flow=flow).samples
        if values.get("compare_plain"):  # a plain image: 2 samples per step and native area
            samples += 2 * settings["num_inference_steps"] * width * height / native_px ** 2
    except (KeyError, TypeError, ValueError):  # invalid input fails fast anyway
        return 30
    seconds = samples * UNET_SAMPLE_SECONDS * cost_factor * (native_px / 1024) ** 2
    if values.get("look_inside"):
        seconds += look_inside_seconds(width, height)
    return int(min(300, 20 + 1.2 * seconds))  # 20 s for loading onto the GPU and decoding


def look_inside_seconds(width: int, height: int) -> float:
    """ZeroGPU's reservation for drawing the look-inside pictures while the GPU is held: 2 s + 0.75 s per
    megapixel, above what benchmarks/look_inside_cost.py measured on one CPU thread."""
    return 2.0 + 0.75 * width * height / 1e6


def on_gpu(handler: Callable, seconds: Callable[[dict], int], names: Sequence[str] = ()) -> Callable:
    """`spaces.GPU` on ZeroGPU, reserving `seconds(values)` for each request (positional values named by `names`);
    else `handler`."""
    if spaces is None:
        return handler
    return spaces.GPU(handler, duration=lambda *args, **kwargs: seconds({**dict(zip(names, args)), **kwargs}))


def _aspect_ratio(width: int, height: int) -> str:
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


class TextToImageApp:
    """The demo's handlers and layout, fixed at start-up; `app_gradio_img2img.ImageToImageApp` subclasses it."""

    title = "ElasticDiffusion"
    intro = ("Training-free image generation at any size and aspect ratio with a pretrained Stable Diffusion "
             "model, up to twice its native resolution per side "
             "([paper](https://arxiv.org/abs/2311.18822), CVPR 2024).")
    cost_factor = 1.0  # the GPU cost of one UNet sample, relative to the UNet alone (ZeroGPU's duration)
    stage_names = STAGE_NAMES  # the progress text of the sampler's stages before step 1
    # /generate's parameters around the knobs table's, in the order positional clients send them (new ones
    # are appended, so that older positional calls keep working).
    api_before_knobs = ("prompt", "negative_prompt", "width", "height", "seed", "randomize_seed", "compare_plain")
    api_after_knobs: tuple[str, ...] = ("look_inside",)
    # The examples: the fields an example sets, its rows in that order, their labels.
    example_inputs = ("prompt", "negative_prompt", "width", "height", "resampling_steps", "new_p", "rrg_init_weight",
                      "seed", "randomize_seed")
    example_rows = [[p["prompt"], ed.PRESET_NEGATIVE_PROMPT, p["width"], p["height"], p["resampling_steps"], p["new_p"],
                     p["rrg_init_weight"], 0, False] for p in ed.DEMO_PRESETS]
    example_labels = [f"{p['width']}×{p['height']} ({_aspect_ratio(p['width'], p['height'])}): {p['prompt'][:70]}"
                      + ("…" if len(p["prompt"]) > 70 else "") for p in ed.DEMO_PRESETS]
    examples_title = "Presets of the paper's demo (generated on first click, then cached)"

    def __init__(self, sampler, status: str = "", preview_every: int = PREVIEW_EVERY,
                 outputs: OutputFolders | None = None):
        self.sampler = sampler
        self.status = status if sampler is None else ""
        self.preview_every = preview_every
        self.outputs = outputs or OutputFolders()
        self.native_px = sampler.native_px if sampler is not None else DEFAULT_SIZE
        self.max_scale = getattr(sampler, "max_scale", ed.MAX_SCALE)
        self.flow = getattr(sampler, "is_flow", False)  # SD 3: its own presets

    @classmethod
    def api_inputs(cls) -> list[str]:
        """/generate's parameter names: the page's fields and one per row of the knobs table."""
        return [*cls.api_before_knobs, *(k.name for k in ed.KNOBS), *cls.api_after_knobs]

    def generate(self, progress=gr.Progress(), **values):
        """/generate: raw values by `api_inputs()` name; previews, then [(PNG, caption)], seed, summary, ..."""
        yield from self.stream(values, progress)

    def generate_example(self, *row, progress=gr.Progress()):
        """An example row in `example_inputs` order; gallery, seed and summary only (the cache holds no empty image)."""
        for outputs in self.stream(dict(zip(self.example_inputs, row), randomize_seed=False), progress):
            yield outputs[:3]

    def gpu_seconds(self, values: dict) -> int:
        """The ZeroGPU reservation of a request (`estimate_gpu_seconds`)."""
        return estimate_gpu_seconds(values, self.native_px, self.cost_factor, self.flow)

    def stream(self, values: dict, progress, sampler=None, **run_kwargs):
        """Check a request, then run it on `sampler` (default: the app's) in a thread; yield /generate's outputs:
        previews, then the result.

        `run_kwargs` go to `run_generation`. When Gradio closes this generator (Cancel, a client gone) the
        sampler stops at its next step or stage.
        """
        self._require_model()
        sampler = sampler or self.sampler
        request = parse_request(values, sampler)
        cancelled, previews = threading.Event(), queue.SimpleQueue()

        def preview(file, step: int, total: int, x0: torch.Tensor) -> None:
            # A preview costs a small decode; in Low VRAM mode it would also move the VAE each time.
            if self.preview_every and not request.low_vram and step % self.preview_every == 0 and step < total:
                small = torch.nn.functional.avg_pool2d(x0[:1], math.ceil(max(x0.shape[-2:]) / PREVIEW_LATENT_SIDE))
                path = file(f"preview_step{step}.png")  # in the request's folder: counted, pruned
                sampler.decode(small, tiled=False, output_type="pil")[0].save(path, format="PNG", compress_level=1)
                previews.put([(path, f"Preview, step {step}/{total}")])

        def work() -> tuple:
            with self.outputs.request() as file:
                run = RunProgress(progress, cancelled, functools.partial(preview, file), stage_names=self.stage_names)
                return run_generation(sampler, request, file, run, **run_kwargs)

        job = in_thread(work)
        try:
            yield gr.skip(), gr.skip(), "", *KEEP_LOOK_INSIDE  # clear the summary: the progress bar is drawn over it
            while not job.done():
                try:
                    yield previews.get(timeout=HEARTBEAT_SECONDS), gr.skip(), gr.skip(), *KEEP_LOOK_INSIDE
                except queue.Empty:  # lets Gradio close this generator between two events
                    yield gr.skip(), gr.skip(), gr.skip(), *KEEP_LOOK_INSIDE
            result = job.result()
        finally:
            cancelled.set()  # no-op after a normal end; otherwise the sampler stops between two steps
        yield result

    def _require_model(self) -> None:
        if self.sampler is None:
            raise refuse(self.status.replace("**", "").replace("`", ""), title="No model loaded", duration=None)

    def recommended(self, width: int, height: int) -> dict:
        """/recommended_settings: the preset for a size checked as /generate checks it, by /generate's names."""
        return preset(*checked_size(width, height, self.native_px, self.max_scale), self.native_px, self.flow)

    def build(self) -> gr.Blocks:
        with gr.Blocks(title=self.title, delete_cache=(CACHE_SWEEP_SECONDS, KEEP_OUTPUTS_SECONDS)) as demo:
            gr.Markdown(f"# {self.title}\n{self.intro}{self.model_note()}")
            if self.sampler is None:
                gr.Markdown(f"⚠️ {self.status}", elem_id="status-banner", container=True)
            widgets = self._inputs()
            with gr.Row(equal_height=True):
                widgets["prompt"] = gr.Textbox(label="Prompt", placeholder=self.placeholder, lines=2, scale=5,
                                               max_length=ed.MAX_PROMPT_CHARS, elem_id="prompt")
                with gr.Column(scale=1, min_width=160):
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            widgets.update(knob_widgets(self.native_px, getattr(self.sampler, "is_sdxl", True),
                                        max_scale=self.max_scale, extra_advanced=self._advanced, flow=self.flow))
            if "compare_plain" in self.api_before_knobs:  # the image demo's would need a ControlNet pipeline
                widgets["compare_plain"] = gr.Checkbox(
                    label="Also generate the plain image (the model run directly at this size, same seed) for "
                          "comparison", value=False, elem_id="compare-plain")
            widgets["look_inside"] = gr.Checkbox(
                label="Look inside: also show how the method builds this image (the two halves of the score, step "
                      "by step, and the local windows). Adds a few seconds.", value=False, elem_id="look-inside")
            wire_size_presets(widgets, self.native_px, self.max_scale, self.flow)
            outputs = self._result_widgets(widgets)
            handler = on_gpu(self.generate, self.gpu_seconds)
            event = gr.on([run.click, widgets["prompt"].submit], handler,
                          inputs_kwargs={name: widgets[name] for name in self.api_inputs()}, outputs=outputs,
                          api_name="generate", show_progress_on=outputs[2], concurrency_id="gpu",
                          preprocess=False)  # raw values: parse_request checks them
            cancel.click(lambda: "Cancelled: the run stops after the current step.", outputs=outputs[2],
                         cancels=[event], queue=False, api_visibility="private")
            self._more_events(widgets, outputs)
            gr.api(self.recommended, api_name="recommended_settings")
        return demo

    placeholder = "a photo of the dolomites"

    def _inputs(self) -> dict:
        """Widgets above the prompt (the image-to-image demo's input image); none here."""
        return {}

    def _advanced(self) -> dict:
        """More widgets inside Advanced options, after the seed; none here."""
        return {}

    def _more_events(self, widgets: dict, outputs: list) -> None:
        """The examples, lazily cached, each filling only the fields it sets."""
        fn = on_gpu(self.generate_example, self.gpu_seconds, names=self.example_inputs)
        self.examples = gr.Examples(
            self.example_rows, inputs=[widgets[name] for name in self.example_inputs], outputs=outputs[:3],
            fn=fn if self.sampler else None, cache_examples=self.sampler is not None, cache_mode="lazy",
            example_labels=self.example_labels, label=self.examples_title, examples_per_page=len(self.example_rows),
            preprocess=False)  # raw values, as /generate gets them
        # The example shows no look-inside view: a previous run's pictures must not stay beside its image.
        self.examples.dataset.click(lambda: NO_LOOK_INSIDE, outputs=outputs[3:], queue=False, show_progress="hidden",
                                    api_visibility="private")

    def model_note(self) -> str:
        """The header's sentence about the loaded model(s)."""
        if self.sampler is None:
            return ""
        untuned = (" An SD 3 model: ElasticDiffusion's settings for it are untuned (its presets keep SDXL's pull, "
                   "scaled to 16 latent channels)." if self.flow else "")
        return f" Model: `{ed.public_name(self.sampler.sd_version)}`, native {self.native_px} px.{untuned}"

    @staticmethod
    def _result_widgets(widgets: dict) -> list:
        """/generate's outputs: gallery, seed used, summary, then the look-inside sheet, animation, windows, caption."""
        gallery = gr.Gallery(label="Images", show_label=False, columns=2, height="auto", format="png",
                             object_fit="contain", elem_id="gallery", buttons=["download", "fullscreen"])
        with gr.Row(equal_height=True):
            # /generate's seed output, not displayed (PAGE_CSS): Gradio's page would show an empty Number as 0, so a
            # text box shows it. It starts at -1, no seed, so that a first result with seed 0 is a change too.
            seed_used = gr.Number(-1, label="Seed used", precision=0, elem_id="seed-value")
            seed_shown = gr.Textbox(label="Seed used", interactive=False, placeholder="after a run", max_lines=1,
                                    scale=0, min_width=180, elem_id="seed-used")
            reuse_seed = gr.Button("Reuse this seed", size="sm", scale=0, min_width=140)
            summary = gr.Markdown(label="Summary", elem_id="summary", min_height=90)
        seed_used.change(lambda seed: "" if seed is None or seed < 0 else str(int(seed)), inputs=seed_used,
                         outputs=seed_shown, queue=False, show_progress="hidden", api_visibility="private")
        reuse_seed.click(lambda seed: (int(seed), False) if seed else (gr.skip(), gr.skip()), inputs=seed_shown,
                         outputs=[widgets["seed"], widgets["randomize_seed"]], queue=False, api_visibility="private")
        with gr.Column(visible=False, elem_id="look-inside-view") as view:
            gr.Markdown("### Look inside")
            caption = gr.Markdown(label="What the pictures show", elem_id="look-inside-caption")
            # The pictures carry their own titles and legends: Gradio's label box would hide the sheet's title.
            picture = dict(type="filepath", interactive=False, show_label=False, buttons=["download", "fullscreen"])
            sheet = gr.Image(label="Contact sheet: x0, direction and unconditional score, step by step",
                             format="png", elem_id="look-inside-sheet", **picture)
            with gr.Row(equal_height=False):
                animation = gr.Image(label="Every recorded step", format="webp", elem_id="look-inside-animation",
                                     scale=1, **picture)
                windows = gr.Image(label="Local windows and the reference size on the image", format="png",
                                   elem_id="look-inside-windows", scale=2, **picture)
        widgets["look_inside"].change(lambda on: gr.Column(visible=on), inputs=widgets["look_inside"], outputs=view,
                                      queue=False, show_progress="hidden", api_visibility="private")
        return [gallery, seed_used, summary, sheet, animation, windows, caption]


def configure_logging(verbose: bool) -> None:
    """The apps' own messages (start-up, disk use) always; every library's INFO lines with -v."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)


def private_storage(max_output_mb: int) -> OutputFolders:
    """A folder of this process for Gradio's files and the outputs, removed on exit (call before building)."""
    folder = tempfile.mkdtemp(prefix="elastic_diffusion_app_", dir=os.environ.get("GRADIO_TEMP_DIR"))
    atexit.register(shutil.rmtree, folder, True)
    if threading.current_thread() is threading.main_thread():  # a SIGTERM while loading also cleans up
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.environ["GRADIO_TEMP_DIR"] = folder
    return OutputFolders(max_bytes=max_output_mb * 2 ** 20, parent=folder)


def serve(demo: gr.Blocks, args: argparse.Namespace, outputs: OutputFolders, max_file_size: int = 0,
          uploads: str = "none accepted", **launch_kwargs) -> None:
    """Queue (one GPU job at a time), launch, serve until SIGTERM or Ctrl+C, then remove what the app stored.

    `max_file_size` 0 refuses every upload; an app that takes files says how it bounds them in `uploads`.
    """
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    signals = []  # a plain list: a handler that took a lock could deadlock the main thread it interrupts
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: signals.append(signum))
    # quiet: Gradio's banner says to "set share=True in launch()"; here a link is asked for with --share.
    _, local_url, share_url = demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                                          show_error=False, max_file_size=max_file_size, css=PAGE_CSS, quiet=True,
                                          prevent_thread_lock=True, **launch_kwargs)
    logger.info("Running on %s%s", local_url, f" and on the public link {share_url}" if share_url else
                " (no public link: it could not be made, see above)" if args.share else
                " (pass --share for a temporary public link)")
    logger.info("Storing results and previews in %s: at most %d MB, each kept %d min, all removed on exit; "
                "%.1f GiB free on that disk. Uploads: %s.", outputs.root, outputs.max_bytes // 2 ** 20,
                outputs.keep_seconds // 60, shutil.disk_usage(outputs.root).free / 2 ** 30, uploads)
    try:
        while not signals and demo.is_running:
            time.sleep(0.2)
    finally:
        logger.info("Stopping: closing the server and removing the app's files.")
        demo.close(verbose=False)
        outputs.remove()


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    outputs = private_storage(args.max_output_mb)
    sampler, status = load_sampler(args)
    app = TextToImageApp(sampler, status, preview_every=args.preview_every, outputs=outputs)
    serve(app.build(), args, outputs)


if __name__ == "__main__":
    main()
