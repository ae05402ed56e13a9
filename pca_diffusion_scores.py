"""Look inside the method: PCA pictures of the two halves of the score, step by step (docs/look-inside.md).

Records the class direction Δ = ε(x, c) − ε(x, ∅) and the unconditional score ε(x, ∅) of a generation, `plain`
(diffusers' CFG-DDIM on the sampler's modules, read by a UNet forward hook) or `elastic` (our sampler's
`ScoreEstimate` per step, from `callback_on_step_end`), without changing the image by a bit, and draws each map's
first three principal components as red, green and blue. The kept steps' maps stay on the CPU in fp16
(`recording_nbytes`): a 2048² SDXL run that keeps all 50 steps holds 90.6 MiB.

    python pca_diffusion_scores.py --model 1.5 --method elastic --width 1024 --height 1024 --steps_to_keep every:5
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import inspect
import io
import logging
import os
import random
import sys
import time
from typing import Callable, NamedTuple, Sequence

import torch

import elastic_diffusion as ed

logger = logging.getLogger("pca_diffusion_scores")
KNOB_NAMES = tuple(k.name for k in ed.method_knobs())  # the sampler's method knobs (its knobs table)

METHODS = ("plain", "elastic")
BASES = ("shared", "per-step")
ANIMATION_FORMATS = ("webp", "gif")
SHEET_COLUMNS = 6  # steps on a contact sheet unless told otherwise: each column stays readable on a screen


def parse_steps_to_keep(spec: str | Sequence[int], num_inference_steps: int) -> list[int]:
    """Step indices to record, ascending and without repeats, from 'all', 'every:K' (steps 0, K, 2K, ... and always
    the last, which shows the final maps), a list such as '0,10,20,49', or a sequence of ints."""
    T = num_inference_steps
    allowed = (f"'all', 'every:K' with K >= 1, or step indices from 0 to {T - 1} separated by commas "
               "(e.g. '0,10,20')")
    text = (spec if isinstance(spec, str) else ",".join(map(str, spec))).strip().lower()  # a sequence as a list
    if text == "all":
        return list(range(T))
    try:
        if text.startswith("every:"):
            every = int(text.removeprefix("every:"))
            if every < 1:
                raise ValueError
            return sorted(set(range(0, T, every)) | {T - 1})
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"steps_to_keep must be {allowed}; got {spec!r}") from None
    if not steps:
        raise ValueError(f"steps_to_keep names no step; use {allowed}")
    wrong = [s for s in steps if not 0 <= s < T]
    if wrong:
        raise ValueError(f"steps_to_keep: step {wrong[0]} is out of range; with num_inference_steps={T} the steps "
                         f"are 0 to {T - 1}")
    return sorted(set(steps))


def _check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")


def recording_nbytes(num_steps: int, channels: int, latent_size: tuple[int, int],
                     reference_size: tuple[int, int] | None) -> int:
    """Host bytes of a recording's maps: per kept step x0, Δ and the unconditional score (C, H, W) and,
    for the elastic method, Δ on the reference grid (C, h, w), all fp16, plus the x0 preview (3, H, W) uint8."""
    H, W = latent_size
    h, w = reference_size or (0, 0)
    return num_steps * (2 * channels * (3 * H * W + h * w) + 3 * H * W)


class PCAMaps(NamedTuple):
    """A 3-component PCA of one kind of map over the kept steps, with N = 1 basis (shared) or one per step."""
    projections: torch.Tensor  # (K, 3, H, W) float32: coordinates on the principal axes
    rgb: torch.Tensor  # (K, 3, H, W) float32 in [0, 1]: component 1, 2, 3 as red, green, blue
    mean: torch.Tensor  # (N, C)
    components: torch.Tensor  # (N, 3, C)
    variance: torch.Tensor  # (N, 3)
    low: torch.Tensor  # (N, 3) and high (N, 3): the range each component maps to [0, 1]
    high: torch.Tensor


@dataclasses.dataclass(eq=False)
class Recording:
    """What `record_scores` kept of one generation, on the CPU; maps (K, ...) by kept step k, fp16."""
    method: str
    prompt: str
    negative_prompt: str
    steps: list[int]  # the kept steps, ascending
    timesteps: list[int]  # the kept steps' timesteps
    num_inference_steps: int
    x0: torch.Tensor  # (K, C, H, W) the predicted clean latent
    direction: torch.Tensor  # (K, C, H, W) Δ = ε(c) − ε(∅); for elastic the written-back global direction
    local_uncond: torch.Tensor  # (K, C, H, W) ε(∅); for elastic assembled from the windows
    reference_direction: torch.Tensor | None  # (K, C, h, w) Δ on the reference grid (elastic only)
    x0_preview: torch.Tensor  # (K, 3, H, W) uint8 RGB
    image_pt: torch.Tensor  # (3, 8H, 8W) in [0, 1]: the final image exactly as generated
    info: ed.GenerationInfo
    views: list  # the sampler's local views, (row window, column window) pairs; [] for plain
    reference_size: tuple[int, int]  # latent (h, w); the latent size itself for plain
    vae_scale_factor: int
    _pca: dict = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def image(self):
        """The final image as a PIL image (the same pixels the sampler's 'pil' output gives)."""
        return _pil(self.image_pt)

    @property
    def nbytes(self) -> int:
        """Host bytes of the recorded maps and previews (`recording_nbytes`)."""
        tensors = [self.x0, self.direction, self.local_uncond, self.reference_direction, self.x0_preview]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def pca(self, basis: str = "shared") -> dict[str, PCAMaps]:
        """PCA of each recorded map kind, once per basis; 'reference_direction' (elastic) in the basis and colour
        range of 'direction', so a colour means the same vector in both."""
        if basis not in self._pca:  # pca_maps checks `basis`
            maps = {name: pca_maps(getattr(self, name), basis) for name in ("direction", "local_uncond")}
            if self.reference_direction is not None:
                maps["reference_direction"] = pca_maps(self.reference_direction, basis, fitted=maps["direction"])
            self._pca[basis] = maps
        return self._pca[basis]


class _StepRecorder:
    """Copies the kept steps' maps into preallocated fp16 CPU tensors, one step at a time."""

    def __init__(self, steps: list[int]):
        self.slot = {step: k for k, step in enumerate(steps)}
        self.timesteps = [0] * len(steps)
        self.maps: dict[str, torch.Tensor] = {}
        self.final_latent = None

    def record(self, step: int, t, **maps: torch.Tensor) -> None:
        """Store each map (C, ., .) of `step` (a kept step) at its slot."""
        k = self.slot[step]
        self.timesteps[k] = int(t)
        for name, value in maps.items():
            if name not in self.maps:
                self.maps[name] = torch.zeros((len(self.slot), *value.shape), dtype=torch.float16)
            self.maps[name][k].copy_(value)


def generate_plain(sampler, prompt: str, negative_prompt: str, height: int, width: int, num_inference_steps: int,
                   guidance_scale: float, seed: int, output_type: str = "pil",
                   callback_on_step_end: Callable | None = None, progress: bool = True,
                   unet_hook: Callable | None = None):
    """Plain CFG at the size through diffusers' pipeline (its defaults, SDXL's size conditioning included) on the
    sampler's modules, from its starting noise for `seed`, with DDIM (SD 3: its own flow scheduler); the sampler
    decodes (diffusers would hand its upcast VAE the UNet-dtype latent). Returns (images, info).
    `unet_hook(module, args, kwargs, output)`: a forward hook on the UNet (SD 3: the transformer)."""
    from diffusers import DDIMScheduler

    scheduler = (type(sampler.scheduler) if sampler.is_flow else DDIMScheduler).from_config(sampler.scheduler.config)
    pipe = ed.share_pipeline(sampler.pipe, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=not progress)
    latents = sampler.initial_latents(height, width, 1, seed).to(sampler.dtype)
    with sampler.exclusive():  # the modules are the sampler's: no other generation may run through them now
        with (sampler.unet.register_forward_hook(unet_hook, with_kwargs=True) if unet_hook is not None
              else contextlib.nullcontext()):
            latents = pipe(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, latents=latents,
                           output_type="latent", callback_on_step_end=callback_on_step_end).images
    images = sampler.decode(latents, False, output_type)
    f = sampler.vae_scale_factor
    method = "plain flow" if sampler.is_flow else "plain DDIM"
    info = ed.GenerationInfo(dict(method=method, width=width, height=height,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale),
                             seed, str(sampler.sd_version), reference_size=(height // f, width // f))
    return images, info


def _generate_parameters(sampler) -> set[str]:
    """Keyword names the sampler's `generate` takes: those of each `generate` of its classes, and the knobs."""
    names = {name for cls in type(sampler).__mro__ if "generate" in vars(cls)
             for name, p in inspect.signature(vars(cls)["generate"]).parameters.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return (names - {"self"}) | set(KNOB_NAMES)


def record_scores(sampler, prompt: str, negative_prompt: str = "", *, height: int | None = None,
                  width: int | None = None, method: str = "elastic", steps_to_keep: str | Sequence[int] = "all",
                  seed: int | None = None, decode_x0: bool = False, callback_on_step_end: Callable | None = None,
                  progress: bool = True, **generate_kwargs) -> Recording:
    """Generate one image with `sampler` (an `ElasticDiffusion`) by `method`, 'elastic' (the sampler) or 'plain'
    (`generate_plain`), from the starting noise of `seed` (random if None), and record its scores at the steps of
    `parse_steps_to_keep`. `decode_x0` previews each kept x0 with a VAE decode, not `linear_previews`. The
    `callback_on_step_end` runs after the recorder and may cancel; `generate_kwargs` are the sampler's `generate`
    arguments, of which 'plain' reads `num_inference_steps` and `guidance_scale`. Bad input raises ValueError (an
    unknown keyword TypeError) before anything runs."""
    _check_choice("method", method, METHODS)
    unknown = sorted(set(generate_kwargs) - _generate_parameters(sampler))
    if unknown:  # 'plain' would otherwise ignore a misspelt knob without a word
        raise TypeError(f"record_scores got unexpected keyword arguments {unknown}: it takes the sampler's "
                        "generate() arguments")
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise ValueError(f"prompt and negative_prompt must be strings; got {prompt!r} and {negative_prompt!r}")
    height, width = (2 * sampler.native_px if size is None else size for size in (height, width))
    settings = sampler.resolve_settings(width, height, **{k: generate_kwargs.get(k) for k in KNOB_NAMES})
    sampler.check_inputs(height, width, settings, None, 1)
    T = settings["num_inference_steps"]
    steps = parse_steps_to_keep(steps_to_keep, T)
    omega = settings["guidance_scale"]
    if method == "plain" and omega <= 1:
        raise ValueError(f"guidance_scale must be greater than 1 for method 'plain' (diffusers skips the "
                         f"unconditional branch otherwise, so there is no direction to record); got {omega}")
    seed = random.randrange(2 ** 32) if seed is None else int(seed)
    recorder = _StepRecorder(steps)
    unet_call, levels = {}, sampler.model.schedule(T)[1]

    def keep_unet_call(unet, args, kwargs, output):  # plain: diffusers calls the model on [x; x]: uncond, cond
        unet_call.update(x=args[0] if args else kwargs["hidden_states"], out=output[0])

    def on_step(pipe, i, t, tensors):  # the recorder, in front of the caller's callback
        if i in recorder.slot and method == "plain":
            x, level = unet_call["x"], levels[i]
            uncond, cond = sampler.model.prediction(unet_call["out"], x, level).chunk(2)
            direction = cond - uncond
            x0, _ = sampler.model.step(uncond + omega * direction, x[:1].float(), level, level)
            recorder.record(i, t, x0=x0[0], direction=direction[0], local_uncond=uncond[0])
        elif i in recorder.slot:  # elastic: the `ScoreEstimate` of the update the step kept
            scores = tensors["scores"]
            h, w = scores.reference_latent.shape[-2:]
            recorder.record(i, t, x0=tensors["x0"][0], direction=scores.direction[0],
                            local_uncond=scores.local_uncond[0],
                            reference_direction=ed.downsample_groups(scores.direction[:1], h, w)[0])
        if i == T - 1:
            recorder.final_latent = tensors["latents"][0].float().cpu()
        return callback_on_step_end(pipe, i, t, tensors) if callback_on_step_end is not None else {}

    if method == "plain":
        images, info = generate_plain(sampler, prompt, negative_prompt, height, width, T, omega, seed, output_type="pt",
                                      callback_on_step_end=on_step, progress=progress, unet_hook=keep_unet_call)
        views, reference = [], info.reference_size
    else:
        images, info = sampler(prompt, negative_prompt, height=height, width=width, seed=seed, output_type="pt",
                               callback_on_step_end=on_step, progress=progress, **generate_kwargs)
        f = sampler.vae_scale_factor
        views = ed.local_views(height // f, width // f, sampler.native_latent, info.settings["patch_size"])
        reference = tuple(info.reference_size)
    image = images[0].float().cpu()
    maps = recorder.maps
    previews = (decoded_previews(sampler, maps["x0"], bool(info.settings.get("tiled_decoder")))
                if decode_x0 else linear_previews(maps["x0"], recorder.final_latent, image, sampler.vae_scale_factor))
    return Recording(method=method, prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                     timesteps=recorder.timesteps, num_inference_steps=T,
                     x0=maps["x0"], direction=maps["direction"], local_uncond=maps["local_uncond"],
                     reference_direction=maps.get("reference_direction"), x0_preview=previews, image_pt=image,
                     info=info, views=views, reference_size=reference, vae_scale_factor=sampler.vae_scale_factor)


def _to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8)


def linear_previews(x0: torch.Tensor, final_latent: torch.Tensor, image: torch.Tensor,
                    vae_scale_factor: int) -> torch.Tensor:
    """x0 (K, C, H, W) -> (K, 3, H, W) uint8 through an affine latent-to-RGB map fitted by least squares to
    `final_latent` (C, H, W) and `image` (3, fH, fW) averaged over f x f blocks: the VAE, linearised."""
    C = final_latent.shape[0]
    target = torch.nn.functional.avg_pool2d(image[None].double(), vae_scale_factor)[0]  # (3, H, W)
    inputs = torch.cat([final_latent.double().reshape(C, -1), torch.ones(1, target[0].numel(), dtype=torch.double)])
    mapping = torch.linalg.lstsq(inputs.T, target.reshape(3, -1).T).solution  # (C + 1, 3)
    K, _, H, W = x0.shape
    latents = torch.cat([x0.double().reshape(K, C, -1), torch.ones(K, 1, H * W, dtype=torch.double)], dim=1)
    return _to_uint8(torch.einsum("kcn,cr->krn", latents, mapping).reshape(K, 3, H, W))


def decoded_previews(sampler, x0: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """x0 (K, C, H, W) -> (K, 3, H, W) uint8: each decoded by the sampler's VAE, averaged to latent resolution."""
    f = sampler.vae_scale_factor
    previews = [torch.nn.functional.avg_pool2d(sampler.decode(z[None].float(), tiled, "pt"), f)[0] for z in x0]
    return _to_uint8(torch.stack(previews))


def fit_pca(maps: torch.Tensor, num_components: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal axes of the C-vectors at every pixel of `maps` (K, C, H, W), pooled over the K maps: mean (C,),
    components (num_components, C) by decreasing variance, variance (num_components,). The SVD of the channel
    covariance (fp64, accumulated map by map: no copy of all maps); each axis's largest entry is positive."""
    K, C = maps.shape[:2]
    count = K * maps[0, 0].numel()
    mean = sum(m.double().sum((1, 2)) for m in maps) / count
    covariance = torch.zeros(C, C, dtype=torch.double)
    for m in maps:
        centred = m.double().reshape(C, -1) - mean[:, None]
        covariance += centred @ centred.T
    covariance /= max(count - 1, 1)
    axes, variance, _ = torch.linalg.svd(covariance)  # symmetric: the columns of U are the principal axes
    components = axes.T[:num_components]
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))
    components = components * torch.where(largest < 0, -1.0, 1.0).to(components)
    return mean.float(), components.float(), variance[:num_components].float()


def pca_maps(maps: torch.Tensor, basis: str = "shared", fitted: PCAMaps | None = None) -> PCAMaps:
    """Three principal components of `maps` (K, C, H, W) as RGB images, with one basis and colour range over all
    K maps ('shared') or one per map ('per-step'); or with `fitted`'s bases and ranges (same K)."""
    _check_choice("basis", basis, BASES)
    if fitted is not None:
        mean, components, variance = fitted.mean, fitted.components, fitted.variance
    elif basis == "shared":
        mean, components, variance = (t[None] for t in fit_pca(maps))
    else:
        mean, components, variance = (torch.stack(t) for t in zip(*(fit_pca(m[None]) for m in maps)))
    bases = range(len(maps)) if len(mean) > 1 else [0] * len(maps)  # the step's own basis, or the shared one
    projections = torch.cat([torch.einsum("qc,kchw->kqhw", components[n], m[None].float() - mean[n, :, None, None])
                             for n, m in zip(bases, maps)])  # map by map: no float copy of all maps
    if fitted is not None:
        low, high = fitted.low, fitted.high
    else:
        dims = (0, 2, 3) if basis == "shared" else (2, 3)
        low, high = projections.amin(dims).reshape(-1, 3), projections.amax(dims).reshape(-1, 3)
    spread = (high - low)[:, :, None, None]
    flat = spread <= 0  # a component with no spread is mid-grey, not NaN
    rgb = torch.where(flat, 0.5, (projections - low[:, :, None, None]) / torch.where(flat, 1.0, spread)).clamp(0, 1)
    return PCAMaps(projections, rgb, mean, components, variance, low, high)


# The contact sheet's row labels by method, top to bottom: x0 preview, direction, unconditional score. Text drawn
# into pictures stays ASCII: Pillow's built-in font has no Greek letters or math signs.
ROW_TITLES = {"plain": ("x0 prediction", "class direction\neps(c) - eps(neg)", "unconditional\nscore eps(neg)"),
              "elastic": ("x0 prediction", "global direction\n(reference,\nwritten back)",
                          "local unconditional\nscore (windows)")}


def panel_size(latent_size: tuple[int, int], panel_px: int) -> tuple[int, int]:
    """(width, height) of one panel: the latent's aspect with the longer side `panel_px`."""
    H, W = latent_size
    scale = panel_px / max(H, W)
    return max(1, round(W * scale)), max(1, round(H * scale))


def _pil(rgb: torch.Tensor):
    """(3, H, W) RGB, float in [0, 1] or uint8 -> PIL image."""
    from PIL import Image

    pixels = rgb if rgb.dtype == torch.uint8 else _to_uint8(rgb)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def map_panel(rgb: torch.Tensor, size: tuple[int, int]):
    """(3, H, W) RGB (float in [0, 1] or uint8) -> PIL image of `size`, enlarged with nearest neighbours, so each
    latent pixel stays one visible block (the unconditional score is pixel-level detail, which smoothing would
    hide), or reduced with box averaging."""
    from PIL import Image

    image = _pil(rgb)
    return image.resize(size, Image.Resampling.NEAREST if size[0] >= image.width else Image.Resampling.BOX)


class SheetLayout(NamedTuple):
    """Where the panels sit on a contact sheet (pixels): below the title and the step labels (3 font sizes high
    each), right of the row labels (11); a column is 5 font sizes wide at least, for the step label."""
    panel: tuple[int, int]  # (width, height)
    rows: int
    columns: int
    font_size: int

    @property
    def gap(self) -> int:
        return max(2, self.font_size // 4)

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the panel at `row`, `column`."""
        (w, h), f = self.panel, self.font_size
        left = 11 * f + self.gap + column * (max(w, 5 * f) + self.gap)
        top = 6 * f + self.gap + row * (h + self.gap)
        return left, top, left + w, top + h

    @property
    def size(self) -> tuple[int, int]:
        """(width, height): up to where a panel past the last row and column would start."""
        return self.box(self.rows, self.columns)[:2]


def sheet_steps(steps: Sequence[int], max_columns: int) -> list[int]:
    """At most `max_columns` of the kept `steps`, evenly spaced, the first and last included."""
    if len(steps) <= max_columns:
        return list(steps)
    if max_columns == 1:
        return [steps[-1]]
    return [steps[round(j * (len(steps) - 1) / (max_columns - 1))] for j in range(max_columns)]


def contact_sheet(recording: Recording, basis: str = "shared", steps: Sequence[int] | None = None,
                  max_columns: int = SHEET_COLUMNS, panel_px: int = 256):
    """The recording as one PIL picture: rows x0 preview, direction, unconditional score; one labelled column per
    kept step of `steps` (default `sheet_steps(recording.steps, max_columns)`), panels `panel_size`d."""
    from PIL import Image, ImageDraw, ImageFont

    maps = recording.pca(basis)
    steps = sheet_steps(recording.steps, max_columns) if steps is None else list(steps)
    missing = [s for s in steps if s not in recording.steps]
    if missing:
        raise ValueError(f"steps: step {missing[0]} was not recorded; recorded steps are {recording.steps}")
    font_size = max(12, min(20, panel_px // 16))
    layout = SheetLayout(panel_size(recording.direction.shape[-2:], panel_px), 3, len(steps), font_size)
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=font_size)
    s = recording.info.settings
    title = (f"{'plain CFG-DDIM' if recording.method == 'plain' else 'ElasticDiffusion'} {s['width']}x{s['height']}\n"
             f"seed {recording.info.seed}, PCA basis {basis}")
    draw.multiline_text((layout.gap, layout.gap), title, fill="black", font=font, spacing=2)
    rows = [recording.x0_preview, maps["direction"].rgb, maps["local_uncond"].rgb]
    for row, (label, images) in enumerate(zip(ROW_TITLES[recording.method], rows)):
        draw.multiline_text((layout.gap, layout.box(row, 0)[1]), label, fill="black", font=font, spacing=2)
        for column, step in enumerate(steps):
            k = recording.steps.index(step)
            box = layout.box(row, column)
            sheet.paste(map_panel(images[k], layout.panel), box[:2])
            if row == 0:
                draw.multiline_text((box[0], 3 * font_size), f"step {step}\nt={recording.timesteps[k]}",
                                    fill="black", font=font, spacing=2)
    return sheet


def animation(recording: Recording, basis: str = "shared", fmt: str = "webp", panel_px: int = 256,
              frame_ms: int = 200) -> bytes:
    """An animated WebP (lossless) or GIF over all kept steps: each frame a one-column contact sheet."""
    _check_choice("fmt", fmt, ANIMATION_FORMATS)
    frames = [contact_sheet(recording, basis, steps=[step], panel_px=panel_px) for step in recording.steps]
    durations = [frame_ms] * (len(frames) - 1) + [max(frame_ms, 1500)]  # rest on the final maps
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt.upper(), save_all=True, append_images=frames[1:], duration=durations,
                   loop=0, lossless=fmt == "webp")  # GIF has no lossy mode: its writer reads no such option
    return buffer.getvalue()


WINDOW_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48))  # by (row, column) parity
WINDOW_TINT = 80  # alpha of a window's fill, out of 255: the image stays visible under the grid


def window_overlay(image, views: Sequence, reference_size: tuple[int, int], vae_scale_factor: int = 8,
                   legend: bool = True):
    """A copy of `image` (PIL) with the sampler's `views` (`local_views`, latent pixels) tinted, neighbours in
    different colours, each one's crop outlined thinly, the reference latent size (h, w) as a white box at the
    centre, and `overlay_legend` in a strip below."""
    from PIL import Image, ImageDraw, ImageFont

    f = vae_scale_factor
    base = image.convert("RGB")
    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(tint)
    rows, columns = sorted({r.own_start for r, _ in views}), sorted({c.own_start for _, c in views})
    colours = [WINDOW_COLOURS[2 * (rows.index(r.own_start) % 2) + columns.index(c.own_start) % 2] for r, c in views]
    line = max(2, base.width // 512)
    for (r, c), colour in zip(views, colours):
        draw.rectangle([c.own_start * f, r.own_start * f, c.own_end * f - 1, r.own_end * f - 1],
                       fill=colour + (WINDOW_TINT,), outline=colour + (255,), width=line)
    out = Image.alpha_composite(base.convert("RGBA"), tint).convert("RGB")
    draw = ImageDraw.Draw(out)
    for (r, c), colour in zip(views, colours):
        draw.rectangle([c.crop_start * f, r.crop_start * f, c.crop_end * f - 1, r.crop_end * f - 1],
                       outline=colour, width=max(1, line // 2))
    h, w = reference_size
    left, top = (base.width - w * f) // 2, (base.height - h * f) // 2
    draw.rectangle([left - 1, top - 1, left + w * f, top + h * f], outline="black", width=1)
    draw.rectangle([left, top, left + w * f - 1, top + h * f - 1], outline="white", width=line)
    if not legend:
        return out
    font_size = max(12, base.width // 90)
    canvas = Image.new("RGB", (base.width, base.height + 3 * font_size + 4 * line), "white")  # the legend below
    canvas.paste(out, (0, 0))
    ImageDraw.Draw(canvas).multiline_text((line, base.height + line), overlay_legend(views, reference_size, f),
                                          fill="black", font=ImageFont.load_default(size=font_size), spacing=2)
    return canvas


def overlay_legend(views: Sequence, reference_size: tuple[int, int], vae_scale_factor: int = 8) -> str:
    """Two lines saying what `window_overlay` draws, in pixels of the image (ASCII, like all text in pictures)."""
    f = vae_scale_factor
    h, w = reference_size
    if not views:
        return f"The UNet sees the whole image at once ({w * f}x{h * f} px)."
    rows, columns = len({r for r, _ in views}), len({c for _, c in views})
    r, c = views[0]
    crop = f"{(c.crop_end - c.crop_start) * f}x{(r.crop_end - r.crop_start) * f}"
    windows = f"{len(views)} local window" + ("s" if len(views) > 1 else "")
    return (f"{windows} ({rows}x{columns}, tinted); thin outlines: the {crop} px crop each window "
            "is seen in (window plus context).\n"
            f"White box: the reference size, {w * f}x{h * f} px: the whole image, sub-sampled, for the global "
            "direction.")


def describe(recording: Recording, basis: str = "shared") -> str:
    """One paragraph saying what the contact sheet and the animation show."""
    s = recording.info.settings
    colours = ("one basis for all steps, so a colour means the same thing from step to step" if basis == "shared"
               else "a basis per step, so colours are not comparable across steps")
    if recording.method == "plain":
        how = (f"computed by the model on the whole {s['width']}×{s['height']} image at once (plain "
               "classifier-free guidance)")
    else:
        h, w = recording.reference_size
        f = recording.vae_scale_factor
        how = (f"the global direction estimated on a {w * f}×{h * f} px reference and written back to full "
               "resolution, and the unconditional score assembled from local windows")
    return (f"Top row: the model's guess of the final image (x0) at each denoising step. Below: the two halves "
            f"of the guided score, {how}. Each map's latent channels are projected on their first three principal "
            f"components, shown as red, green and blue ({colours}). The class direction ε(c) − ε(∅) should "
            "follow the layout of the image (regions, edges); the unconditional score ε(∅) should look like fine, "
            "uncorrelated detail. That split is what lets ElasticDiffusion estimate the first at low resolution "
            "and the second window by window.")


def pca_record(info: ed.GenerationInfo, recording: Recording, basis: str) -> ed.GenerationInfo:
    """The run's record `info` with what the pictures show added to its settings: method, basis, kept steps."""
    return dataclasses.replace(info, settings=dict(info.settings, pca_method=recording.method, pca_basis=basis,
                                                   pca_steps=recording.steps))


def save_outputs(recording: Recording, folder: str, basis: str = "shared", max_columns: int = SHEET_COLUMNS,
                 panel_px: int = 256, animation_format: str = "webp") -> dict[str, str]:
    """Write image.png, sheet.png (both with the main CLI's PNG metadata), animation.<fmt> and, for the elastic
    method, windows.png into `folder` (created). Returns {name: path}."""
    os.makedirs(folder, exist_ok=True)
    metadata = ed.png_metadata(pca_record(recording.info, recording, basis), recording.prompt,
                               recording.negative_prompt)
    paths = dict(image=ed.save_png(recording.image, os.path.join(folder, "image.png"), metadata))
    sheet = contact_sheet(recording, basis, max_columns=max_columns, panel_px=panel_px)
    paths["sheet"] = ed.save_png(sheet, os.path.join(folder, "sheet.png"), metadata)
    frames = animation(recording, basis, animation_format, panel_px)
    paths["animation"] = ed.write_atomically(os.path.join(folder, f"animation.{animation_format}"),
                                             lambda f: f.write(frames))
    if recording.method == "elastic":
        overlay = window_overlay(recording.image, recording.views, recording.reference_size, recording.vae_scale_factor)
        paths["windows"] = ed.save_png(overlay, os.path.join(folder, "windows.png"), metadata)
    return paths


def build_parser() -> argparse.ArgumentParser:
    """`elastic_diffusion.py`'s flags (model, size, knobs), plus the visualisation's own."""
    parser = ed.build_parser()
    parser.prog = "pca_diffusion_scores.py"
    parser.description = ("Record the class direction and the unconditional score during a generation (plain "
                          "CFG-DDIM or ElasticDiffusion) and draw their principal components: a contact sheet, "
                          "an animation and the final image, in one folder per run.")
    parser.set_defaults(outdir="results/pca/")
    g = parser.add_argument_group("score visualisation")
    g.add_argument("--method", choices=METHODS, default="elastic",
                   help="'plain': CFG-DDIM run directly at the size; 'elastic': the ElasticDiffusion sampler")
    g.add_argument("--basis", choices=BASES, default="shared",
                   help="'shared': one PCA basis over all kept steps (colours comparable across steps); "
                        "'per-step': one per step")
    g.add_argument("--steps_to_keep", default="all",
                   help="steps to record: 'all', 'every:K' (0, K, 2K, ... and the last) or a list like 0,10,20,49")
    g.add_argument("--sheet_columns", type=int, default=SHEET_COLUMNS,
                   help="most steps on the contact sheet (evenly spaced among the kept ones)")
    g.add_argument("--panel_px", type=int, default=256, help="longer side of each panel, in pixels")
    g.add_argument("--animation", choices=ANIMATION_FORMATS, default="webp", help="animation file format")
    g.add_argument("--decode_x0", action=argparse.BooleanOptionalAction, default=False,
                   help="preview x0 with a VAE decode per kept step (slow at large sizes) instead of a linear "
                        "latent-to-RGB fit")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.num_images != 1:
        parser.error(f"--num_images: this script records one image; got {args.num_images}")
    for flag in ("prompts_file", "resume", "dry_run", "native_px"):  # elastic_diffusion.py's batch jobs
        if getattr(args, flag, None) is not None:
            parser.error(f"--{flag}: this script records one image; jobs of many images are "
                         "elastic_diffusion.py --prompts_file")
    if args.image is not None:
        parser.error("--image: this script records text-to-image runs")
    args.width, args.height = args.width or args.default_px, args.height or args.default_px
    if args.sheet_columns < 1:
        parser.error(f"--sheet_columns must be at least 1; got {args.sheet_columns}")
    if not 16 <= args.panel_px <= 4096:
        parser.error(f"--panel_px must be between 16 and 4096; got {args.panel_px}")
    steps = args.num_inference_steps or ed.recommended_settings(args.width, args.height)["num_inference_steps"]
    if steps >= 1:  # checked before the model loads; a bad step count is reported by the sampler's checks
        try:
            parse_steps_to_keep(args.steps_to_keep, steps)
        except ValueError as error:
            parser.error(f"--{error}")
    knobs = {name: getattr(args, name) for name in KNOB_NAMES}
    ignored = [f"--{n}" for n in (*KNOB_NAMES, "drop_p") if args.method == "plain" and getattr(args, n) is not None
               and n not in ("num_inference_steps", "guidance_scale")]
    if ignored:
        logger.warning("--method plain ignores %s (ElasticDiffusion knobs)", ", ".join(ignored))
    seed = args.seed if args.seed >= 0 else random.randrange(2 ** 32)
    try:
        sampler = ed.ElasticDiffusion(**ed.sampler_kwargs(args))
        recording = record_scores(sampler, args.prompt, args.negative_prompt, height=args.height, width=args.width,
                                  method=args.method, steps_to_keep=args.steps_to_keep, seed=seed,
                                  decode_x0=args.decode_x0, drop_p=args.drop_p, **knobs)
    except ValueError as error:  # the message names the argument: no usage dump
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except torch.OutOfMemoryError as error:
        sys.exit(f"error: {error}")
    folder = os.path.join(args.outdir, f"{time.strftime('%Y%m%d-%H%M%S')}_{args.method}_{args.width}x{args.height}"
                                       f"_seed{seed}")
    paths = save_outputs(recording, folder, args.basis, args.sheet_columns, args.panel_px, args.animation)
    print("\n".join(paths.values()))
    logger.info("recorded %d steps, %.1f MiB of maps on the CPU", len(recording.steps), recording.nbytes / 2 ** 20)
    return paths


if __name__ == "__main__":
    main()
