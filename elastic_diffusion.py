"""ElasticDiffusion: training-free arbitrary-size image generation with pretrained Stable Diffusion.

Haji-Ali, Balakrishnan and Ordonez, "ElasticDiffusion: Training-free Arbitrary Size Image Generation
through Global-Local Content Separation", CVPR 2024 (arXiv 2311.18822).

Classifier-free guidance splits the score into an unconditional part and a class direction:

    eps_hat = eps(x, neg) + w * [eps(x, prompt) - eps(x, neg)]

ElasticDiffusion estimates the two parts differently:

* the class direction (global content) on a *reference latent*, a sub-sampled copy of the latent whose
  longer side is the UNet's native size, written back to full resolution over several resampling passes;
* the unconditional score (local detail) on overlapping native-size crops of the full-resolution latent.

Then a DDIM step, a repaint pass and reduced-resolution guidance (RRG). Every UNet input is at most
native size; smaller ones are padded with noised, VAE-encoded solid colours.

The stages are described in `docs/method.md`; comments link to its sections.

Python:

    pipe = ElasticDiffusion(device=torch.device("cuda"), sd_version="XL1.0")
    images, info = pipe.generate_image(prompts="a photo of the dolomites", height=1024, width=2048)

Command line: ``python elastic_diffusion.py --help``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import random
import re
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger("elastic_diffusion")

# --------------------------------------------------------------------------------------------------
# Models and presets (docs/method.md#models-and-scheduler, docs/method.md#demo-presets)
# --------------------------------------------------------------------------------------------------

MODEL_IDS = {
    "1.4": "CompVis/stable-diffusion-v1-4",
    "1.5": "runwayml/stable-diffusion-v1-5",
    "2.0": "stabilityai/stable-diffusion-2-base",
    "2.1": "stabilityai/stable-diffusion-2-1-base",
    "XL1.0": "stabilityai/stable-diffusion-xl-base-1.0",
    "3.5-medium": "stabilityai/stable-diffusion-3.5-medium",  # docs/method.md#flow-matching-models-sd-35
    "3.5-large": "stabilityai/stable-diffusion-3.5-large",
}
# runwayml removed its repository in 2024; the same weights live on under this id.
HUB_MIRRORS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}

DEFAULT_NEGATIVE_PROMPT = "blurry, ugly, duplicate, no details, deformed"
PRESET_NEGATIVE_PROMPT = "blurry, ugly, poorly drawn, deformed"

# The 14 examples of the official demo (docs/method.md#demo-presets), prompts verbatim (typos included), seed 0.
DEMO_PRESETS = [dict(prompt=prompt, width=w, height=h, resampling_steps=r, new_p=0.3, rrg_init_weight=weight)
                for w, h, r, weight, prompt in (  # width, height, R, λ0, the prompt
    (2048, 2048, 10, 2000, "A realistic portrait of a young black woman. she has a Christmas red hat and a red scarf."
                           " Her eyes are light brown like they're almost caramel color. Her attire, simple yet "
                           "dignified."),
    (1536, 1536, 7, 1000, "Envision a portrait of a horse, framed by a blue headscarf with muted tones of rust and "
                          "cream. she has brown-colored eyes. Her attire, simple yet dignified"),
    (1024, 2048, 7, 1000, "Envision a portrait of a cute corgi, framed by a red headscarf. his eyes are light brown. "
                          "his attire is simple yet dignified"),
    (2048, 1024, 7, 1000, "Envision an ostrich in the dessert. she has a green scarf wrapping her body. her eyes are "
                          "dark black. her attire, simple yet dignified"),
    (1080, 1920, 7, 1000, "Envision a portrait of a cute cat, her face is framed by a blue headscarf with muted tones"
                          " of rust and cream. Her eyes are blue like faded denim. Her attire, simple yet dignified"),
    (1920, 1080, 7, 1000, "Envision a realistic portrait of a black woman, she has a white headscarf. Her eyes are "
                          "dark black. her attire, simple yet delightful."),
    (2048, 1536, 10, 1500, "A Cute Puppy with wings, Cartoon Drawings, high details"),
    (1536, 2048, 10, 1500, "Darth Vader playing with raccoon in Mars during sunset."),
    (768, 2048, 7, 1000, "A dramatic photo of a volcanic eruption, high details, sharp."),
    (2048, 768, 7, 1000, "A photo of the dolomites, highly detailed, sharp"),
    (768, 768, 0, 0, "A professional photo of a rabbit riding a bike on a street in New York"),
    (512, 512, 0, 0, "An illustration of an astronaut riding a horse"),
    (2048, 512, 7, 1000, "A front view of a beautiful waterfall"),
    (512, 2048, 7, 1000, "A realistic bird-eye view of a lake with palm tree on the side, simply, high details."),
)]

# The paper's validated range: up to 2x the native size per side (docs/method.md#the-2x-limit). The
# sub-sampler here is general (groups of up to g = ceil(L / l) source pixels, g*g candidates per cell,
# docs/method.md#fix-general-sub-sampler), so larger sizes run when a user raises `max_scale`; their
# quality is not validated.
MAX_SCALE = 2
MIN_SIDE_PX = 128  # the demo's smallest size; below it the image is mostly padding
MAX_SEED = 2 ** 32 - 1  # seeds the CLI, the demos, batch and cog accept (the range a blank seed is drawn from)
MAX_PROMPT_CHARS = 1000  # CLIP reads 77 tokens (~300 characters): far longer text is a paste mistake

# --------------------------------------------------------------------------------------------------
# The knobs table: every knob's rule, default, CLI flag and demo widget, in one place
# --------------------------------------------------------------------------------------------------

PRESET = "preset"  # a default that `recommended_settings` works out from the image size and the model
NATIVE_LATENT = "native latent size"  # a bound equal to the loaded model's native latent size D


def format_number(value: float) -> str:
    """A number as people write it: 4294967295, 0.05, 2048 (never 4.29497e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def describe_range(minimum: float | str | None, maximum: float | str | None, open_minimum: bool = False,
                   open_maximum: bool = False) -> str:
    """The range in words: "between 1 and 1000", "in (0, 1]", ">= 0", or "" when unbounded."""
    low, high = (None if v is None else v if isinstance(v, str) else format_number(v) for v in (minimum, maximum))
    if low is not None and high is not None:
        if not (open_minimum or open_maximum):
            return f"between {low} and {high}"
        return f"in {'(' if open_minimum else '['}{low}, {high}{')' if open_maximum else ']'}"
    if low is not None:
        return f"{'>' if open_minimum else '>='} {low}"
    return "" if high is None else f"{'<' if open_maximum else '<='} {high}"


def check_number(subject: str, value, minimum: float | None = None, maximum: float | None = None,
                 integer: bool = False, open_minimum: bool = False, open_maximum: bool = False):
    """`value` if it is a finite number (a whole one if `integer`) within the bounds; else ValueError.

    The message names `subject` and the rule: "num_inference_steps must be a whole number between 1 and
    1000; got 0". None leaves a side unbounded; an open side excludes the bound itself.
    """
    span = describe_range(minimum, maximum, open_minimum, open_maximum)
    kind = "a whole number" if integer else "a number" if span else "a finite number"
    fits_type = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not fits_type or not math.isfinite(value):
        raise ValueError(f"{subject} must be {kind} {span}".rstrip() + f"; got {value!r}")
    too_low = minimum is not None and (value <= minimum if open_minimum else value < minimum)
    too_high = maximum is not None and (value >= maximum if open_maximum else value > maximum)
    if too_low or too_high:
        raise ValueError(f"{subject} must be {span}; got {format_number(value)}")
    return value


@dataclass(frozen=True)
class Knob:
    """One knob of the sampler: what the CLI, `check_inputs`, the demos, the PNG metadata and the README use.

    `minimum`/`maximum` bound what the sampler accepts (None: unbounded; `NATIVE_LATENT`: the loaded
    model's native latent size); `demo_range` is the narrower (minimum, maximum) that the shared demos
    accept, which bounds a stranger's GPU time. `default` is a constant, or `PRESET` for a value that
    `recommended_settings` works out from the size (`preset` says how). Memory knobs change memory and
    speed, never the image: they are the sampler's (constructor or call) arguments, not settings.
    """
    name: str
    type: type  # int, float or bool
    default: object  # a constant, or PRESET
    help: str  # one line: the CLI's --help, the demos' widget info, the README
    label: str  # the demos' widget label
    minimum: float | None = None
    maximum: float | str | None = None
    open_minimum: bool = False  # the minimum itself is not allowed
    open_maximum: bool = False
    choices: tuple = ()  # the only values allowed (instead of a range)
    demo_range: tuple | None = None  # (minimum, maximum) in the demos; None: the sampler's own range
    step: float = 1  # the demos' slider grid
    aliases: tuple[str, ...] = ()  # more CLI flags, e.g. the official CLI's names
    preset: str = ""  # how `recommended_settings` sets a PRESET default
    memory: bool = False
    sdxl_only: bool = False  # means something for SDXL models only

    def limits(self, native_latent: int, demo: bool = False) -> tuple:
        """(minimum, maximum) with `NATIVE_LATENT` resolved; `demo`: the demos' range."""
        low, high = self.demo_range if demo and self.demo_range else (self.minimum, self.maximum)
        return low, native_latent if high == NATIVE_LATENT else high

    def clamp(self, value, native_latent: int, demo: bool = False):
        """The allowed value nearest to `value`: a number moved into the range; other kinds unchanged."""
        if self.type is bool or self.choices:
            return value
        low, high = self.limits(native_latent, demo)
        value = value if low is None else max(value, low)
        return value if high is None else min(value, high)

    def check(self, value, native_latent: int, demo: bool = False, subject: str | None = None):
        """`value` if it obeys this knob's rule (type, then range or choices); else ValueError naming
        `subject` (default: the knob's name) and the rule."""
        subject = subject or self.name
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{subject} must be true or false; got {value!r}")
            return value
        if self.choices:
            if isinstance(value, bool) or value not in self.choices:
                allowed = " or ".join(format_number(c) for c in self.choices)
                raise ValueError(f"{subject} must be {allowed}; got {value!r}")
            return value
        low, high = self.limits(native_latent, demo)
        open_low, open_high = (False, False) if demo and self.demo_range else (self.open_minimum, self.open_maximum)
        return check_number(subject, value, low, high, self.type is int, open_low, open_high)


KNOBS = (
    Knob("num_inference_steps", int, 50, "DDIM steps; time grows linearly with them (50 is the paper's setting)",
         "Number of inference steps (T)", minimum=1, maximum=1000, demo_range=(1, 150), aliases=("steps",)),
    Knob("guidance_scale", float, 10.0, "classifier-free guidance: how closely the image follows the prompt "
         "(it scales the global content direction)", "Classifier-free guidance scale (ω)",
         demo_range=(1, 30), step=0.5),
    Knob("resampling_steps", int, PRESET, "extra passes over the reduced-resolution reference per step: sharper "
         "and more coherent, but slower (2 UNet samples per image each)", "Resampling steps (R)",
         minimum=0, demo_range=(0, 40), preset="0 at or below the native size, 7 above it, 10 from 2.5x the "
         "native area"),
    Knob("new_p", float, 0.3, "fraction of reference pixels drawn from new positions in each resampling pass "
         "(0.3 is the paper's recommendation; drop_p = 1 - new_p)", "Fraction of newly sampled pixels (ρ)",
         minimum=0, maximum=1, open_minimum=True, demo_range=(0.05, 1), step=0.05),
    Knob("rrg_init_weight", float, PRESET, "reduced-resolution guidance weight at the first step: higher removes "
         "artefacts such as repeated objects but blurs, too high lets the padding colours bleed in",
         "Reduced-resolution guidance scale (λ0)", minimum=0, demo_range=(0, 10000), step=50,
         aliases=("rrg_scale",), preset="0 at or below the native size, else 500 x the area in native areas "
         "(rounded), at least 1000: the pull at step 0 stays near 0.015"),
    Knob("cosine_scale", float, 10.0, "how fast the reduced-resolution guidance fades over the steps, "
         "λ0·(½(1 + cos(πi/S)))^κ: higher releases it sooner", "Cosine scale (κ)", minimum=0,
         demo_range=(0, 50), step=0.5),
    Knob("rrg_stop_t", float, 0.4, "fraction of the final steps that run without reduced-resolution guidance "
         "(0.4: the official demo's value)", "RRG stop", minimum=0, maximum=1, open_maximum=True,
         demo_range=(0, 0.95), step=0.05),
    Knob("patch_size", int, PRESET, "width of each local window in latent pixels (its context is the rest of "
         "the native size): larger is faster but may hurt coherence", "Patch size (latent pixels)",
         minimum=1, maximum=NATIVE_LATENT, demo_range=(8, NATIVE_LATENT), step=8,
         preset="half the native latent size: 64 on SDXL, 32 on SD 1.x/2.x"),
    Knob("view_batch_size", int, 16, "most native-size samples per UNet call: lower it if the GPU runs out of "
         "memory", "View batch size", minimum=1, demo_range=(1, 64), memory=True),
    Knob("repaint", bool, True, "re-noise and redo each step with one reference pass and guidance ω/3 (part of "
         "the method; off only for ablations)", "Repaint pass", aliases=("repaint_sampling",)),
    Knob("tiled_decoder", bool, False, "decode in blended overlapping tiles (diffusers' VAE tiling): less memory",
         "Tiled decoder"),
    Knob("low_vram", bool, False, "keep the models on the CPU and only the running one on the GPU (diffusers' "
         "model CPU offload): slower, for small GPUs", "Low VRAM", memory=True),
    Knob("time_ids_scale", int, 4, "SDXL size conditioning: 4x the image size as the official code, or 1x as "
         "diffusers", "SDXL size conditioning", choices=(1, 4), sdxl_only=True),
)


def knob(name: str) -> Knob:
    """The row of KNOBS called `name`."""
    for row in KNOBS:
        if row.name == name:
            return row
    raise KeyError(f"no knob {name!r}; the knobs are {[k.name for k in KNOBS]}")


def method_knobs() -> list[Knob]:
    """The knobs that make the image (the settings of a run), in the table's order."""
    return [k for k in KNOBS if not k.memory]


def recommended_settings(width: int, height: int, native_px: int = 1024, flow: bool = False) -> dict:
    """Resolution-aware defaults: reproduce the 14 demo presets at their sizes, interpolate elsewhere.

    Rules read off the presets (docs/method.md#resolution-aware-settings): nothing to resample at or
    below the native size (R = 0, no RRG); otherwise R = 10 for the largest pixel counts (>= 2.5x the
    native area) and 7 below, and the RRG weight grows with the area so the pull at step 0,
    2*lambda0/(4*H*W), stays near 0.015: lambda0 = 500 * round(area / native area), at least 1000.
    Every other method knob takes its constant default from KNOBS. `flow` (SD 3.5, untuned): `FLOW_DEFAULTS`, and
    lambda0 x 4 for its 16 latent channels, so that the pull 2*lambda0/(16*H*W) is SDXL's.
    """
    area = (width * height) / float(native_px * native_px)
    if max(width, height) > native_px:
        resampling_steps = 10 if area >= 2.5 else 7
        rrg_init_weight = 500.0 * max(2, math.floor(area + 0.5))
    else:
        resampling_steps, rrg_init_weight = 0, 0.0
    preset = dict(resampling_steps=resampling_steps, rrg_init_weight=rrg_init_weight * (4 if flow else 1),
                  patch_size=native_px // 16, **(FLOW_DEFAULTS if flow else {}))
    return {k.name: preset.get(k.name, k.default) for k in method_knobs()}


# SD 3.5's own step count and guidance (the model cards' range); ElasticDiffusion's settings for it are untuned.
FLOW_DEFAULTS = dict(num_inference_steps=28, guidance_scale=4.5)


def settings_for(width: int, height: int, native_px: int, flow: bool = False, **explicit) -> dict:
    """A run's method knobs: `recommended_settings` with the explicitly given (non-None) values on top.

    TypeError for a name that is not a method knob of KNOBS (as Python's for an unknown keyword); ValueError for
    an SDXL-only knob other than its default on an SD 3 model (`flow`), where it means nothing.
    """
    for row in KNOBS:
        if flow and row.sdxl_only and explicit.get(row.name) not in (None, row.default):
            raise ValueError(f"{row.name} is SDXL's size conditioning: SD 3 models have none; leave it out")
    settings = recommended_settings(width, height, native_px, flow)
    unknown = sorted(set(explicit) - set(settings))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}; the method's knobs are {sorted(settings)}")
    settings.update({k: v for k, v in explicit.items() if v is not None})
    return settings


def apply_drop_p(knobs: dict, drop_p: float | None) -> dict:
    """`knobs` with `new_p` from the official spelling `drop_p` = 1 - new_p (when given); ValueError if both
    disagree."""
    if drop_p is None:
        return knobs
    new_p = knobs.get("new_p")
    if new_p is not None and abs((1 - drop_p) - new_p) > 1e-9:
        raise ValueError(f"drop_p={drop_p} and new_p={new_p} disagree: drop_p is 1 - new_p; give one")
    return dict(knobs, new_p=round(1 - drop_p, 12))  # 1 - 0.7 is 0.30000000000000004 in floats


def check_size(height, width, native_px: int | None, vae_scale_factor: int = 8, max_scale: int = MAX_SCALE) -> None:
    """ValueError unless height and width are whole multiples of the VAE factor between MIN_SIDE_PX and
    max_scale x the native size; the message names the side, the rule and what to do instead. Needs no
    model: a prompts file (batch.py) and the command line are checked with it before one is loaded, and
    `native_px` None (not known before loading) leaves the largest side to the check after loading."""
    limit = None if native_px is None else max_scale * native_px
    f = vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer number of pixels; got {value!r}")
        if value < MIN_SIDE_PX:
            raise ValueError(f"{name} must be at least {MIN_SIDE_PX} pixels (a smaller image would be mostly "
                             f"padding); got {value}")
        if limit is not None and value > limit:
            hint = ("; larger sizes are experimental: set max_scale (CLI --max_scale) to 3 or 4 to allow them"
                    if max_scale == MAX_SCALE else "")
            raise ValueError(f"{name} must be between {MIN_SIDE_PX} and {limit} pixels for this model "
                             f"(at most {max_scale}x its native {native_px} px per side){hint}; got {value}")
        if value % f:
            lower = value - value % f
            raise ValueError(f"{name} must be a multiple of {f} (the VAE works on {f}x{f} pixel blocks): "
                             f"try {lower} or {lower + f} instead of {value}")


def knob_flags(args, native_latent: int | None) -> dict:
    """The method knobs of a command line's `args` (None: the preset), --drop_p folded into new_p, each one
    given checked against its row of KNOBS; ValueError naming its flag. `native_latent` None (not known
    before loading) leaves a bound that needs it (patch_size's) to the check after loading."""
    knobs = apply_drop_p({row.name: getattr(args, row.name) for row in method_knobs()}, args.drop_p)
    for name, value in knobs.items():
        if value is not None:
            knob(name).check(value, native_latent, subject=f"--{name}")
    return knobs


def check_settings(settings: dict, native_latent: int) -> None:
    """ValueError unless every knob in `settings` obeys its row of KNOBS (type, then range or choices)."""
    for row in KNOBS:
        if row.name in settings:
            row.check(settings[row.name], native_latent)


def check_prompt(subject: str, value, required: bool = True) -> str:
    """`value` stripped, if it is text of at most MAX_PROMPT_CHARS characters, not blank if `required`; else
    ValueError naming `subject` and the rule. For requests from strangers (a hosted API): the sampler takes any
    string."""
    value = "" if value is None else value
    if not isinstance(value, str):
        raise ValueError(f"{subject} must be text; got {type(value).__name__} {value!r}")
    value = value.strip()
    if required and not value:
        raise ValueError(f"{subject} is empty: describe the image you want, e.g. \"a photo of the dolomites\"")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{subject} is {len(value)} characters long; shorten it to at most {MAX_PROMPT_CHARS} (the "
                         "text encoder reads only its first 77 tokens, about 300 characters)")
    return value


def public_name(model) -> str:
    """A hub id as it is, a local model by its folder or file name: no server paths in what a stranger sees."""
    name = str(model)
    is_path = os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)
    return os.path.basename(os.path.normpath(name)) if is_path else name


# --------------------------------------------------------------------------------------------------
# Input images: the ControlNet's condition and the image-to-image start (docs/method.md#image-to-image)
# --------------------------------------------------------------------------------------------------

MAX_INPUT_PIXELS = 8192 * 8192  # 64 MP: larger inputs are refused before they are decoded
DEFAULT_STRENGTH = 0.5  # image-to-image: half the steps keep the layout and colours and redo the detail


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image of any mode: alpha composited on white, 16-bit and float maps min-max scaled."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # e.g. a 16-bit depth map
        a = np.asarray(image, dtype=np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
        image = Image.fromarray((a * 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def load_image(image, name: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """A path, PIL image or H x W x 3 uint8 array -> RGB PIL image, EXIF orientation applied; ValueError naming
    `name` if it is unusable."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with Image.open(path) as opened:  # reads the header; pixels are decoded after the size check
                return load_image(opened, name, max_pixels)
        except Image.DecompressionBombError as error:
            raise ValueError(f"{name}: {path!r} is too large ({error}); the limit is {max_pixels} pixels") from error
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{name}: {path!r} is not a readable image file ({error})") from error
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name} as an array must be H x W x 3 uint8; got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be an image file path, a PIL image or an H x W x 3 uint8 array; got "
                         f"{type(image).__name__}")
    w, h = image.size
    if w * h == 0 or w * h > max_pixels:
        raise ValueError(f"{name} has no pixels ({w}x{h})" if w * h == 0 else
                         f"{name} is {w}x{h} pixels ({w * h / 1e6:.0f} MP); at most {max_pixels / 1e6:.0f} MP "
                         "are accepted, downscale it first")
    try:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data, unsupported mode
        raise ValueError(f"{name} could not be decoded ({error})") from error


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The resize rule of every input image: Lanczos-scale to cover width x height (aspect kept), then centre-crop
    the overflow (nothing stretched or letterboxed)."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def image_size(image: Image.Image, upscale: float | None = None, height: int | None = None,
               width: int | None = None, vae_scale_factor: int = 8) -> tuple[int, int]:
    """(height, width) of an image-to-image run: those given, else the image's size times `upscale` (default 1)
    rounded down to a multiple of the VAE factor; ValueError naming `upscale` unless it is a number > 0."""
    upscale = 1 if upscale is None else check_number("upscale", upscale, 0, open_minimum=True)
    f = vae_scale_factor
    return tuple(int(side * upscale) // f * f if given is None else given
                 for side, given in ((image.height, height), (image.width, width)))


def image_request(image, strength, upscale, height: int | None, width: int | None, native_px: int | None,
                  vae_scale_factor: int = 8, max_scale: int = MAX_SCALE, flag: str = ""):
    """An image-to-image request's (picture, height, width, strength), checked before any model work (the sampler,
    the command line and batch.py's plan): (None, height, width, None) without an image. ValueError naming the
    argument (`flag` "--": its command-line flag): strength or upscale without an image, a bad strength, an
    unreadable picture, or a size the picture and upscale make that `check_size` refuses."""
    if image is None:
        if strength is not None or upscale is not None:
            raise ValueError(f"{flag}strength and {flag}upscale go with {flag}image: give the picture to start from")
        return None, height, width, None
    picture = load_image(image, f"{flag}image")
    height, width = image_size(picture, upscale, height, width, vae_scale_factor)
    try:
        check_size(height, width, native_px, vae_scale_factor, max_scale)
    except ValueError as error:
        raise ValueError(f"{flag}image is {picture.width}x{picture.height} pixels and {flag}upscale {upscale or 1} "
                         f"makes it {width}x{height}: {error}") from None
    return picture, height, width, DEFAULT_STRENGTH if strength is None else check_number(f"{flag}strength",
                                                                                          strength, 0, 1)


def image_hash(image: Image.Image) -> str:
    """A short hash of an image's size and pixels: what a record keeps of its input image (never its path)."""
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()[:16]


def run_steps(num_inference_steps: int, strength: float = 1.0) -> int:
    """How many steps an image-to-image run does: the last int(T * strength) of the T-step schedule (diffusers'
    rule); text-to-image (strength 1) does all T."""
    return min(int(num_inference_steps * strength), num_inference_steps)


# --------------------------------------------------------------------------------------------------
# Geometry: reference size, sub-sampler tables, local views, padding (docs/method.md#reference-size ff.)
# --------------------------------------------------------------------------------------------------


def reference_size(height: int, width: int, native_px: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """Latent size (h, w) of the reference: longer side = native, aspect kept (docs/method.md#reference-size)."""
    f = max(max(height, width) / native_px, 1.0)
    return int((height // f) // vae_scale_factor), int((width // f) // vae_scale_factor)


def axis_groups(length: int, ref_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a source axis into `ref_length` contiguous groups (docs/method.md#group-rule).

    Returns (start, size), both (ref_length,) long: group m is [start[m], start[m] + size[m]).
    """
    m = torch.arange(ref_length + 1)
    bounds = (m * length) // ref_length
    return bounds[:-1], bounds[1:] - bounds[:-1]


def group_map(length: int, ref_length: int) -> torch.Tensor:
    """(length,) long: the reference index whose group contains each source index."""
    start, size = axis_groups(length, ref_length)
    return torch.repeat_interleave(torch.arange(ref_length), size)


@functools.lru_cache(maxsize=128)
def _index_table(kind: str, length: int, ref_length: int, device: torch.device) -> torch.Tensor:
    """Group maps and group starts on the device, made once per size (no copies inside the loop)."""
    table = group_map(length, ref_length) if kind == "map" else axis_groups(length, ref_length)[0]
    return table.to(device)


def axis_offsets(length: int, ref_length: int) -> torch.Tensor:
    """(ref_length,) long: the equally likely offsets a cell has along one axis, max(2, group size).

    A group of n source indices offers each of them once, so every index of the group is picked
    with the same probability whatever n is. A group of one index offers it twice: at ratios in
    [1/2, 1] every cell then keeps the official four-way choice, and with it the coverage numbers
    of the paper's sub-sampler.
    """
    return axis_groups(length, ref_length)[1].clamp(min=2)


def candidate_counts(H: int, W: int, h: int, w: int) -> torch.Tensor:
    """(h, w) long: candidates of each reference cell, its row offsets times its column offsets.

    4 everywhere at ratios in [1/2, 1] (the official 2x2 choice); 6 in a row of cells whose group
    holds 3 source rows (e.g. 2048x1032 on SDXL); g*g beyond 2x (groups of g, experimental).
    """
    return axis_offsets(H, h)[:, None] * axis_offsets(W, w)[None, :]


def choose_cells(num_passes: int, counts: torch.Tensor, new_p: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-cell candidate index k for each resampling pass, shape (num_passes, h, w).

    `counts` (h, w) is the number of candidates of each cell (`candidate_counts`). Pass 0 picks
    k = 0 (top-left). Each later pass draws a fresh k uniformly among the cell's k not yet used
    (any of its k once all are used) and takes it with probability exactly `new_p`, else keeps
    the previous pass's k. One k per cell serves all channels and batch items.
    """
    h, w = counts.shape
    num_choices = int(counts.max())
    invalid = torch.arange(num_choices) >= counts[..., None]  # k beyond the cell's own candidates
    k = torch.zeros(h, w, dtype=torch.long)
    used = invalid.clone()
    used[..., 0] = True
    passes = [k]
    for _ in range(1, num_passes):
        scores = torch.rand(h, w, num_choices, generator=generator)
        exhausted = used.all(-1, keepdim=True)
        fresh = scores.masked_fill((used & ~exhausted) | invalid, -1.0).argmax(-1)
        take_fresh = torch.rand(h, w, generator=generator) < new_p
        k = torch.where(take_fresh, fresh, k)
        used.scatter_(-1, k[..., None], True)
        passes.append(k)
    return torch.stack(passes)


def source_indices(k: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-resolution (row, col) gathered for each reference cell, each (..., h, w) long.

    Candidate k of cell (m, n) is row offset k // c_n and column offset k % c_n inside the cell's
    groups, c_n being the column's offset count (`axis_offsets`); an offset past a group of one
    source index is clamped to it. With two offsets per axis: 0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right.
    """
    h, w = k.shape[-2:]
    row_start, row_size = axis_groups(H, h)
    col_start, col_size = axis_groups(W, w)
    col_offsets = col_size.clamp(min=2)
    rows = row_start[:, None] + torch.minimum(k // col_offsets, row_size[:, None] - 1)
    cols = col_start + torch.minimum(k % col_offsets, col_size - 1)
    return rows, cols


def gather_reference(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Reference latent(s): x (B, C, H, W), rows/cols (S, h, w) -> (S, B, C, h, w)."""
    return torch.stack([x[:, :, r, c] for r, c in zip(rows, cols)])


class AxisWindow(NamedTuple):
    """One window along one axis: the crop fed to the UNet and the part of it this window owns."""
    crop_start: int
    crop_end: int
    own_start: int
    own_end: int


def axis_windows(length: int, native: int, patch: int) -> list[AxisWindow]:
    """Windows of size `patch` (stride `patch`) with context native - patch along one axis.

    See docs/method.md#local-views.
    """
    context = native - patch
    window = length if patch + context >= length else patch
    count = 1 if window == length else -(-(length - window) // patch) + 1
    half = context // 2
    windows, written = [], 0
    for j in range(count):
        a = min(j * patch, length - window)  # the last window is moved back inside the axis
        b = a + window
        if window == length:
            before = after = 0
        elif a - half < 0:  # context that does not fit before the window goes after it, and back
            before = a
            after = min(2 * half - before, length - b)
        else:
            after = min(half, length - b)
            before = min(2 * half - after, a)
        # First writer wins: a moved-back window only owns what earlier windows left.
        windows.append(AxisWindow(a - before, b + after, max(a, written), b))
        written = b
    return windows


def local_views(H: int, W: int, native: int, patch: int) -> list[tuple[AxisWindow, AxisWindow]]:
    """Row-major product of row and column windows: the V local views (docs/method.md#local-views)."""
    return [(r, c) for r in axis_windows(H, native, patch) for c in axis_windows(W, native, patch)]


def centered_padding(h: int, w: int, native: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) that centre an (h, w) latent on a native x native canvas.

    See docs/method.md#background-padding.
    """
    ph, pw = native - h, native - w
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2


def padding_strips(h: int, w: int, native: int) -> dict[str, tuple[int, int]]:
    """Latent (height, width) of each background strip; width is padded first, then height."""
    top, bottom, left, right = centered_padding(h, w, native)
    strips = {"left": (h, left), "right": (h, right), "top": (top, native), "bottom": (bottom, native)}
    return {name: size for name, size in strips.items() if size[0] > 0 and size[1] > 0}


def background_strips(h: int, w: int, views: list, native: int) -> set[tuple[str, tuple[int, int]]]:
    """Every (name, latent size) of strip a run pads with: the reference's (h x w) and the local crops' (all
    crops have the size of the first), each encoded once per timestep (docs/method.md#background-padding)."""
    rows, cols = views[0]
    crop = (rows.crop_end - rows.crop_start, cols.crop_end - cols.crop_start)
    return set(padding_strips(h, w, native).items()) | set(padding_strips(*crop, native).items())


class Layout(NamedTuple):
    """Where a run's UNet samples come from: what the sampling loop and the cost model (`unet_cost`) both use."""
    latent_size: tuple[int, int]  # (H, W)
    reference_size: tuple[int, int]  # (h, w)
    views: list  # the V local views
    strips: set  # background strips (`background_strips`)

    def pass_inputs(self, num_passes: int) -> tuple[int, int]:
        """(reference passes, local views) a pass of `num_passes` reference passes evaluates: when the reference
        is the latent itself (up to the native size), one [neg; pos] pair serves them all, (1, 0)."""
        return (1, 0) if self.reference_size == self.latent_size else (num_passes, len(self.views))


def layout(height: int, width: int, native_latent: int, patch_size: int, vae_scale_factor: int = 8,
           flow: bool = False) -> Layout:
    """The `Layout` of an image of height x width pixels (docs/method.md#reference-size, #local-views). `flow`
    (SD 3, trained at many aspect ratios): an image within the native size runs at its own size, unpadded."""
    f, D = vae_scale_factor, native_latent
    H, W = height // f, width // f
    h, w = reference_size(height, width, D * f, f)
    views = local_views(H, W, D, patch_size)
    return Layout((H, W), (h, w), views, set() if flow and (h, w) == (H, W) else background_strips(h, w, views, D))


def repaint_passes(settings: dict) -> bool:
    """Whether each step but the last has a repaint pass: repaint on and R > 0 (docs/method.md#repaint)."""
    return settings["repaint"] and settings["resampling_steps"] > 0


def pad_with_strips(x: torch.Tensor, strips: dict[str, torch.Tensor]) -> torch.Tensor:
    """x (N, C, h, w) -> (N, C, D, D) with background strips (1, C, sh, sw) around it."""
    n = x.shape[0]
    parts = [strips["left"].expand(n, -1, -1, -1)] if "left" in strips else []
    parts += [x] + ([strips["right"].expand(n, -1, -1, -1)] if "right" in strips else [])
    x = torch.cat(parts, dim=3)
    parts = [strips["top"].expand(n, -1, -1, -1)] if "top" in strips else []
    parts += [x] + ([strips["bottom"].expand(n, -1, -1, -1)] if "bottom" in strips else [])
    return torch.cat(parts, dim=2)


# --------------------------------------------------------------------------------------------------
# Score assembly, DDIM, repaint and reduced-resolution guidance (docs/method.md#write-back-and-fill ff.)
# --------------------------------------------------------------------------------------------------


def write_back_direction(deltas: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                         H: int, W: int) -> torch.Tensor:
    """Full-resolution class direction from S reference passes (docs/method.md#write-back-and-fill).

    deltas (S, B, C, h, w); rows/cols (S, h, w). Every value goes back to the exact position it
    was gathered from, later passes overwrite earlier ones, and positions no pass sampled take
    the last pass's value of the group that contains them. Returns (B, C, H, W).
    """
    S, B, C, h, w = deltas.shape
    direction = upsample_groups(deltas[-1], H, W).contiguous()
    flat = direction.view(B, C, H * W)
    positions = (rows * W + cols).flatten(1).to(deltas.device)  # (S, h*w)
    for delta, where in zip(deltas, positions):
        flat[:, :, where] = delta.reshape(B, C, h * w)
    return direction


def assemble_local_score(window_scores: torch.Tensor, views: Sequence[tuple[AxisWindow, AxisWindow]],
                         H: int, W: int) -> torch.Tensor:
    """Tile the windows' scores into U (docs/method.md#local-views): window_scores (V, B, C, ch, cw) -> (B, C, H, W).

    Each view writes only the part of its window that it owns, so the views partition the image
    and no position is written twice.
    """
    V, B, C = window_scores.shape[:3]
    local = window_scores.new_empty(B, C, H, W)
    for score, (r, c) in zip(window_scores, views):
        local[:, :, r.own_start:r.own_end, c.own_start:c.own_end] = score[
            :, :, r.own_start - r.crop_start:r.own_end - r.crop_start,
            c.own_start - c.crop_start:c.own_end - c.crop_start]
    return local


def ddim_step(eps: torch.Tensor, x: torch.Tensor, alpha: float, alpha_prev: float):
    """Deterministic DDIM (eta = 0) as a pure function: returns (x0, x_prev).

    See docs/method.md#combination-and-ddim-step.
    """
    x0 = (x - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
    return x0, math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev) * eps


def renoise(x: torch.Tensor, alpha_from: float, alpha_to: float, noise: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse x from level alpha_from to the noisier alpha_to in one draw (docs/method.md#repaint)."""
    ratio = alpha_to / alpha_from
    return math.sqrt(ratio) * x + math.sqrt(1 - ratio) * noise


def epsilon_from_prediction(out: torch.Tensor, x: torch.Tensor, alpha: float, prediction_type: str) -> torch.Tensor:
    """The UNet's output `out` for latent x at level alpha as epsilon, in fp32 (the method splits epsilon).

    "epsilon" is returned as it is; "v_prediction" and "sample" are linear in epsilon and x.
    """
    if prediction_type == "epsilon":
        return out
    x = x.float()
    if prediction_type == "v_prediction":
        return math.sqrt(alpha) * out + math.sqrt(1 - alpha) * x
    return (x - math.sqrt(alpha) * out) / math.sqrt(1 - alpha)  # "sample" prediction


def flow_step(v: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float):
    """The flow form's Euler step (docs/method.md#flow-matching-models-sd-35): returns (x0, x_next).

    x_sigma = (1 - sigma) x0 + sigma eps and v = eps - x0, so x0 = x - sigma v; the step follows v to sigma_next.
    """
    return x - sigma * v, x + (sigma_next - sigma) * v


def flow_renoise(x: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse x from level sigma_from to the noisier sigma_to in one draw: a x + b noise with
    a = (1 - sigma_to) / (1 - sigma_from) and b = sqrt(sigma_to^2 - a^2 sigma_from^2) (docs/method.md#repaint)."""
    a = (1 - sigma_to) / (1 - sigma_from)
    return a * x + math.sqrt(sigma_to ** 2 - a ** 2 * sigma_from ** 2) * noise


def rrg_weight(step: int, num_inference_steps: int, init_weight: float, cosine_scale: float,
               stop_t: float) -> float:
    """lambda(i) = lambda0 * (0.5 (1 + cos(pi i / S)))^kappa for i < S = T - floor(T stop_t).

    See docs/method.md#reduced-resolution-guidance.
    """
    S = num_inference_steps - math.floor(num_inference_steps * stop_t)
    if step >= S:
        return 0.0
    return init_weight * (0.5 * (1 + math.cos(math.pi * step / S))) ** cosine_scale


def rrg_pull(x0_reference_up: torch.Tensor, x0: torch.Tensor, weight: float) -> torch.Tensor:
    """-d/dx0 of weight * mean((x0_ref_up - x0)^2) per item, in closed form (step 4 of RRG)."""
    C, H, W = x0.shape[1:]
    return (2.0 * weight / (C * H * W)) * (x0_reference_up - x0)


def upsample_groups(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, H, W): each position takes its group's value (docs/method.md#fix-write-back-alignment)."""
    h, w = x.shape[-2:]
    return x[:, :, _index_table("map", H, h, x.device)][:, :, :, _index_table("map", W, w, x.device)]


def downsample_groups(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, h, w): the first position of each group (PyTorch's nearest rule)."""
    H, W = x.shape[-2:]
    return x[:, :, _index_table("start", H, h, x.device)][:, :, :, _index_table("start", W, w, x.device)]


# --------------------------------------------------------------------------------------------------
# Cost (docs/method.md#cost-model)
# --------------------------------------------------------------------------------------------------


class Cost(NamedTuple):
    """What one generation costs, counted as the sampler counts it (`info`)."""
    samples: int  # native-size UNet samples: one D x D latent through the UNet (info.unet_samples)
    calls: int  # UNet calls (info.unet_calls)
    vae_encodes: int  # background strips encoded (info.vae_encodes)
    views: int  # V, the local views (info.num_views)
    samples_per_main_pass: int
    samples_per_repaint_pass: int  # 0 without repaint


def unet_cost(width: int, height: int, settings: dict, native_latent: int, batch: int = 1,
              view_batch_size: int = 16, vae_scale_factor: int = 8, strength: float = 1.0, flow: bool = False) -> Cost:
    """The UNet samples, calls and VAE encodes of one generation (docs/method.md#cost-model).

    `settings` holds the run's num_inference_steps, resampling_steps (R), patch_size and repaint
    (e.g. `recommended_settings`' output); `strength` < 1 runs only T = `run_steps` of the steps. A main pass
    evaluates 2B(R + 1) reference samples and B·V local ones, a repaint pass (R > 0, repaint on, every step but
    the last) 2B + B·V. When the reference is the latent itself (images up to the native size) all of a pass's
    inputs are one [neg; pos] pair: 2B samples. Each pass runs in ceil(samples / view_batch_size) balanced calls.
    """
    T, R, B = run_steps(settings["num_inference_steps"], strength), settings["resampling_steps"], batch
    where = layout(height, width, native_latent, settings["patch_size"], vae_scale_factor, flow)
    passes, local = where.pass_inputs(R + 1)
    repaints = max(T - 1, 0) if repaint_passes(settings) else 0
    main, repaint = B * (2 * passes + local), B * (2 + local) if repaints else 0
    return Cost(samples=T * main + repaints * repaint,
                calls=T * -(-main // view_batch_size) + repaints * -(-repaint // view_batch_size),
                vae_encodes=T * len(where.strips), views=len(where.views),
                samples_per_main_pass=main, samples_per_repaint_pass=repaint)


# --------------------------------------------------------------------------------------------------
# Loading (docs/method.md#models-and-scheduler)
# --------------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    """The accelerator torch finds (CUDA, MPS, ...), else the CPU."""
    return torch.accelerator.current_accelerator() or torch.device("cpu")


def default_dtype(device: torch.device, flow: bool = False) -> torch.dtype:
    """Half precision on accelerators (the UNet's speed), fp32 on the CPU (no fast fp16 kernels). SD 3 (`flow`):
    bf16, the precision Stability trains and ships it in, where the GPU has it."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if flow and (device.type != "cuda" or torch.cuda.is_bf16_supported()) else torch.float16


def is_flow_model(sd_version: str) -> bool:
    """Whether `sd_version` names an SD 3 model, from what `native_size` reads without the weights (False if it
    cannot tell: the dtype default then is the UNet models')."""
    try:
        return native_size(sd_version).flow
    except ValueError:
        return False


def checkpoint_kind(path: str) -> str:
    """"sd3", "sdxl" or "sd" (1.x / 2.x): the architecture of a single .safetensors checkpoint, by its keys."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    for prefix, kind in (("model.diffusion_model.joint_blocks", "sd3"), ("conditioner.embedders.1", "sdxl")):
        if any(key.startswith(prefix) for key in keys):
            return kind
    return "sd"


def from_pretrained_variant(load: Callable, source: str, precision: torch.dtype, **kwargs):
    """`load(source, **kwargs)` (a diffusers `from_pretrained`), reading the fp16 weight files when the
    weights will be in half `precision`.

    Hub repositories such as SDXL base ship every model twice: full fp32 files and an fp16
    variant of half the size. A half-precision load reads the fp16 variant (half the download);
    an fp32 load reads the full files. Where the preferred files do not exist (no fp16 variant, or
    a folder saved only as fp16) the other set is used.
    """
    half = precision in (torch.float16, torch.bfloat16)
    try:
        return load(source, variant="fp16" if half else None, **kwargs)
    except (OSError, ValueError) as error:  # diffusers' errors for missing weight files
        logger.info("%s: no %s weight files (%s); loading the %s", source, "fp16" if half else "full",
                    error, "full files" if half else "fp16 variant")
        return load(source, variant=None if half else "fp16", **kwargs)


# The offline try-out (tests/tiny_models.py): named by the errors a user without a model meets.
TINY_MODEL_HINT = ("To try the project without the hub: `make tiny-model` writes a tiny random-weight model (its "
                   "pictures are noise) to the folder tiny-model; then pass `--model tiny-model`")
HUB_PROBE_SECONDS = 3.0  # how long to wait for the hub before working offline


def hub_offline_reason(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why models cannot come from the Hugging Face hub now ("HF_HUB_OFFLINE is set", "no network: ..."), or None.

    Respects HF_HUB_OFFLINE; otherwise makes one TCP connection to the hub's endpoint, bounded by
    `timeout` (name resolution included). Without an answer a load passes `local_files_only=True`: the hub
    libraries read their local cache at once instead of retrying each file for half a minute.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    outcome = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as error:
            outcome["error"] = error

    probe = threading.Thread(target=connect, daemon=True, name="hub-probe")
    probe.start()
    probe.join(timeout)  # getaddrinfo ignores socket timeouts: the thread bounds name resolution too
    if outcome.get("ok"):
        return None
    error = outcome.get("error")
    return (f"no network: {host} cannot be reached ({getattr(error, 'strerror', None) or error})" if error
            else f"no network: no answer from {host} within {timeout:g} s")


# Native sizes of MODEL_IDS' keys, so a plan for them needs neither the weights nor the network.
KEY_NATIVE_PX = {"1.4": 512, "1.5": 512, "2.0": 512, "2.1": 512, "XL1.0": 1024, "3.5-medium": 1024, "3.5-large": 1024}


class Native(NamedTuple):
    """The model's native size, as the plan assumes it before the model is loaded."""
    px: int  # P, pixels
    vae_scale_factor: int
    source: str  # where it was read, for messages
    flow: bool = False  # an SD 3 flow-matching model (its own presets)

    @property
    def latent(self) -> int:  # D
        return self.px // self.vae_scale_factor


def native_size(sd_version: str, native_px: int | None = None) -> Native:
    """The native size of `sd_version` without loading its weights; ValueError saying to pass --native_px if unknown.

    --native_px wins; then MODEL_IDS' keys (`KEY_NATIVE_PX`); a diffusers folder's or hub repository's
    unet/config.json and vae/config.json (the hub's from the cache or a small download); a single
    .safetensors file: 1024 for SDXL, else 512 (an SD 2.x 768-px checkpoint needs --native_px).
    The loaded model is checked against it (batch.py's `run`, before the first item).
    """
    if native_px is not None:
        check_number("--native_px", native_px, 64, integer=True)
        if native_px % 8:
            raise ValueError(f"--native_px must be a multiple of 8; got {native_px}")
        return Native(native_px, 8, "--native_px", is_flow_model(sd_version))
    if sd_version in KEY_NATIVE_PX:
        return Native(KEY_NATIVE_PX[sd_version], 8, f"--sd_version {sd_version}", sd_version.startswith("3."))
    source = os.path.expanduser(MODEL_IDS.get(sd_version, sd_version))
    try:
        if source.endswith(".safetensors") and os.path.isfile(source):
            kind = checkpoint_kind(source)
            return Native(512 if kind == "sd" else 1024, 8, f"the checkpoint {sd_version}", kind == "sd3")
        if os.path.isdir(source):
            path = lambda name: os.path.join(source, name)  # noqa: E731
        elif re.fullmatch(r"[\w.\-]+/[\w.\-]+", source):
            from huggingface_hub import hf_hub_download

            cached = hub_offline_reason() is not None  # without network: read the cache at once, no retries
            path = lambda name: hf_hub_download(source, name, local_files_only=cached)  # noqa: E731
        else:
            raise ValueError("not a known key, folder, hub id or .safetensors file")
        read = lambda name: json.loads(pathlib.Path(path(name)).read_text())  # noqa: E731
        flow = "transformer" in read("model_index.json")  # SD 3
        vae, net = read("vae/config.json"), read(f"{'transformer' if flow else 'unet'}/config.json")
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return Native(int(net["sample_size"]) * factor, factor, f"{sd_version}'s configs", flow)
    except Exception as error:  # a missing file, no network, a config without the field
        raise ValueError(f"the native size of --sd_version {sd_version!r} could not be read without loading it "
                         f"({error}); pass --native_px (1024 for SDXL, 512 for SD 1.x/2.x base, 768 for SD 2.x "
                         "768-px)") from None


def load_pipeline(sd_version: str, torch_dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
                  t5: bool = False, **kwargs):
    """A diffusers Stable Diffusion (1.x, 2.x, XL, 3.x) pipeline from a key, hub id, folder or file. An SD 3 model's
    optional T5 encoder (4.7B parameters) is loaded only with `t5`.

    Raises ValueError naming `sd_version` and what it may be when the source cannot be used.
    """
    from diffusers import (DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)

    no_t5 = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)

    allowed = (f"one of {sorted(MODEL_IDS)}, a hub id such as 'stabilityai/sdxl-turbo', a local "
               "diffusers folder (with model_index.json) or a single .safetensors checkpoint")
    source = MODEL_IDS.get(sd_version, sd_version)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"sd_version must be {allowed}; got {sd_version!r}")
    source = os.path.expanduser(source)
    if source.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        if not os.path.isfile(source):
            raise ValueError(f"sd_version: checkpoint file {source!r} does not exist")
        if not source.endswith(".safetensors"):
            if not allow_pickle:
                raise ValueError(f"sd_version: {source!r} is a pickle checkpoint, which can run code when "
                                 "loaded; convert it to .safetensors or pass allow_pickle=True if you trust it")
            cls = StableDiffusionPipeline
        else:
            kind = checkpoint_kind(source)
            cls = dict(sd3=StableDiffusion3Pipeline, sdxl=StableDiffusionXLPipeline).get(kind, StableDiffusionPipeline)
            kwargs = {**no_t5, **kwargs} if kind == "sd3" else kwargs
        return cls.from_single_file(source, dtype=torch_dtype, **kwargs)
    is_path = os.path.isabs(source) or source.startswith(".") or os.path.exists(source)
    if is_path:
        if not os.path.isdir(source):
            raise ValueError(f"sd_version: folder {source!r} does not exist; expected {allowed}")
        if not os.path.isfile(os.path.join(source, "model_index.json")):
            raise ValueError(f"sd_version: {source!r} is not a diffusers-format folder (no model_index.json); "
                             "save a pipeline with save_pretrained() or pass a single .safetensors file")
    elif not re.fullmatch(r"[\w.\-]+/[\w.\-]+", source):
        raise ValueError(f"sd_version {sd_version!r} is unknown: use {allowed}")
    offline = None if is_path else hub_offline_reason()

    load_kwargs = dict(dtype=torch_dtype, use_safetensors=None if allow_pickle else True,
                       local_files_only=offline is not None)
    load_kwargs.update(kwargs)
    try:
        config = DiffusionPipeline.load_config(source, local_files_only=offline is not None)
        if "safety_checker" in config:  # not used by this sampler: do not download or load it
            load_kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if "text_encoder_3" in config:
            load_kwargs = {**no_t5, **load_kwargs}
        pipe = from_pretrained_variant(DiffusionPipeline.from_pretrained, source, torch_dtype, **load_kwargs)
    except (OSError, EnvironmentError) as error:
        if source in HUB_MIRRORS:
            if not offline:
                logger.warning("%s could not be loaded (%s); trying %s", source, error, HUB_MIRRORS[source])
            return load_pipeline(HUB_MIRRORS[source], torch_dtype, allow_pickle, t5, **kwargs)
        if offline:
            raise ValueError(f"sd_version {sd_version!r} ({source}) is not in the local Hugging Face cache and the "
                             f"hub cannot be used ({offline}). Pass a local diffusers folder or a .safetensors file, "
                             f"or download the model once where there is network (`hf download {source}`).\n"
                             f"{TINY_MODEL_HINT}") from None
        hint = "" if allow_pickle else "; a model without .safetensors weights needs allow_pickle=True"
        raise ValueError(f"sd_version {sd_version!r} could not be loaded ({error}). Check the id and the network "
                         "(gated models need `hf auth login`), or pass a local diffusers folder or a "
                         f".safetensors file{hint}") from error
    network = "transformer" if type(pipe).__name__.startswith("StableDiffusion3") else "unet"
    for name in (network, "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise ValueError(f"sd_version {sd_version!r} is a {type(pipe).__name__} without a {name}; "
                             "ElasticDiffusion needs a Stable Diffusion 1.x, 2.x, XL or 3.x model")
    return pipe


# --------------------------------------------------------------------------------------------------
# The model seam: one loop, two model families (docs/method.md#flow-matching-models-sd-35)
# --------------------------------------------------------------------------------------------------


class EpsilonModel:
    """SD 1.x / 2.x / XL: the UNet's output as epsilon; a noise level is DDIM's cumulative alpha (1: clean)."""
    clean = 1.0
    step = staticmethod(ddim_step)  # (prediction, x, level, next level) -> (x0, x_next)
    renoise = staticmethod(renoise)  # (x, level, noisier level, noise) -> x at the noisier level

    def __init__(self, unet, scheduler_config):
        from diffusers import DDIMScheduler

        self.net = unet
        # The method's own DDIM, from the model's scheduler config (docs/method.md#models-and-scheduler).
        self.ddim = DDIMScheduler.from_config(scheduler_config)
        self.alphas_cumprod = self.ddim.alphas_cumprod.double()
        self.final_alpha = float(self.ddim.final_alpha_cumprod)  # 1 or alpha_0, per set_alpha_to_one
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")

    def alpha(self, t: int) -> float:
        """Cumulative alpha of timestep t; t < 0 is the level after the last step (the scheduler's final alpha)."""
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha

    def schedule(self, num_inference_steps: int) -> tuple[list, list]:
        """(timesteps, levels): DDIM's timesteps (981, 961, ..., 1 for T = 50 and 'leading' spacing), noisiest
        first, and the T + 1 levels of the steps, the final one last."""
        scheduler = type(self.ddim).from_config(self.ddim.config)  # a fresh one: set_timesteps is a mutation
        scheduler.set_timesteps(num_inference_steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        return timesteps, [self.alpha(t) for t in timesteps] + [self.final_alpha]

    def prediction(self, out: torch.Tensor, x: torch.Tensor, level: float) -> torch.Tensor:
        """The network's raw output for x at `level` in the loop's terms, fp32."""
        return epsilon_from_prediction(out.float(), x, level, self.prediction_type)

    def __call__(self, x, t: int, timestep, embeds, pooled, **kwargs) -> torch.Tensor:
        out = self.net(x, timestep, encoder_hidden_states=embeds, **kwargs).sample
        return self.prediction(out, x, self.alpha(t))


class FlowModel:
    """SD 3 / 3.5: the transformer's output v = eps - x0; a noise level is the flow's sigma (0: clean), on the
    model's own (shifted) sigma schedule, stepped by Euler as diffusers' FlowMatchEulerDiscreteScheduler."""
    clean = 0.0
    step = staticmethod(flow_step)
    renoise = staticmethod(flow_renoise)

    def __init__(self, transformer, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.net = transformer
        if scheduler_config.get("use_dynamic_shifting"):  # FLUX-style shift by image size: not this model family
            raise ValueError("this model's scheduler shifts its sigmas by image size (use_dynamic_shifting); "
                             "ElasticDiffusion supports SD 3 / 3.5's fixed shift")
        self.make_scheduler = lambda: FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def schedule(self, num_inference_steps: int) -> tuple[list, list]:
        """(timesteps, levels): the transformer's timesteps (1000 sigma) and the T + 1 sigmas, 0 last."""
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(num_inference_steps)
        return [float(t) for t in scheduler.timesteps], [float(s) for s in scheduler.sigmas]

    def prediction(self, out: torch.Tensor, x: torch.Tensor, level: float) -> torch.Tensor:
        """The transformer's raw output in the loop's terms, fp32: v itself."""
        return out.float()

    def __call__(self, x, t: float, timestep, embeds, pooled, **kwargs) -> torch.Tensor:
        return self.net(hidden_states=x, timestep=timestep.expand(x.shape[0]), encoder_hidden_states=embeds,
                        pooled_projections=pooled, return_dict=False, **kwargs)[0].float()


# --------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------


def share_pipeline(pipe, **replace):
    """A new pipeline object of `pipe`'s class over the same modules: nothing copied, moved or converted.

    `replace` swaps components (e.g. `scheduler=`). diffusers' own `from_pipe` casts every module of
    the new pipeline to one dtype (float32 unless told otherwise), which changes the caller's modules
    too; this does not.
    """
    import inspect

    accepted = inspect.signature(type(pipe).__init__).parameters
    settings = {k: v for k, v in pipe.config.items()
                if k in accepted and k not in pipe.components and not k.startswith("_")}
    shared = type(pipe)(**{**settings, **pipe.components, **replace})
    if getattr(pipe, "name_or_path", None):
        shared.register_to_config(_name_or_path=pipe.name_or_path)
    return shared


@dataclass(frozen=True)
class Region:
    """Where one UNet sample comes from, for extensions that condition on the image (ControlNet): kind "reference"
    (the whole reference latent, rows (0, h), cols (0, w)) or "local" (a crop [rows) x [cols) of the full-resolution
    latent), with `padding` (top, bottom, left, right) in latent pixels around it on the native canvas."""
    kind: str
    rows: tuple[int, int]
    cols: tuple[int, int]
    padding: tuple[int, int, int, int]


class ScoreEstimate(NamedTuple):
    """The two halves of the score for one latent at one timestep, plus what RRG reuses.

    See docs/method.md#sub-sampler and docs/method.md#local-views.
    """
    local_uncond: torch.Tensor  # U (B, C, H, W)
    direction: torch.Tensor  # Delta (B, C, H, W)
    reference_latent: torch.Tensor  # x_ref of the last pass (B, C, h, w)
    reference_uncond: torch.Tensor  # eps(x_ref, neg) of the last pass (B, C, h, w)


METADATA_IDENTITY = ("prompt", "negative_prompt", "seed", "image_index", "model")  # a record's fields before settings


@dataclass
class GenerationInfo:
    """What one generation did, as `generate` returns it beside the images: the settings and seed that reproduce
    it, and its cost. `info["seed"]` reads a field too (the official README's `verbose_info["seed"]`)."""
    settings: dict  # every method knob used, the size and view_batch_size; an extension's settings after them
    seed: int | None  # None when the caller passed a generator
    model: str  # sd_version as given: a key, a hub id or a local path (`public_name` before a stranger sees it)
    reference_size: tuple[int, int] = (0, 0)  # latent (h, w)
    num_views: int = 0  # V, the local views
    unet_samples: int = 0  # native-size latents through the UNet (the cost model's `samples`)
    unet_calls: int = 0
    vae_encodes: int = 0  # background strips encoded
    unet_batch_sizes: dict = field(default_factory=dict)  # samples per call -> calls
    timings: dict = field(default_factory=dict)  # stage -> seconds
    peak_memory_gib: float | None = None  # CUDA runs only

    def __getitem__(self, name: str):
        return getattr(self, name)

    def record(self, prompt: str, negative_prompt: str, index: int = 0) -> dict:
        """The JSON record that reproduces image `index` (`png_metadata`), also what a batch job expects of a PNG
        it skips: METADATA_IDENTITY's fields, then `settings`, every method knob in KNOBS' order, the size, the
        memory knobs, an extension's settings."""
        return dict(prompt=prompt, negative_prompt=negative_prompt, seed=self.seed, image_index=index,
                    model=self.model, **self.settings)  # a setting named like one of these is a TypeError


class GenerationCancelled(RuntimeError):
    """Raised from `callback_on_step_end` or `callback_on_stage` to stop a run."""


@dataclass(eq=False)
class Run:
    """One generation's own data, passed down the sampling loop; the sampler keeps only models and settings.

    Made by `generate` from its arguments; `prepare` fills in the rest. Extensions keep their own
    per-run data in `extras` (the ControlNet its condition maps).

    The two sources of randomness inside the loop are functions of the step, so they can be replaced
    (tests pin the method with them): `choose_cells(step, num_passes)` gives the sub-sampler's
    candidate indices (num_passes, h, w) and `repaint_noise(step, shape)` the Gaussian noise of the
    step's re-noising. By default both draw from one generator seeded with `aux_seed`, in that order.
    """
    prompts: list[str]
    negative_prompts: list[str]
    height: int  # pixels
    width: int
    settings: dict  # the resolved method knobs (`resolve_settings`)
    view_batch_size: int
    seed: int | None
    aux_seed: int  # derived from the seed: sub-sampler, re-noising and background strips
    layout: Layout  # latent and reference sizes, local views, background strips
    choose_cells: Callable[[int, int], torch.Tensor]
    repaint_noise: Callable[[int, tuple], torch.Tensor]
    first_step: int = 0  # image-to-image starts late in the schedule (`run_steps`); steps keep their index
    extras: dict = field(default_factory=dict)
    # Filled by `prepare`:
    embeds: torch.Tensor | None = None  # [neg; pos] text embeddings (2B, 77, d)
    pooled: torch.Tensor | None = None  # SDXL pooled embeddings (2B, d') or None
    time_ids: torch.Tensor | None = None  # SDXL size conditioning (1, 6) or None
    timesteps: list = field(default_factory=list)  # the whole schedule's timesteps, noisiest first
    levels: list = field(default_factory=list)  # their noise levels (`model`), and the final one: T + 1
    timestep_tensors: dict = field(default_factory=dict)  # t -> 0-d tensor on the device
    backgrounds: dict = field(default_factory=dict)  # (strip, size, t) -> noised strip latent (1, C, sh, sw)
    counters: dict = field(default_factory=lambda: {"unet_samples": 0, "unet_calls": 0, "vae_encodes": 0,
                                                    "unet_batch_sizes": {}})
    timings: dict = field(default_factory=dict)  # stage -> seconds
    report: Callable[[str, int, int], None] | None = None  # progress of the stages before step 1

    def stage(self, name: str, done: int, total: int) -> None:
        """Report the preparation's progress (`callback_on_stage` of `generate`), if anyone listens."""
        if self.report is not None:
            self.report(name, done, total)

    def release(self) -> None:
        """Drop the run's device tensors (also when an error keeps the run referenced)."""
        self.backgrounds = {}
        self.timestep_tensors = {}


class ElasticDiffusion:
    """ElasticDiffusion sampler over a diffusers Stable Diffusion 1.x / 2.x / XL / 3.x pipeline.

    Args:
        device: where to run (default: CUDA, then MPS, then CPU).
        sd_version: '1.4', '1.5', '2.0', '2.1', 'XL1.0', '3.5-medium', '3.5-large', any hub id, a local diffusers
            folder or a single `.safetensors` checkpoint. The architecture is read from the loaded model.
        view_batch_size: most UNet samples (native-size latents) per UNet call; memory only.
        low_vram: diffusers' model CPU offload (one model on the GPU at a time).
        torch_dtype: weight dtype (default fp16 on accelerators, bf16 for SD 3 where the GPU has it; fp32 on CPU).
        pipe: an already loaded diffusers pipeline to use instead of loading (see `from_pipe`).
        allow_pickle: allow non-safetensors weights (they can run code when loaded).
        compile_unet: `torch.compile` the UNet. Every UNet input is native-size, so with the batch
            dimension marked dynamic one compilation serves every image size.
        max_scale: largest side as a multiple of the native size (`check_size`); above MAX_SCALE is experimental.
        t5: SD 3 models: load the optional T5 text encoder too (without it CLIP cuts prompts at 77 tokens).

    The instance holds the models and the configuration only; each call keeps its data in its own
    `Run`. Threads may share a sampler: generations, `set_low_vram` and `exclusive()` take it one at
    a time (a demo's queue runs one generation at a time anyway).
    """

    info_class = GenerationInfo  # what `generate` returns beside the images; an extension may add fields

    def __init__(self, device: torch.device | str | None = None, sd_version: str = "XL1.0",
                 view_batch_size: int = knob("view_batch_size").default, low_vram: bool = False,
                 torch_dtype: torch.dtype | None = None,
                 pipe=None, allow_pickle: bool = False, compile_unet: bool = False, max_scale: int = MAX_SCALE,
                 t5: bool = False, **load_kwargs):
        self.device = torch.device(device) if device is not None else default_device()
        self.view_batch_size = knob("view_batch_size").check(view_batch_size, 0)
        self.max_scale = check_number("max_scale", max_scale, 1, integer=True)
        self.allow_pickle = allow_pickle
        shared = pipe is not None  # the caller's pipeline: its modules are used, never changed
        if shared:
            self.sd_version = getattr(pipe, "name_or_path", None) or "pipeline"
            if torch_dtype is not None and torch_dtype != pipe.unet.dtype:
                raise ValueError(f"torch_dtype={torch_dtype} differs from the pipeline's {pipe.unet.dtype}: from_pipe "
                                 "shares the pipeline's modules and does not convert them; convert the pipeline "
                                 "first (pipe.to(dtype=...)) or leave torch_dtype out")
        else:
            self.sd_version = sd_version
            dtype = torch_dtype or default_dtype(self.device, self.device.type != "cpu" and is_flow_model(sd_version))
            pipe = load_pipeline(sd_version, dtype, allow_pickle, t5, **load_kwargs)
        vae = pipe.vae
        if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
            # The SDXL VAE overflows to NaN in fp16 (docs/method.md#decoding). bf16 has fp32's range at half the
            # memory of an fp32 decode (a 2048^2 fp32 decode alone would need ~19 GiB). A shared pipeline's VAE
            # stays as it is: the sampler upcasts a copy (the VAE is small next to the UNet).
            bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            vae = (copy.deepcopy(vae) if shared else vae).to(torch.bfloat16 if bf16 else torch.float32)
        if shared:
            pipe = share_pipeline(pipe, vae=vae)
        self.pipe = pipe
        self.is_flow = getattr(pipe, "transformer", None) is not None  # SD 3 / 3.5: a flow-matching transformer
        # `unet` is the denoising network: SD 3's is a transformer (same calls, hooks and offload).
        self.vae, self.unet, self.scheduler = pipe.vae, pipe.transformer if self.is_flow else pipe.unet, pipe.scheduler
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.text_encoder_2 = getattr(pipe, "text_encoder_2", None)
        self.tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        self.dtype = self.unet.dtype
        # Read from the loaded configs, never from the name (docs/method.md#fix-model-geometry-from-config).
        self.is_sdxl = self.unet.config.get("addition_embed_type") == "text_time"
        self.native_latent = int(self.unet.config.sample_size)  # D
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.native_px = self.native_latent * self.vae_scale_factor  # P
        self.latent_channels = int(self.unet.config.in_channels)
        self.model = (FlowModel if self.is_flow else EpsilonModel)(self.unet, self.scheduler.config)
        self._lock = threading.RLock()  # one user of the modules at a time (`exclusive`)
        self.attach_models()
        self.low_vram = None
        self.set_low_vram(low_vram)  # the one place modules are first put on the device
        self.compiled = bool(compile_unet)
        if self.compiled:  # all UNet inputs are D x D: only the batch size varies (marked dynamic)
            self.unet = self.model.net = torch.compile(self.unet)

    def attach_models(self) -> None:
        """Extension point: load the models a subclass adds (the ControlNet's).

        Called once by the constructor, after the pipeline is loaded and before anything is placed on
        the device, so the memory mode (`place_modules`) is set once, for every model.
        """

    def exclusive(self):
        """`with pipe.exclusive():` use the components alone: waits for a running generation, holds off new ones."""
        return self._lock

    def initial_latents(self, height: int, width: int, batch: int = 1,
                        generator: torch.Generator | int | None = None) -> torch.Tensor:
        """The starting noise a generation draws: (batch, C, H, W) fp32, from a CPU generator (or seed)
        so the same seed gives the same image on every device."""
        from diffusers.utils.torch_utils import randn_tensor

        if generator is None or isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator if generator is not None else random.randrange(2 ** 32))
        f = self.vae_scale_factor
        shape = (batch, self.latent_channels, height // f, width // f)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def set_low_vram(self, low_vram: bool) -> None:
        """Switch diffusers' model CPU offload on or off in place (no reload; the official demo rebuilt).

        Waits for running generations. The offload hooks sit on the modules: a sampler made with
        `from_pipe` switches the shared modules, so the caller's pipeline is offloaded with it.
        """
        low_vram = bool(low_vram)
        with self._lock:
            if low_vram != self.low_vram:
                try:
                    self.place_modules(low_vram)
                except BaseException:
                    # A move that failed half-way (out of memory) leaves some modules without hooks and off the
                    # device: back to low VRAM, which runs at any size, so the next request still works.
                    self.place_modules(True)
                    self.low_vram = True
                    raise
                self.low_vram = low_vram

    def place_modules(self, low_vram: bool) -> None:
        """Put the models where the memory mode wants them; `set_low_vram` calls it holding the sampler alone.

        low_vram: diffusers' model CPU offload hooks (models stay on the CPU until used); otherwise
        every model on the device. Subclasses with models of their own extend it.
        """
        if low_vram:
            self.pipe.enable_model_cpu_offload(device=self.device)
        else:
            if self.low_vram:
                self.pipe.remove_all_hooks()
            self.pipe.to(self.device)

    @classmethod
    def from_pipe(cls, pipe, device=None, **kwargs) -> "ElasticDiffusion":
        """Reuse an already loaded diffusers Stable Diffusion pipeline's components (no reload, no copy, no dtype
        conversion; an fp16 SDXL VAE is upcast in a private copy). The modules are shared, though: an explicit
        `device` moves them, and `low_vram=True` puts offload hooks on them, for the caller's pipeline too."""
        if device is None:
            device = getattr(pipe, "_execution_device", None) or pipe.device
        return cls(device=device, pipe=pipe, **kwargs)

    def timesteps(self, num_inference_steps: int) -> list:
        """The model's timesteps for T steps, noisiest first (`model.schedule`)."""
        return self.model.schedule(num_inference_steps)[0]

    # ---------------------------------------------------------- text (docs/method.md#text-encoding)

    def _tokenize(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        full = tokenizer(prompts, padding=False, truncation=False).input_ids
        for prompt, tokens in zip(prompts, full):
            if len(tokens) > tokenizer.model_max_length:
                cut = tokenizer.decode(tokens[tokenizer.model_max_length - 1:-1])
                warnings.warn(f"prompt is longer than the text encoder's {tokenizer.model_max_length} tokens; "
                              f"this part was cut: {cut!r}", stacklevel=4)
        return ids.to(self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings (N, 77, d) and, for SDXL, pooled embeddings (N, 1280).

        Empty prompts are CLIP-encoded like any other (never zeroed, unlike diffusers' SDXL default). SD 3: diffusers'
        own encoding, (N, 77 + 256, d) and (N, d'); without the T5 encoder its 256 tokens are zeros, and CLIP cuts
        prompts at 77 tokens.
        """
        if self.is_flow:
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                           do_classifier_free_guidance=False)
            return embeds, pooled
        ids = self._tokenize(self.tokenizer, prompts)
        if not self.is_sdxl:
            return self.text_encoder(ids)[0], None
        first = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = self.text_encoder_2(self._tokenize(self.tokenizer_2, prompts), output_hidden_states=True)
        return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds

    # ----------------------------------------------- UNet calls (docs/method.md#background-padding)

    def unet_extra_kwargs(self, run: Run, latents: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor,
                          added_cond_kwargs: dict | None, regions: list[Region]) -> dict:
        """Extension point: extra keyword arguments for the UNet call on `latents` (N, C, D, D) of `run`.

        `regions[n]` says where sample n comes from. The base sampler adds nothing; the ControlNet
        sampler returns `down_block_additional_residuals` / `mid_block_additional_residual`.
        """
        return {}

    def predict(self, run: Run, latents: torch.Tensor, t, prompt_embeds: torch.Tensor,
                pooled_embeds: torch.Tensor | None, regions: list[Region]) -> torch.Tensor:
        """The model's prediction in the loop's terms (`self.model`: epsilon, or SD 3's v) for a batch of native-size
        latents: every UNet call goes here."""
        n = latents.shape[0]
        added = None
        if self.is_sdxl:
            added = {"text_embeds": pooled_embeds, "time_ids": run.time_ids.expand(n, -1).contiguous()}
        timestep = run.timestep_tensors[t]  # a tensor: a Python int would recompile a compiled UNet
        extra = self.unet_extra_kwargs(run, latents, timestep, prompt_embeds, added, regions)
        if self.compiled and n > 1:  # sizes 0 and 1 are always specialised by torch.compile
            extras = [v for value in extra.values() for v in (value if isinstance(value, (list, tuple)) else [value])]
            for tensor in (latents, prompt_embeds, pooled_embeds, *(added or {}).values(), *extras):
                if torch.is_tensor(tensor):
                    torch._dynamo.mark_dynamic(tensor, 0)
        if added is not None:
            extra = dict(extra, added_cond_kwargs=added)
        return self.model(latents, t, timestep, prompt_embeds, pooled_embeds, **extra)

    def _evaluate(self, run: Run, latents: torch.Tensor, t: int, cond_index: torch.Tensor,
                  regions: list[Region]) -> torch.Tensor:
        """Run all N samples of one denoising pass in calls of at most `run.view_batch_size` samples.

        The calls are balanced (38 samples at v = 16 go as 13 + 13 + 12): as few calls as the limit
        allows, each as large as possible, none padded.
        """
        n = latents.shape[0]
        calls = -(-n // run.view_batch_size)
        size = -(-n // calls)
        outputs = []
        counters = run.counters
        for start in range(0, n, size):
            chunk = slice(start, min(start + size, n))
            x, index = latents[chunk].to(self.dtype), cond_index[chunk]
            pooled = run.pooled[index] if run.pooled is not None else None
            outputs.append(self.predict(run, x, t, run.embeds[index], pooled, regions[chunk]))
            counters["unet_samples"] += x.shape[0]
            counters["unet_calls"] += 1
            batches = counters["unet_batch_sizes"]
            batches[x.shape[0]] = batches.get(x.shape[0], 0) + 1
        return torch.cat(outputs)

    # ---------------------------------------------- backgrounds (docs/method.md#background-padding)

    @staticmethod
    def _strip_seed(aux_seed: int, name: str, size: tuple[int, int], t: int) -> int:
        key = f"{aux_seed}:{name}:{size[0]}x{size[1]}:{t}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2 ** 63 - 1)

    @torch.no_grad()
    def prepare_backgrounds(self, strips: set[tuple[str, tuple[int, int]]], levels: dict,
                            aux_seed: int, counters: dict | None = None, chunk: int = 8,
                            report: Callable | None = None) -> dict:
        """Noised, VAE-encoded solid-colour strips, one per (strip, size, timestep), encoded once up front.

        `strips` holds (name, (height, width)) pairs, `levels` maps each timestep to its noise level; `aux_seed`
        seeds each strip's colour, VAE sample and noise. Encoded once, up front: identical across passes, view
        batches and batch items within a timestep, different across timesteps. `report("backgrounds", done, total)`
        is called before each chunk and at the end. Returns {(name, size, t): (1, C, sh, sw)}.
        """
        keys = [(name, size, t) for t in levels for name, size in sorted(strips)]
        backgrounds = {}
        f = self.vae_scale_factor
        for size in sorted({k[1] for k in keys}):
            same = [k for k in keys if k[1] == size]
            for i in range(0, len(same), chunk):
                if report is not None:
                    report("backgrounds", len(backgrounds), len(keys))
                group = same[i:i + chunk]
                gens = [torch.Generator().manual_seed(self._strip_seed(aux_seed, *k)) for k in group]
                colours = torch.stack([torch.rand(3, generator=g) for g in gens])  # RGB in [0, 1]
                images = colours[:, :, None, None].expand(-1, -1, size[0] * f, size[1] * f)
                dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
                if counters is not None:
                    counters["vae_encodes"] += len(group)
                for k, g, mean, std in zip(group, gens, dist.mean.float(), dist.std.float()):
                    z0 = (mean + std * torch.randn(mean.shape, generator=g).to(self.device))
                    z0 = (z0 - (self.vae.config.get("shift_factor") or 0)) * self.vae.config.scaling_factor
                    noise = torch.randn(z0.shape, generator=g).to(self.device)
                    backgrounds[k] = self.model.renoise(z0, self.model.clean, levels[k[2]], noise)[None]
        if report is not None:
            report("backgrounds", len(backgrounds), len(keys))
        return backgrounds

    def _pad(self, run: Run, x: torch.Tensor, t) -> torch.Tensor:
        h, w = x.shape[-2:]
        if not run.layout.strips:  # native-size inputs, or SD 3 running a small image at its own size
            return x
        strips = padding_strips(h, w, self.native_latent)
        return pad_with_strips(x, {n: run.backgrounds[(n, s, t)] for n, s in strips.items()})

    # ------------------------------------------------------------------------------- the two scores

    def estimate_scores(self, run: Run, x: torch.Tensor, t: int, cells: torch.Tensor) -> ScoreEstimate:
        """Global class direction and local unconditional score of x (B, C, H, W) at t.

        `cells` (S, h, w) are the sub-sampler's choices for the S reference passes. Every UNet
        sample of this pass (2B per reference pass, B per local view) depends only on x, so all
        go through `_evaluate` together. Identical inputs are evaluated once: when the reference
        has the latent's own size (images up to the native size), every pass gathers x itself and
        the one local view is x, padded alike, so the reference pass's [neg; pos] pair serves all of
        them (2B samples, the cost of plain CFG). That is the only case where a local window's
        input can equal a reference sample's: below it the reference is a strict sub-sample.
        See docs/method.md#sub-sampler, docs/method.md#local-views and docs/method.md#cost-model.
        """
        B, C, H, W = x.shape
        h, w = cells.shape[-2:]
        D = self.native_latent
        rows, cols = source_indices(cells, H, W)  # (S, h, w) each: the source pixel of every cell
        S, V = run.layout.pass_inputs(cells.shape[0])  # V = 0: the reference pair covers the one view
        same_input = V == 0
        rows, cols = self._to_device(rows[:S]), self._to_device(cols[:S])
        references = gather_reference(x, rows, cols)  # (S, B, C, h, w)
        views = run.layout.views[:V]
        crops = [x[:, :, r.crop_start:r.crop_end, c.crop_start:c.crop_end] for r, c in views]  # V x (B, C, ch, cw)

        # The batch, in this order: per pass s, [x_ref_s for neg] x B then [x_ref_s for pos] x B; then
        # per view v, [crop_v for neg] x B. `index` picks each sample's row of run.embeds ([neg; pos], 2B
        # rows: neg of item b is row b, pos is row B + b); `regions` say where each sample comes from.
        ref_batch = references.unsqueeze(1).expand(S, 2, B, C, h, w)  # (S, 2, B, C, h, w): [neg, pos] per pass
        ref_batch = ref_batch.reshape(S * 2 * B, C, h, w)  # sample (s, branch, b) at s*2B + branch*B + b
        batches = [self._pad(run, ref_batch, t)]  # (S*2B, C, D, D)
        item = torch.arange(B)
        index = [torch.cat([item, item + B]).repeat(S)]  # (S*2B,): b for neg, B + b for pos
        ref_pad = centered_padding(h, w, D) if run.layout.strips else (0, 0, 0, 0)
        regions = [Region("reference", (0, h), (0, w), ref_pad)] * (S * 2 * B)
        if crops:
            ch, cw = crops[0].shape[-2:]  # every crop has the same size
            crop_pad = centered_padding(ch, cw, D)
            batches.append(self._pad(run, torch.cat(crops), t))  # (V*B, C, D, D): sample (v, b) at v*B + b
            index.append(item.repeat(len(views)))  # (V*B,): neg of item b
            regions += [Region("local", (r.crop_start, r.crop_end), (c.crop_start, c.crop_end), crop_pad)
                        for r, c in views for _ in range(B)]
        eps = self._evaluate(run, torch.cat(batches), t, self._to_device(torch.cat(index)), regions)  # (N, C, D, D)

        # Undo the padding and the flattening, in the order the batch was built.
        top, _, left, _ = ref_pad
        ref_eps = eps[:S * 2 * B, :, top:top + h, left:left + w]  # (S*2B, C, h, w)
        ref_eps = ref_eps.reshape(S, 2, B, C, h, w)  # [:, 0] = eps(x_ref, neg), [:, 1] = eps(x_ref, pos)
        if same_input:
            views, local_eps = run.layout.views, ref_eps[:, 0]  # (1, B, C, H, W): the one view is the whole latent
        else:
            top, _, left, _ = crop_pad
            local_eps = eps[S * 2 * B:, :, top:top + ch, left:left + cw]  # (V*B, C, ch, cw)
            local_eps = local_eps.reshape(len(views), B, C, ch, cw)  # (V, B, C, ch, cw)
        deltas = ref_eps[:, 1] - ref_eps[:, 0]  # (S, B, C, h, w): the class direction of every pass
        direction = write_back_direction(deltas, rows, cols, H, W)  # (B, C, H, W)
        local = assemble_local_score(local_eps, views, H, W)  # (B, C, H, W)
        return ScoreEstimate(local, direction, references[-1], ref_eps[-1, 0])

    def reduced_resolution_guidance(self, estimate: ScoreEstimate, x0: torch.Tensor, level: float,
                                    guidance_scale: float, weight: float) -> torch.Tensor:
        """RRG: pull x0 towards the reference's own x0, reusing this step's UNet outputs.

        See docs/method.md#reduced-resolution-guidance.
        """
        h, w = estimate.reference_latent.shape[-2:]
        H, W = x0.shape[-2:]
        guided = estimate.reference_uncond + guidance_scale * downsample_groups(estimate.direction, h, w)
        x0_reference, _ = self.model.step(guided, estimate.reference_latent.float(), level, level)
        return rrg_pull(upsample_groups(x0_reference, H, W), x0, weight)

    # --------------------------------------------------------------------------------------- inputs

    def check_inputs(self, height, width, s: dict, latents: torch.Tensor | None, batch: int) -> None:
        """Validate the size, the settings and `latents` before any work (the prompts: `_prompt_lists`); a
        ValueError naming the argument and the rule."""
        check_size(height, width, self.native_px, self.vae_scale_factor, self.max_scale)
        check_settings(s, self.native_latent)
        if latents is not None:
            shape = (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for this size and batch; got {tuple(latents.shape)}")

    def resolve_settings(self, width: int, height: int, **explicit) -> dict:
        """The run's method knobs: the resolution-aware preset with the explicitly given (non-None) values on top.

        TypeError for a name that is not a method knob of KNOBS (as Python's for an unknown keyword).
        """
        return settings_for(width, height, self.native_px, self.is_flow, **explicit)

    # ---------------------------------------------------- generation (docs/method.md#sampling-loop)

    def __call__(self, *args, **kwargs):
        """Generate images; returns (images, info). See `generate` for the arguments."""
        try:
            return self.generate(*args, **kwargs)
        except torch.OutOfMemoryError as error:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch = kwargs.get("view_batch_size") or self.view_batch_size
            raise torch.OutOfMemoryError(
                f"out of GPU memory: {error}. Try a smaller view_batch_size (now {batch}; "
                "4 still works and gives the same image), low_vram=True, tiled_decoder=True, or a smaller "
                "width/height.") from error

    @torch.no_grad()
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] = "", height: int | None = None,
                 width: int | None = None, *, num_images_per_prompt: int = 1, seed: int | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", callback_on_step_end: Callable | None = None,
                 progress: bool | Callable = True, callback_on_stage: Callable | None = None,
                 drop_p: float | None = None, view_batch_size: int | None = None, image=None,
                 strength: float | None = None, upscale: float | None = None, cells: Callable | None = None,
                 repaint_noise: Callable | None = None, extras: dict | None = None, **knobs):
        """Generate images; returns (images, info).

        `image` (a path, PIL image or H x W x 3 uint8 array) starts the run from that image instead of noise
        (docs/method.md#image-to-image): the image is fitted to height x width (default: its own size times
        `upscale`, default 1), encoded by the VAE and noised to the level of the last `run_steps(T, strength)`
        steps, which then run as in text-to-image. `strength` (default DEFAULT_STRENGTH) 0 returns the VAE round
        trip of the fitted image; 1 runs every step.

        `knobs` are the method's knobs of KNOBS, by name (listed below); those left out or None come
        from `recommended_settings(width, height)`. `drop_p` is the complement of `new_p` (the official
        README's spelling). `generator` / `seed` seed the initial latents and, through one derived seed,
        the sub-sampler, re-noising and backgrounds.
        `callback_on_step_end(pipe, step, t, tensors)` gets {"latents": x, "x0": x0, "scores": the
        step's kept ScoreEstimate, "resampled_scores": the one of its R + 1 resampling passes (the
        same unless a repaint pass ran)}; it may return {"latents": ...} to replace the latent, or
        raise `GenerationCancelled` to stop.
        `cells(step, num_passes)` and `repaint_noise(step, shape)` replace the two random draws of
        the loop (the sub-sampler's choices and the re-noising noise, see `Run`); `extras` are
        extensions' per-run data (`run.extras`). `callback_on_stage(stage, done, total)` reports the
        preparation before step 1 ("encode_prompt", "backgrounds", ...) and may raise
        `GenerationCancelled` too. Threads share a sampler one call at a time.
        """
        t_start = time.perf_counter()
        source, height, width, strength = image_request(image, strength, upscale, height, width, self.native_px,
                                                        self.vae_scale_factor, self.max_scale)
        if source is not None and max(height / source.height, width / source.width) > 2 \
                and min(height, width) >= 2 * MIN_SIDE_PX:  # progressive upscaling, each stage within the size rule
            return self._upscale_in_stages(source, prompt, negative_prompt, height, width, strength, upscale,
                                           seed=seed, generator=generator, progress=progress, drop_p=drop_p,
                                           view_batch_size=view_batch_size, output_type=output_type,
                                           num_images_per_prompt=num_images_per_prompt, extras=extras,
                                           callback_on_step_end=callback_on_step_end,
                                           callback_on_stage=callback_on_stage, **knobs)
        height = 2 * self.native_px if height is None else height
        width = 2 * self.native_px if width is None else width
        prompts, negatives = self._prompt_lists(prompt, negative_prompt, num_images_per_prompt)
        s = self.resolve_settings(width, height, **apply_drop_p(knobs, drop_p))
        self.check_inputs(height, width, s, latents, len(prompts))
        view_batch_size = knob("view_batch_size").check(
            self.view_batch_size if view_batch_size is None else view_batch_size, self.native_latent)
        if seed is not None and generator is not None:
            raise ValueError("give either seed or generator, not both")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent'; got {output_type!r}")

        if generator is None:
            seed = random.randrange(2 ** 32) if seed is None else int(seed)
            generator = torch.Generator().manual_seed(seed)
        if latents is None:
            latents = self.initial_latents(height, width, len(prompts), generator)
        x = latents.to(self.device, torch.float32)
        # One derived seed drives the sub-sampler, the re-noising and the backgrounds
        # (docs/method.md#precision-randomness-and-memory).
        aux_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
        where = layout(height, width, self.native_latent, s["patch_size"], self.vae_scale_factor, self.is_flow)
        (H, W), (h, w) = where.latent_size, where.reference_size
        if cells is None or repaint_noise is None:  # both draw from one generator, in loop order
            aux = torch.Generator().manual_seed(aux_seed)
            counts = candidate_counts(H, W, h, w)
            cells = cells or (lambda step, passes: choose_cells(passes, counts, s["new_p"], aux))
            repaint_noise = repaint_noise or (lambda step, shape: torch.randn(shape, generator=aux))
        T = s["num_inference_steps"]
        run = Run(prompts=prompts, negative_prompts=negatives, height=height, width=width, settings=s,
                  view_batch_size=view_batch_size, seed=seed, aux_seed=aux_seed, layout=where,
                  choose_cells=cells, repaint_noise=repaint_noise,
                  first_step=T - run_steps(T, strength) if source else 0,
                  extras=dict(extras or {}), report=callback_on_stage)
        with self._lock:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                self.prepare(run)
                tic = time.perf_counter()
                if source is not None:
                    x = self.image_start(run, fit_image(source, width, height), x)
                x = self.sample(run, x, callback_on_step_end, progress)
                run.timings["denoise"] = self._sync_time(tic)
                tic = time.perf_counter()
                # Low-VRAM mode decodes large images in tiles: a plain 2048^2 SDXL decode needs ~10 GiB.
                tiled = s["tiled_decoder"] or (self.low_vram and max(x.shape[-2:]) > self.native_latent)
                images = x if output_type == "latent" else self.decode(x, tiled, output_type)
                run.timings["decode"] = self._sync_time(tic)
            finally:
                self.finish_run(run)
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else None
        run.timings["total"] = time.perf_counter() - t_start
        settings = dict(s, width=width, height=height, view_batch_size=view_batch_size)
        if source is not None:  # the image by its hash: a record never holds a path
            settings.update(strength=strength, upscale=upscale or 1, image_hash=image_hash(source))
        info = self.info_class(settings=settings,
                               seed=seed, model=str(self.sd_version), reference_size=(h, w), num_views=len(where.views),
                               **run.counters, timings=run.timings, peak_memory_gib=peak)
        return images, info

    def _upscale_in_stages(self, source: Image.Image, prompt, negative_prompt, height: int, width: int,
                           strength: float, upscale, output_type: str, num_images_per_prompt: int, **call):
        """Progressive upscaling (experimental; docs/method.md#image-to-image): first the picture to half the target
        size (itself in stages if that is more than 2x), then that image to the target, each stage at most 2x its
        input. One image at a time; the info counts every stage's UNet work."""
        if num_images_per_prompt != 1 or not isinstance(prompt, str):
            raise ValueError("an upscale of more than 2x runs in stages, one image at a time: give one prompt and "
                             "num_images_per_prompt=1")
        f = self.vae_scale_factor
        half = (-(-height // (2 * f)) * f, -(-width // (2 * f)) * f)  # rounded up: the last stage is at most 2x
        logger.warning("experimental: upscaling %dx%d to %dx%d in stages (via %dx%d); each stage costs a run",
                       source.width, source.height, width, height, half[1], half[0])
        call["seed"] = random.randrange(2 ** 32) if call["seed"] is None and call["generator"] is None else call["seed"]
        stage = functools.partial(ElasticDiffusion.generate, self, prompt, negative_prompt, strength=strength, **call)
        first, info_first = stage(*half, image=source)  # the base's generate: an extension's inputs are in `extras`
        images, info = stage(height, width, image=first[0], output_type=output_type)
        for name in ("unet_samples", "unet_calls", "vae_encodes"):
            setattr(info, name, getattr(info, name) + getattr(info_first, name))
        info.settings.update(upscale=upscale or 1, image_hash=image_hash(source))  # of the picture given
        return images, info

    @staticmethod
    def _prompt_lists(prompt, negative_prompt, num_images_per_prompt: int) -> tuple[list, list]:
        """Prompt and negative lists of equal length, each prompt repeated num_images_per_prompt times."""
        check_number("num_images_per_prompt", num_images_per_prompt, 1, integer=True)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings; got {prompt!r}")
        if len(negatives) != len(prompts) or not all(isinstance(p, str) for p in negatives):
            raise ValueError(f"negative_prompt must be a string or a list of {len(prompts)} strings (one per "
                             f"prompt); got {negative_prompt!r}")
        return [p for p in prompts for _ in range(num_images_per_prompt)], \
            [p for p in negatives for _ in range(num_images_per_prompt)]

    def prepare(self, run: Run) -> None:
        """A run's per-image data, computed once: embeddings, time ids, timesteps, backgrounds.

        Extensions that need per-run data of their own (the ControlNet's condition maps) override
        this, call super() and keep theirs in `run.extras`. Stage times go to `run.timings`.
        """
        tic, s = time.perf_counter(), run.settings
        run.stage("encode_prompt", 0, 1)
        embeds, pooled = self.encode_prompt(run.negative_prompts + run.prompts)  # [neg; pos]
        run.embeds, run.pooled = embeds.to(self.dtype), None if pooled is None else pooled.to(self.dtype)
        if self.is_sdxl:
            k, height, width = s["time_ids_scale"], run.height, run.width
            run.time_ids = torch.tensor([k * height, k * width, 0, 0, k * height, k * width],
                                        device=self.device, dtype=self.dtype)[None]
        run.timings["encode_prompt"] = self._sync_time(tic)

        tic, strips = time.perf_counter(), run.layout.strips
        run.timesteps, run.levels = self.model.schedule(s["num_inference_steps"])
        steps = dict(list(zip(run.timesteps, run.levels))[run.first_step:])  # t -> level, of the steps that run
        run.timestep_tensors = {t: torch.tensor(t, device=self.device) for t in steps}
        run.backgrounds = (self.prepare_backgrounds(strips, steps, run.aux_seed, run.counters, report=run.stage)
                           if strips and steps else {})
        run.timings["backgrounds"] = self._sync_time(tic)

    def finish_run(self, run: Run) -> None:
        """Extension point: runs after every generation (a failed or cancelled one too), still inside it.

        The base frees the run's device tensors and, in low-VRAM mode, moves every model back to the CPU;
        the ControlNet also offloads its own model.
        """
        run.release()
        if self.low_vram:
            # The offload hooks move a model off the GPU only when the next model of the chain runs: a run
            # without a decode (latent output, an error) would leave the UNet there for the next run's
            # text encoders. diffusers' pipelines end each call the same way.
            self.pipe.maybe_free_model_hooks()

    def image_start(self, run: Run, image: Image.Image, noise: torch.Tensor) -> torch.Tensor:
        """The SDEdit start (docs/method.md#image-to-image): the image's latent (`encode_image`) noised forward to
        the level of the run's first step with the seed's noise (B, C, H, W); the latent itself if no step runs."""
        tic = time.perf_counter()
        tiled = run.settings["tiled_decoder"] or (self.low_vram and max(noise.shape[-2:]) > self.native_latent)
        z = self.encode_image(image, tiled).expand_as(noise)
        if run.first_step < len(run.timesteps):
            z = self.model.renoise(z, self.model.clean, run.levels[run.first_step], noise)
        run.timings["encode_image"] = self._sync_time(tic)
        return z

    def sample(self, run: Run, x: torch.Tensor, callback_on_step_end: Callable | None = None,
               progress: bool | Callable = True) -> torch.Tensor:
        """The sampling loop (docs/method.md#sampling-loop), one iteration per timestep; `self.model` says what the
        prediction is (epsilon or v) and how to step and re-noise."""
        from tqdm.auto import tqdm

        s, timesteps, step, renoise = run.settings, run.timesteps, self.model.step, self.model.renoise
        T, omega, R = len(timesteps), s["guidance_scale"], s["resampling_steps"]
        h, w = run.layout.reference_size
        top_left = torch.zeros(1, h, w, dtype=torch.long)
        steps = list(enumerate(timesteps))[run.first_step:]  # step i keeps its place in the whole schedule
        if callable(progress):
            steps = progress(steps)
        elif progress:
            steps = tqdm(steps, desc="ElasticDiffusion")
        for i, t in steps:
            # The schedule's own next level (the final one after the last step), whatever its spacing.
            level, level_next = run.levels[i], run.levels[i + 1]
            # 1. Global direction over R + 1 resampling passes and local unconditional score.
            cells = run.choose_cells(i, R + 1)
            if tuple(cells.shape) != (R + 1, h, w):
                raise ValueError(f"cells(step, num_passes) gave shape {tuple(cells.shape)} at step {i}; "
                                 f"expected {(R + 1, h, w)}")
            scores = resampled = self.estimate_scores(run, x, t, cells)
            # 2. Combine and take a step (DDIM, or the flow's Euler step).
            x0, x_prev = step(scores.local_uncond + omega * scores.direction, x, level, level_next)
            omega_step = omega
            # 3. Repaint: back to level t, one top-left reference pass, guidance w/3 (docs/method.md#repaint).
            if repaint_passes(s) and i < T - 1:
                noise = self._to_device(run.repaint_noise(i, tuple(x.shape)))
                x = renoise(x_prev, level_next, level, noise)
                scores = self.estimate_scores(run, x, t, top_left)
                omega_step = omega / 3
                x0, x_prev = step(scores.local_uncond + omega_step * scores.direction, x, level, level_next)
            # 4. Reduced-resolution guidance, from this step's own UNet outputs
            #    (docs/method.md#reduced-resolution-guidance).
            weight = rrg_weight(i, T, s["rrg_init_weight"], s["cosine_scale"], s["rrg_stop_t"])
            if weight > 10:
                x_prev = x_prev + self.reduced_resolution_guidance(scores, x0, level, omega_step, weight)
            x = x_prev
            if callback_on_step_end is not None:
                tensors = {"latents": x, "x0": x0, "scores": scores, "resampled_scores": resampled}
                x = (callback_on_step_end(self, i, t, tensors) or {}).get("latents", x)
        return x

    # ----------------------------------------------------------- decoding (docs/method.md#decoding)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False, output_type: str = "pil"):
        """VAE decode, one image at a time; `tiled` uses diffusers' blended overlapping tiles.

        A plain decode that runs out of GPU memory is retried tiled.
        """
        images = []
        for z in latents.split(1):
            z = z / self.vae.config.scaling_factor
            if self.vae.config.get("shift_factor") is not None:
                z = z + self.vae.config.shift_factor
            try:
                images.append(self._vae_decode(z, tiled))
            except torch.OutOfMemoryError:
                if tiled:
                    raise
                logger.warning("plain VAE decode ran out of memory; decoding in tiles")
                torch.cuda.empty_cache()
                images.append(self._vae_decode(z, True))
        images = torch.cat(images)
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype("uint8")) for a in array]

    @contextlib.contextmanager
    def _vae_tiling(self, tiled: bool):
        """Use the VAE with diffusers' tiling on if `tiled`; tiling is a switch on the shared VAE, so one user at
        a time."""
        with self._lock:
            was_tiling = getattr(self.vae, "use_tiling", False)
            if tiled:
                self.vae.enable_tiling()
            try:
                yield self.vae
            finally:
                if tiled and not was_tiling:
                    self.vae.disable_tiling()

    def _vae_decode(self, z: torch.Tensor, tiled: bool) -> torch.Tensor:
        with self._vae_tiling(tiled) as vae:
            image = vae.decode(z.to(self.device, vae.dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1).cpu()

    @torch.no_grad()
    def encode_image(self, image: Image.Image, tiled: bool = False) -> torch.Tensor:
        """An RGB image's latent as the UNet sees it: the VAE posterior's mean (no sampling), scaled, (1, C, H, W)
        fp32 for an image of 8H x 8W pixels; `tiled`: diffusers' tiled encode."""
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with self._vae_tiling(tiled) as vae:
            mean = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mean.float()
        return (mean - (vae.config.get("shift_factor") or 0)) * vae.config.scaling_factor

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host-to-device copy that does not make the CPU wait for the GPU (pinned, non-blocking)."""
        if self.device.type != "cuda" or tensor.device.type != "cpu":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _sync_time(self, tic: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - tic

    # -------------------------------------------------------------------------------- compatibility

    def generate_image(self, prompts: str | list[str], negative_prompts: str | list[str] = "",
                       height: int | None = None, width: int | None = None, *, repaint_sampling: bool | None = None,
                       **kwargs):
        """The official entry point: `generate_image(prompts, negative_prompts, height, width, ...)`.

        Returns (images, verbose_info). Takes the same knobs as `__call__`, plus the official names
        `repaint_sampling` (= repaint) and `drop_p` (= 1 - new_p).
        """
        if repaint_sampling is not None:
            kwargs.setdefault("repaint", repaint_sampling)
        return self(prompt=prompts, negative_prompt=negative_prompts, height=height, width=width, **kwargs)


# `help(ElasticDiffusion.generate)` lists the knobs it takes, from the table.
ElasticDiffusion.generate.__doc__ += "\n        Method knobs:\n\n" + "".join(
    f"            {k.name}: {k.help}\n" for k in method_knobs())


# --------------------------------------------------------------------------------------------------
# Saving images with their settings
# --------------------------------------------------------------------------------------------------


def png_metadata(info: GenerationInfo, prompt: str, negative_prompt: str, index: int = 0) -> dict[str, str]:
    """Text chunks that reproduce an image: the JSON record (`GenerationInfo.record`) and an A1111-style
    'parameters' line."""
    record = info.record(prompt, negative_prompt, index)
    line = f"{prompt}\nNegative prompt: {negative_prompt}\n" + ", ".join(
        f"{k}: {v}" for k, v in record.items() if k not in ("prompt", "negative_prompt"))
    return {"elastic_diffusion": json.dumps(record), "parameters": line}


def write_atomically(path: str, write: Callable, suffix: str = ".part") -> str:
    """Create or replace `path` with what `write(binary file)` writes, atomically: `path` is never half-written.

    A temporary file in the same folder is filled, flushed to disk and renamed over `path`, so a crash,
    Ctrl-C, SIGTERM or power loss leaves either the old file or the new one (plus, at worst, a
    temporary `*{suffix}` file that `write` was filling).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def save_png(image, path: str, metadata: dict[str, str]) -> str:
    """Write a PNG with text metadata atomically: no half-written file is ever left at `path`."""
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    for key, value in metadata.items():
        chunks.add_text(key, value)
    return write_atomically(path, lambda f: image.save(f, format="PNG", pnginfo=chunks), suffix=".png.part")


def generate_and_save(pipe, stem: str, prompt: str, negative_prompt: str, extra_outputs: Callable | None = None,
                      **call) -> tuple[list[str], GenerationInfo]:
    """Generate one request with `pipe(prompt, negative_prompt, **call)` and save image k as `{stem}_{k}.png`,
    each output of `extra_outputs(info)` as `{stem}_{name}.png`, all with the metadata that reproduces them.

    The single run and every item of a batch (batch.py) go through here. The extra outputs are written
    first, so an image on disk means its whole request was saved. Returns (paths, images first; info).
    """
    images, info = pipe(prompt, negative_prompt, **call)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    extras = extra_outputs(info) if extra_outputs else []
    saved = {}
    for name, image in extras + list(enumerate(images)):
        index = name if isinstance(name, int) else 0
        saved[name] = save_png(image, f"{stem}_{name}.png", png_metadata(info, prompt, negative_prompt, index))
    return [saved[k] for k in range(len(images))] + [saved[name] for name, _ in extras], info


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except for preset-driven knobs (None) and off-by-default flags."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def add_knob_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per row of KNOBS, with its aliases: method knobs default to None (the resolution-aware
    preset, applied by the sampler), memory knobs to their constant; booleans have --x / --no-x."""
    method = parser.add_argument_group("method knobs (default: the resolution-aware preset)")
    memory = parser.add_argument_group("memory (never changes the image)")
    for row in KNOBS:
        flags = [f"--{name}" for name in (row.name, *row.aliases)]
        default = row.default if row.memory else None
        if row.type is bool:
            preset = "on" if row.default else "off"
        else:
            preset = row.preset or format_number(row.default)
        help_text = row.help if row.memory else f"{row.help} (preset: {preset})"
        kind = dict(action=argparse.BooleanOptionalAction) if row.type is bool else dict(type=row.type)
        choices = dict(choices=list(row.choices)) if row.choices else {}
        (memory if row.memory else method).add_argument(*flags, default=default, help=help_text, **kind, **choices)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="ElasticDiffusion: training-free generation at any size and aspect ratio (up to 2x the "
                    "model's native size per side). Method knobs left out follow the resolution-aware "
                    "presets of the official demo (see README).",
        formatter_class=HelpFormatter)
    p.add_argument("--prompt", default=DEMO_PRESETS[0]["prompt"], help="text prompt")
    p.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT, help="negative prompt ('' is encoded too)")
    p.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: 2048, or --image's "
                   "width times --upscale)")
    p.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: 2048, or --image's "
                   "height times --upscale)")
    p.set_defaults(default_px=2048)  # the side of a text-to-image run's default size
    p.add_argument("--image", metavar="PATH", help="start from this image (docs/method.md#image-to-image): refine "
                   "it, or upscale it with --upscale")
    p.add_argument("--strength", type=float, help=f"with --image: how much to redo, 0 (the image as it is) to 1 "
                   f"(every step) (default: {DEFAULT_STRENGTH})")
    p.add_argument("--upscale", type=float, help="with --image: the output size as a multiple of the image's "
                   "(default: 1; 2 doubles each side)")
    p.add_argument("--seed", type=int, default=0, help="random seed (a random one is used if negative)")
    p.add_argument("--num_images", "--num_sampled", type=int, default=1, help="images to generate for the prompt")
    p.add_argument("--outdir", default="results/", help="folder for the PNGs (created if missing)")
    p.add_argument("--sd_version", "--model", default="XL1.0",
                   help=f"model: one of {sorted(MODEL_IDS)}, a hub id, a diffusers folder or a .safetensors file")
    p.add_argument("--device", default=None, help="torch device (default: cuda, then mps, then cpu)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weight dtype (default: float16 on GPU, bfloat16 for SD 3; float32 on CPU)")
    p.add_argument("--allow_pickle", action="store_true", help="allow non-safetensors (pickle) weights")
    p.add_argument("--t5", action="store_true", help="SD 3 models: also load the T5 text encoder (4.7B parameters); "
                   "without it CLIP cuts prompts at 77 tokens")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the UNet (pays off within one large image)")
    p.add_argument("--drop_p", type=float, help="the official README's name for 1 - new_p")
    add_knob_flags(p)
    p.add_argument("--max_scale", type=int, default=MAX_SCALE,
                   help="largest side as a multiple of the native size; above 2 is experimental")
    p.add_argument("-v", "--verbose", action="store_true", help="log timings and counts")
    many = p.add_argument_group("many images (docs/batch.md): the flags above are the defaults of each line")
    many.add_argument("--prompts_file", metavar="FILE",
                      help="generate every item of FILE into --outdir: .txt (one prompt a line) or .jsonl (one JSON "
                           "object a line: prompt, negative_prompt, width, height, seed, num_images, method knobs)")
    many.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                      help="skip items whose PNGs exist with matching metadata (default: on when --outdir has a "
                           "manifest)")
    many.add_argument("--dry_run", nargs="?", type=int, const=0, default=None, metavar="N",
                      help="check the whole file and print the plan for N processes (default: those launched) "
                           "without loading a model")
    many.add_argument("--native_px", type=int, default=None,
                      help="the model's native size in pixels, to plan without loading it (default: read from "
                           "--sd_version's configs, 1024 for XL1.0, 512 for the 1.x/2.x keys)")
    return p


def sampler_kwargs(args: argparse.Namespace) -> dict:
    """Constructor arguments of the sampler from the shared command-line flags."""
    return dict(device=args.device, sd_version=args.sd_version, view_batch_size=args.view_batch_size,
                low_vram=args.low_vram, torch_dtype=getattr(torch, args.dtype) if args.dtype else None,
                allow_pickle=args.allow_pickle, compile_unet=args.compile, max_scale=args.max_scale, t5=args.t5)


def run_cli(parser: argparse.ArgumentParser, args: argparse.Namespace, make_sampler: Callable,
            call_kwargs: dict | None = None, extra_outputs: Callable | None = None,
            check_call: Callable[[], None] | None = None) -> list[str]:
    """Load, generate and save PNGs with metadata; shared by both command lines.

    `make_sampler()` builds the sampler; `call_kwargs` are extra generate() arguments, checked by `check_call()`
    (ValueError) before the model loads; `extra_outputs(info)` returns more (name, PIL image) pairs to save (the
    ControlNet's condition map).
    With --prompts_file the job runs in batch.py, where each line may set the `call_kwargs`. Bad input ends
    as a usage error (exit 2) before anything is written.
    """
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.prompts_file is not None:  # --image, --strength, --upscale are its lines' defaults there
        import batch

        return batch.run(parser, args, make_sampler, call_kwargs or {}, extra_outputs)
    if args.image is None:
        args.width, args.height = args.width or args.default_px, args.height or args.default_px
    for flag in ("resume", "dry_run", "native_px"):
        if getattr(args, flag) is not None:
            parser.error(f"--{flag} goes with --prompts_file")
    seed = args.seed if args.seed >= 0 else random.randrange(2 ** 32)
    stem = os.path.join(args.outdir, f"{time.strftime('%Y%m%d-%H%M%S')}_seed{seed}")
    try:
        # What can be checked without the model is checked before loading it (seconds to minutes): the
        # sampler's own rules, with the native size from the model's configs where they can be read.
        try:  # a single file's native size would be a guess (native_size): it waits for the model
            native = None if os.path.isfile(os.path.expanduser(args.sd_version)) else native_size(args.sd_version)
        except ValueError:
            native = None
        px, factor = (native.px, native.vae_scale_factor) if native else (None, 8)
        image, args.height, args.width, strength = image_request(args.image, args.strength, args.upscale, args.height,
                                                                 args.width, px, factor, args.max_scale, flag="--")
        check_size(args.height, args.width, px, factor, args.max_scale)
        knobs = knob_flags(args, native.latent if native else None)
        check_number("--num_images", args.num_images, 1, integer=True)
        if check_call is not None:
            check_call()
        pipe = make_sampler()
        paths, info = generate_and_save(pipe, stem, args.prompt, args.negative_prompt, extra_outputs,
                                        height=args.height, width=args.width, seed=seed,
                                        num_images_per_prompt=args.num_images, **knobs,
                                        **(dict(image=image, strength=strength, upscale=args.upscale) if image else {}),
                                        **(call_kwargs or {}))
    except (ValueError, GenerationCancelled) as error:  # the message names the argument: no usage dump
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except torch.OutOfMemoryError as error:
        sys.exit(f"error: {error}")
    for path in paths:
        print(path)
    logger.info("UNet samples %d in %d calls, timings %s", info.unet_samples, info.unet_calls,
                {k: round(v, 2) for k, v in info.timings.items()})
    return paths


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(parser, args, lambda: ElasticDiffusion(**sampler_kwargs(args)))


if __name__ == "__main__":
    sys.modules["elastic_diffusion"] = sys.modules[__name__]  # batch.py's `import elastic_diffusion` finds this copy
    main()
