"""Replicate / cog entry point: ElasticDiffusion text-to-image as a hosted API (docs/replicate.md).

    cog predict -i prompt="A photo of the dolomites, highly detailed, sharp" -i width=2048 -i height=1024
    cog push r8.im/<your-username>/elastic-diffusion

`setup()` loads the model once: SDXL, or what the MODEL environment variable names (anything the sampler's
`sd_version` takes: "1.5", a hub id, a diffusers folder, a .safetensors file). `predict()` checks a request
(a ValueError naming the input and the rule; cog shows it to the caller), generates, and returns the images
with every setting in their metadata. The seed used is printed (cog's logs) and is part of the file names.

cog reads `predict()`'s parameters from the source text: `cog predict` and `cog serve` parse this file without
running it, so every `Input(...)` is written out with literal values. The method knobs' lines are rendered from
`elastic_diffusion.KNOBS` by `python tests/test_cog.py` and checked against the table by tests/test_cog.py, as
the README's knob table is. The ControlNet variant is a second entry, `predict_controlnet.py`.

The checks are the sampler's (`check_size`, `check_prompt`, each knob's row of the knobs table): a container
needs neither Gradio nor the demos.
"""
import atexit
import dataclasses
import os
import secrets
import shutil
import tempfile
from typing import Optional

import torch
from cog import BasePredictor, Input, Path
from PIL import ExifTags, Image

import elastic_diffusion as ed

MAX_OUTPUTS = 4  # images per request: they run as one batch, so this bounds a request's time and memory
WEBP_LOSSLESS_QUALITY = 100  # output_quality 100 writes lossless WebP; below it, lossy at that quality


def check_request(inputs: dict, sampler) -> dict:
    """predict()'s inputs checked, each with a ValueError naming it and what is allowed; returns the sampler's call
    (prompts, size, seed, batch, method knobs: None for the resolution-aware preset).

    The sampler's size rule (`check_size`), a hosted API's prompt rule (`check_prompt`) and each knob's demo
    range from the knobs table (it bounds a stranger's GPU time), so that a request fails before any work.
    """
    ed.check_size(inputs["height"], inputs["width"], sampler.native_px, sampler.vae_scale_factor, sampler.max_scale)
    seed = inputs["seed"]
    if seed is None:
        seed = secrets.randbelow(ed.MAX_SEED + 1)
    ed.check_number("seed", seed, 0, ed.MAX_SEED, integer=True)
    ed.check_number("num_outputs", inputs["num_outputs"], 1, MAX_OUTPUTS, integer=True)
    if inputs["output_format"] not in ("png", "webp"):
        raise ValueError(f"output_format must be png or webp; got {inputs['output_format']!r}")
    ed.check_number("output_quality", inputs["output_quality"], 1, WEBP_LOSSLESS_QUALITY, integer=True)
    knobs = {k.name: None if inputs[k.name] is None else k.check(inputs[k.name], sampler.native_latent, demo=True)
             for k in ed.method_knobs()}
    if sampler.is_flow:  # cog's literal defaults are SDXL's: on SD 3 they mean "the model's own" (FLOW_DEFAULTS)
        knobs.update({name: None for name in ed.FLOW_DEFAULTS if knobs[name] == ed.knob(name).default})
    return dict(prompt=ed.check_prompt("prompt", inputs["prompt"]), width=inputs["width"], height=inputs["height"],
                negative_prompt=ed.check_prompt("negative_prompt", inputs["negative_prompt"], required=False),
                seed=seed, num_images_per_prompt=inputs["num_outputs"], **knobs)


def read_image(path) -> Image.Image:
    """An uploaded image, read (`load_image`); a ValueError names the file by its name only (no server path)."""
    try:
        return ed.load_image(path, "image")
    except ValueError as error:
        raise ValueError(str(error).replace(os.fspath(path), os.path.basename(path))) from None


def save_webp(image: Image.Image, path: str, metadata: dict[str, str], quality: int) -> str:
    """A WebP with the PNG's two text records in EXIF: the JSON record as ImageDescription (ASCII: the JSON
    escapes the rest) and the A1111-style 'parameters' line as UserComment (UTF-16, the tag's Unicode form)."""
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = metadata["elastic_diffusion"]
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = (
        b"UNICODE\x00" + metadata["parameters"].encode("utf-16-be"))
    lossless = quality >= WEBP_LOSSLESS_QUALITY
    return ed.write_atomically(path, lambda f: image.save(f, format="WEBP", quality=quality, lossless=lossless,
                                                         exif=exif), suffix=".webp.part")


class Predictor(BasePredictor):
    """ElasticDiffusion text-to-image: the model loaded once, one request at a time (cog's default)."""

    def setup(self) -> None:
        """Load the model; make the folder that holds the latest prediction's files (removed on exit)."""
        self.sampler = self.load_sampler()
        self.output_root = tempfile.mkdtemp(prefix="elastic_diffusion_predictions_")
        atexit.register(shutil.rmtree, self.output_root, True)
        print(f"Loaded {ed.public_name(self.sampler.sd_version)} on {self.sampler.device} "
              f"(native {self.sampler.native_px} px)")
        if self.sampler.device.type == "cpu":
            print("No GPU found: running on the CPU, which is very slow at these sizes")

    def load_sampler(self) -> ed.ElasticDiffusion:
        """The sampler of $MODEL, else of the sampler's default model, SDXL (subclasses add models to it)."""
        model = os.environ.get("MODEL")
        return ed.ElasticDiffusion(**({"sd_version": model} if model else {}))

    def predict(
        self,
        prompt: str = Input(default="A photo of the dolomites, highly detailed, sharp", description="What the image shows."),
        negative_prompt: str = Input(default="blurry, ugly, duplicate, no details, deformed", description="What the image should not show (an empty one is encoded too)."),
        width: int = Input(default=2048, ge=128, le=2048, description="Width in pixels: a multiple of 8, from 128 to twice the model's native size (2048 on SDXL)."),
        height: int = Input(default=1024, ge=128, le=2048, description="Height in pixels: a multiple of 8, from 128 to twice the model's native size (2048 on SDXL)."),
        seed: Optional[int] = Input(default=None, ge=0, le=4294967295, description="Random seed: the same seed and settings give the same images. Leave blank for a random one; the seed used is in the logs, the file names and the metadata."),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Images to generate, as one batch from the seed (the metadata's image_index tells them apart)."),
        image: Optional[Path] = Input(default=None, description="Image-to-image: a picture to refine or upscale (any format and mode Pillow reads, at most 64 MP), scaled to cover width x height and centre-cropped."),
        strength: Optional[float] = Input(default=None, ge=0, le=1, description="Image-to-image: start from the input image and redo this fraction of the steps, 0 (keep it) to 1 (every step); the time grows with it. Leave blank for 0.5 when predict.py gets an image; the ControlNet entry then starts from noise."),
        # Method knobs: rendered from elastic_diffusion.KNOBS by `python tests/test_cog.py` (tests/test_cog.py checks).
        num_inference_steps: int = Input(default=50, ge=1, le=150, description="DDIM steps; time grows linearly with them (50 is the paper's setting)."),
        guidance_scale: float = Input(default=10.0, ge=1, le=30, description="Classifier-free guidance: how closely the image follows the prompt (it scales the global content direction)."),
        resampling_steps: Optional[int] = Input(default=None, ge=0, le=40, description="Extra passes over the reduced-resolution reference per step: sharper and more coherent, but slower (2 UNet samples per image each). Leave blank for the preset: 0 at or below the native size, 7 above it, 10 from 2.5x the native area."),
        new_p: float = Input(default=0.3, ge=0.05, le=1, description="Fraction of reference pixels drawn from new positions in each resampling pass (0.3 is the paper's recommendation; drop_p = 1 - new_p)."),
        rrg_init_weight: Optional[float] = Input(default=None, ge=0, le=10000, description="Reduced-resolution guidance weight at the first step: higher removes artefacts such as repeated objects but blurs, too high lets the padding colours bleed in. Leave blank for the preset: 0 at or below the native size, else 500 x the area in native areas (rounded), at least 1000: the pull at step 0 stays near 0.015."),
        cosine_scale: float = Input(default=10.0, ge=0, le=50, description="How fast the reduced-resolution guidance fades over the steps, λ0·(½(1 + cos(πi/S)))^κ: higher releases it sooner."),
        rrg_stop_t: float = Input(default=0.4, ge=0, le=0.95, description="Fraction of the final steps that run without reduced-resolution guidance (0.4: the official demo's value)."),
        patch_size: Optional[int] = Input(default=None, ge=8, le=128, description="Width of each local window in latent pixels (its context is the rest of the native size): larger is faster but may hurt coherence. Leave blank for the preset: half the native latent size: 64 on SDXL, 32 on SD 1.x/2.x. At most the model's native latent size (128 on SDXL)."),
        repaint: bool = Input(default=True, description="Re-noise and redo each step with one reference pass and guidance ω/3 (part of the method; off only for ablations)."),
        tiled_decoder: bool = Input(default=False, description="Decode in blended overlapping tiles (diffusers' VAE tiling): less memory."),
        time_ids_scale: int = Input(default=4, choices=[1, 4], description="SDXL size conditioning: 4x the image size as the official code, or 1x as diffusers."),
        # End of the method knobs.
        output_format: str = Input(default="png", choices=["png", "webp"], description="File format. Both carry the prompt, seed, model and every setting: PNG in text chunks, WebP in EXIF."),
        output_quality: int = Input(default=90, ge=1, le=100, description="WebP quality: 100 writes lossless WebP. PNG is always lossless."),
    ) -> list[Path]:
        """Generate `num_outputs` images at width x height; their files, each with its settings in the metadata."""
        inputs = dict(locals())  # every input by name (cog passes them all)
        del inputs["self"]
        source, strength = inputs.pop("image"), inputs.pop("strength")
        call = check_request(inputs, self.sampler)
        if source is not None:
            call.update(image=read_image(source), strength=strength)
        elif strength is not None:
            raise ValueError("strength goes with image: give the picture to start from")
        return self.generate(self.sampler, call, output_format, output_quality)

    def generate(self, sampler, call: dict, output_format: str, quality: int, names: dict | None = None) -> list[Path]:
        """Generate `sampler(**call)` (a checked request) and write the files with the run's settings, and `names`
        on top, in their metadata.

        Nothing is written for a refused request. The previous prediction's files are removed first: cog has
        sent them by the time the next prediction starts, so the disk holds one prediction's files at most.
        """
        print(f"Using seed: {call['seed']}")
        try:
            images, info = sampler(**call)
        except torch.OutOfMemoryError as error:
            raise RuntimeError(f"Out of GPU memory at {call['width']}x{call['height']} with num_outputs="
                               f"{call['num_images_per_prompt']}: try fewer num_outputs, tiled_decoder=true or a "
                               "smaller width/height") from error
        info = dataclasses.replace(info, model=ed.public_name(info.model),  # no server path in the files
                                   settings={**info.settings, **(names or {})})
        settings = info.settings
        print("Settings: " + ", ".join(f"{k.name}={settings[k.name]}" for k in ed.method_knobs()))
        for entry in os.scandir(self.output_root):
            shutil.rmtree(entry.path, ignore_errors=True)
        folder = tempfile.mkdtemp(prefix="prediction_", dir=self.output_root)
        paths = []
        for index, image in enumerate(images):
            name = f"elastic_seed{call['seed']}_{call['width']}x{call['height']}_{index}.{output_format}"
            metadata = ed.png_metadata(info, call["prompt"], call["negative_prompt"], index)
            path = os.path.join(folder, name)
            if output_format == "png":
                ed.save_png(image, path, metadata)
            else:
                save_webp(image, path, metadata, quality)
            paths.append(Path(path))
        return paths
