"""Replicate / cog entry point of the ControlNet variant: ElasticDiffusion following an input image's edges or depth.

    cog predict -f cog-controlnet.yaml -i image=@imgs/input/astronaut.jpg -i prompt="A portrait photo of an astronaut"
    cog push -f cog-controlnet.yaml r8.im/<your-username>/elastic-diffusion-controlnet

A second entry rather than an option of `predict.py`, because a ControlNet is a second model: the text-to-image
entry loads the base model only, this one loads the base model, the Canny and the depth ControlNets of its family
(sharing the base model's modules: one copy of the UNet) and the depth estimator, all at setup (docs/replicate.md).
Environment variables: MODEL (as predict.py), CONTROLNET_CANNY and CONTROLNET_DEPTH (a hub id or a folder;
default: the family's ControlNet of `CONTROLNET_IDS`), DEPTH_MODEL (a transformers depth-estimation model).

The inputs are predict.py's, written out again because cog reads them from this file's text; tests/test_cog.py
checks that every input the two entries share is declared identically, and the knobs against their tables.
"""
import os
from typing import Optional

from cog import Input, Path

import elastic_diffusion as ed
import predict
from elastic_diffusion_w_controlnet import (
    CONTROLNET_KNOBS,
    DEFAULT_DEPTH_MODEL,
    ElasticDiffusionControlNet,
)

CONTROLNETS = ("canny", "depth")  # the `controlnet` input's choices: one ControlNet each, loaded at setup


class Predictor(predict.Predictor):
    """predict.py's predictor with an input image: one sampler per ControlNet, over one copy of the base model."""

    def load_sampler(self) -> ed.ElasticDiffusion:
        """The base sampler (returned) and, sharing its modules, a ControlNet sampler per condition."""
        base = super().load_sampler()
        self.controlnets = {
            kind: ElasticDiffusionControlNet.from_pipe(
                base.pipe, controlnet_model=os.environ.get(f"CONTROLNET_{kind.upper()}") or kind,
                depth_model=os.environ.get("DEPTH_MODEL") or DEFAULT_DEPTH_MODEL)
            for kind in CONTROLNETS}
        self.controlnets["depth"].depth_estimator()  # now, not in the first depth request
        return base

    def predict(
        self,
        image: Path = Input(description="The input image (any format and mode Pillow reads, at most 64 MP): scaled to cover width x height and centre-cropped."),
        prompt: str = Input(description="What the image shows."),
        controlnet: str = Input(default="canny", choices=["canny", "depth"], description="What the image follows: its edges (canny) or its depth (depth), each through its own ControlNet."),
        image_is_map: bool = Input(default=False, description="The image already is an edge map (canny) or a depth map (depth): use it as it is instead of extracting one."),
        # ControlNet knobs: rendered from elastic_diffusion_w_controlnet.CONTROLNET_KNOBS by `python tests/test_cog.py`.
        controlnet_conditioning_scale: float = Input(default=0.5, ge=0.1, le=2.0, description="How strictly the image follows the condition map: 0.5 leaves room for detail, 1 and above follow it closely, 0 ignores it."),
        canny_low: int = Input(default=100, ge=0, le=255, description="Canny low threshold: edges weaker than this are dropped; lower it to keep fainter edges (Canny edges only)."),
        canny_high: int = Input(default=200, ge=0, le=255, description="Canny high threshold: edges stronger than this are always kept; raise it to keep only strong edges (Canny edges only)."),
        # End of the ControlNet knobs.
        negative_prompt: str = Input(default="blurry, ugly, duplicate, no details, deformed", description="What the image should not show (an empty one is encoded too)."),
        width: int = Input(default=2048, ge=128, le=2048, description="Width in pixels: a multiple of 8, from 128 to twice the model's native size (2048 on SDXL)."),
        height: int = Input(default=1024, ge=128, le=2048, description="Height in pixels: a multiple of 8, from 128 to twice the model's native size (2048 on SDXL)."),
        seed: Optional[int] = Input(default=None, ge=0, le=4294967295, description="Random seed: the same seed and settings give the same images. Leave blank for a random one; the seed used is in the logs, the file names and the metadata."),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Images to generate, as one batch from the seed (the metadata's image_index tells them apart)."),
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
        """Generate `num_outputs` images following `image`; their files, each with its settings in the metadata."""
        inputs = dict(locals())  # every input by name (cog passes them all)
        del inputs["self"]
        kind = inputs.pop("controlnet")
        if kind not in CONTROLNETS:
            raise ValueError(f"controlnet must be canny or depth; got {kind!r}")
        sampler = self.controlnets[kind]
        source = inputs.pop("image")
        if source is None:
            raise ValueError("image is required: the picture whose edges or depth the result follows")
        control = {row.name: row.check(inputs.pop(row.name), sampler.native_latent, demo=True)
                   for row in CONTROLNET_KNOBS}
        condition = "image" if inputs.pop("image_is_map") else kind
        strength = inputs.pop("strength")
        call = dict(predict.check_request(inputs, sampler), condition=condition, **control)  # before decoding
        call["condition_image"] = predict.read_image(source)
        if strength is not None:  # the same picture is the start too
            call.update(image=call["condition_image"], strength=strength)
        names = dict(condition_image=os.path.basename(source),  # no server paths in the files
                     controlnet_model=ed.public_name(sampler.controlnet_model))
        return self.generate(sampler, call, inputs["output_format"], inputs["output_quality"], names)
