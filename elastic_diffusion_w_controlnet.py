"""ElasticDiffusion with a ControlNet: any supported size and aspect ratio, following an input image's structure.

A subclass of `ElasticDiffusion` that feeds a ControlNet's residuals to every UNet call through the base class's
extension point `unet_extra_kwargs` (docs/method.md#controlnet-variant; the official script's defects fixed:
docs/method.md#fix-controlnet-cli-model-choice, docs/method.md#fix-controlnet-offload-and-batch). Reference
samples get the condition map extracted at the reference size, local windows crops of the one extracted at full
resolution (see `prepare_condition` and `control_batch`). A run's condition lives in its `Run`
(`run.extras["control"]`, a `ControlInputs`). Its knobs (scale, Canny thresholds) are rows of the sampler's knobs
table type (`CONTROLNET_KNOBS`), which its CLI and the image-to-image demo read. More in docs/controlnet.md.

    pipe = ElasticDiffusionControlNet(sd_version="XL1.0", controlnet_model="canny")
    images, info = pipe("an astronaut", condition_image="imgs/input/astronaut.jpg", width=1536, height=1536)

Command line: ``python elastic_diffusion_w_controlnet.py --help``.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import elastic_diffusion as ed
from elastic_diffusion import ElasticDiffusion, Region, Run, fit_image, load_image, to_rgb

# Default ControlNets per condition and base-model family (docs/method.md#controlnet-variant); any other hub id or
# folder is accepted.
CONTROLNET_IDS = {
    "canny": {"sdxl": "diffusers/controlnet-canny-sdxl-1.0", "sd": "lllyasviel/sd-controlnet-canny"},
    "depth": {"sdxl": "diffusers/controlnet-depth-sdxl-1.0", "sd": "lllyasviel/sd-controlnet-depth"},
}
CONDITIONS = ("canny", "depth", "image", "none")  # 'image' and 'none': the input already is the condition map
CONTROL_ARGS = ("condition_image", "condition", "controlnet_conditioning_scale", "canny_low", "canny_high")
DEFAULT_DEPTH_MODEL = "Intel/dpt-large"  # transformers' default depth-estimation model, as the official code
DEFAULT_INPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imgs", "input", "astronaut.jpg")
DEFAULT_PROMPT = "A portrait photo of a smiling astronaut in an orange spacesuit, highly detailed, sharp"
DEMO_SCALE = 0.5  # the official demo's ControlNet scale: the CLI's and the demo's default (Python's is 1.0)
CONTROLNET_KNOBS = (
    ed.Knob("controlnet_conditioning_scale", float, 1.0, "how strictly the image follows the condition map: 0.5 "
            "leaves room for detail, 1 and above follow it closely, 0 ignores it", "ControlNet scale", minimum=0,
            demo_range=(0.1, 2.0), step=0.1),
    ed.Knob("canny_low", int, 100, "Canny low threshold: edges weaker than this are dropped; lower it to keep "
            "fainter edges (Canny edges only)", "Canny low threshold", minimum=0, demo_range=(0, 255)),
    ed.Knob("canny_high", int, 200, "Canny high threshold: edges stronger than this are always kept; raise it to "
            "keep only strong edges (Canny edges only)", "Canny high threshold", minimum=0, demo_range=(0, 255)),
)


def canny_condition(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges of an RGB PIL image (OpenCV, hysteresis thresholds low/high) as a 3-channel 0/255 image."""
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # (H, W) uint8 in {0, 255}
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, height, width) float in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def depth_condition(image: Image.Image, estimator) -> Image.Image:
    """Depth map of an RGB PIL image from a transformers depth-estimation pipeline, as RGB at the same size."""
    depth = estimator(image)["depth"]
    return to_rgb(depth if depth.size == image.size else depth.resize(image.size, Image.Resampling.BICUBIC))


def default_condition(controlnet_model: str) -> str:
    """The condition a ControlNet follows by default: 'canny' or 'depth' for the known ones, else 'image'."""
    known = {i: kind for kind, family in CONTROLNET_IDS.items() for i in family.values()}
    return {"canny": "canny", "depth": "depth", **known}.get(controlnet_model, "image")


@dataclass(eq=False)
class ControlInputs:
    """One call's ControlNet input as its run carries it (`run.extras["control"]`): the request (`control_request`),
    the image `check_control_request` reads, and the maps `prepare_condition` makes."""
    source: object  # condition_image: a file path or a PIL image
    condition: str  # 'canny', 'depth' or 'image'
    scale: float  # controlnet_conditioning_scale
    low: int  # canny_low
    high: int  # canny_high
    image: Image.Image | None = None  # the input image, RGB
    pil: Image.Image | None = None  # the condition map at the output size (`info.condition_image`)
    seconds: float = 0.0  # time spent making the maps
    full: torch.Tensor | None = None  # the map at the output size (1, 3, 8H, 8W) on the device
    reference: torch.Tensor | None = None  # the map at the reference size (1, 3, 8h, 8w) on the device


def control_request(condition_image, condition: str, scale: float, low: int, high: int) -> ControlInputs:
    """One call's ControlNet arguments as the run carries them (`run.extras["control"]`); 'none' means 'image'."""
    return ControlInputs(condition_image, "image" if condition == "none" else condition, scale, low, high)


def check_control_request(c: ControlInputs, read_image: bool = True) -> None:
    """ValueError unless a `control_request` is allowed; `read_image` also reads its input into c.image.

    Needs no model: a prompts file's lines are checked with it before one is loaded (batch.py).
    """
    if c.condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}; got {c.condition!r}")
    for row, value in zip(CONTROLNET_KNOBS, (c.scale, c.low, c.high)):
        row.check(value, 0)  # no bound depends on the model
    if c.low > c.high:
        raise ValueError(f"canny_low and canny_high must satisfy low <= high; got {c.low}, {c.high}")
    if c.source is None:
        raise ValueError("condition_image is required: an image file path or a PIL image")
    if read_image:
        c.image = load_image(c.source, "condition_image")


def control_settings(controlnet_model: str, c: ControlInputs) -> dict:
    """What a generation records of its ControlNet arguments (`info.settings`, the PNG metadata)."""
    source = os.fspath(c.source) if isinstance(c.source, (str, os.PathLike)) else "PIL image"
    canny = dict(canny_low=c.low, canny_high=c.high) if c.condition == "canny" else {}
    return dict(controlnet_model=controlnet_model, condition=c.condition, controlnet_conditioning_scale=c.scale,
                condition_image=source, **canny)


@dataclass
class ControlNetInfo(ed.GenerationInfo):
    """`GenerationInfo` plus the condition map the run followed and the ControlNet's own counts."""
    condition_image: Image.Image | None = None  # the condition map at the output size
    controlnet_calls: int = 0
    controlnet_samples: int = 0  # native-size latents through the ControlNet (as many as through the UNet)
    controlnet_reference_samples: int = 0
    controlnet_local_samples: int = 0

    def summary(self) -> str:
        """The ControlNet's part of the run in one markdown line (the image-to-image demo's summary shows it)."""
        s = self.settings
        canny = f" {s['canny_low']}/{s['canny_high']}" if s["condition"] == "canny" else ""
        return (f"ControlNet `{ed.public_name(s['controlnet_model'])}`: {s['condition']}{canny} map, scale "
                f"{s['controlnet_conditioning_scale']:g}, {self.controlnet_samples:,} ControlNet evaluations; map made "
                f"in {self.timings.get('condition', 0):.2f} s")


class ElasticDiffusionControlNet(ElasticDiffusion):
    """ElasticDiffusion whose every UNet call gets a ControlNet's residuals for that sample's region.

    Args (on top of `ElasticDiffusion`'s; `from_pipe(pipe, controlnet_model=pipe.controlnet)` reuses a pipeline):
        controlnet_model: 'canny' or 'depth' (the default ControlNet of the loaded model's family), any
            hub id or local diffusers folder, or a loaded `ControlNetModel`. It must fit the UNet.
        depth_model: transformers depth-estimation model id or folder for `condition='depth'` (loaded on first
            use, on the CPU in low-VRAM mode), or a ready callable such as a transformers pipeline.
    """

    info_class = ControlNetInfo

    def __init__(self, device=None, sd_version: str = "XL1.0", controlnet_model="canny",
                 depth_model=DEFAULT_DEPTH_MODEL, low_vram: bool = False, allow_pickle: bool = False, **kwargs):
        self.controlnet, self._controlnet_hook, self._controlnet_source = None, None, controlnet_model
        self.depth_model, self._depth_estimator, self._depth_lock = depth_model, None, threading.Lock()
        # The base constructor loads the pipeline, then `attach_models` loads the ControlNet, then the
        # memory mode is set once for both: in low-VRAM mode nothing is ever moved to the GPU whole.
        super().__init__(device=device, sd_version=sd_version, low_vram=low_vram, allow_pickle=allow_pickle, **kwargs)
        self.controlnet_model = (controlnet_model if isinstance(controlnet_model, str)
                                 else self.controlnet.config.get("_name_or_path") or type(controlnet_model).__name__)
        self.default_condition = default_condition(self.controlnet_model)

    def attach_models(self) -> None:
        if self.is_flow:
            raise ValueError(f"ControlNet: sd_version {self.sd_version!r} is an SD 3 model; the ControlNet extension "
                             "runs on SD 1.x, 2.x and XL models (their UNet)")
        self.controlnet = self.load_controlnet(self._controlnet_source, self.allow_pickle)

    def load_controlnet(self, model, allow_pickle: bool = False):
        """ControlNetModel from a condition name, hub id or folder (in the UNet's dtype), or a loaded one of it."""
        from diffusers import ControlNetModel

        if isinstance(model, str):
            source = os.path.expanduser(CONTROLNET_IDS.get(model, {}).get("sdxl" if self.is_sdxl else "sd", model))
            cached = not os.path.isdir(source) and ed.hub_offline_reason() is not None  # no network: the cache
            try:
                safetensors_only = None if allow_pickle else True
                model = ed.from_pretrained_variant(ControlNetModel.from_pretrained, source, self.dtype,
                                                   torch_dtype=self.dtype, use_safetensors=safetensors_only,
                                                   local_files_only=cached)
            except (OSError, ValueError) as error:
                raise ValueError(f"controlnet_model {model!r} ({source}) could not be loaded: {error}") from error
        elif model.dtype != self.dtype:  # a caller's model is used as it is, never converted
            raise ValueError(f"controlnet_model is {model.dtype} but the base model {self.dtype}: convert it first "
                             "(controlnet.to(dtype=...)) or pass a hub id or folder")
        as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON lists vs tuples)
        for key in ("block_out_channels", "cross_attention_dim", "addition_embed_type"):
            if as_list(model.config.get(key)) != as_list(self.unet.config.get(key)):
                raise ValueError(f"controlnet_model does not fit this base model: its {key} is "
                                 f"{model.config.get(key)}, the UNet's {self.unet.config.get(key)}")
        return model.eval()

    def place_modules(self, low_vram: bool) -> None:
        """The base memory mode, plus the ControlNet: offloaded with the UNet in low-VRAM mode
        (docs/method.md#fix-controlnet-offload-and-batch)."""
        import accelerate

        super().place_modules(low_vram)
        accelerate.hooks.remove_hook_from_module(self.controlnet, recurse=True)
        self._controlnet_hook = None
        if low_vram:  # on the GPU from its first call to the end of the run's denoising (see `decode`)
            _, self._controlnet_hook = accelerate.cpu_offload_with_hook(self.controlnet.to("cpu"), self.device)
        else:
            self.controlnet.to(self.device)
        if not callable(self.depth_model):  # made again on first use, on the device this mode wants
            with self._depth_lock:
                self._depth_estimator = None

    def offload_controlnet(self) -> None:
        """Low-VRAM mode: move the ControlNet back to the CPU."""
        if self._controlnet_hook is not None:
            self._controlnet_hook.offload()

    def depth_estimator(self):
        """The depth-estimation pipeline of `depth_model`, created on first use (once, whatever the threads)."""
        with self._depth_lock:
            if self._depth_estimator is None:
                from huggingface_hub import snapshot_download
                from transformers import pipeline
                model = self.depth_model
                try:
                    if isinstance(model, str) and not os.path.isdir(os.path.expanduser(model)) \
                            and ed.hub_offline_reason() is not None:  # no network: the cache now, not retries
                        model = snapshot_download(model, local_files_only=True)
                    self._depth_estimator = model if callable(model) else pipeline(
                        "depth-estimation", model=model, device="cpu" if self.low_vram else self.device)
                except (OSError, ValueError) as error:
                    raise ValueError(f"depth_model {self.depth_model!r} could not be loaded: {error}") from error
            return self._depth_estimator

    def check_control(self, c: ControlInputs) -> None:
        """Validate the ControlNet arguments of one call and read its input image into c.image.

        Works on the call's own `ControlInputs`, which the run then carries (`run.extras["control"]`), so the
        base `check_inputs` stays free of per-call state and callable from anywhere.
        """
        check_control_request(c)
        if c.condition == "depth":
            self.depth_estimator()  # a bad depth_model fails here, before any sampling

    def condition_map(self, c: ControlInputs, width: int, height: int) -> Image.Image:
        """The condition map of the call's input at width x height pixels: fitted, then extracted at that size."""
        image = fit_image(c.image, width, height)
        if c.condition == "canny":
            return canny_condition(image, c.low, c.high)
        if c.condition == "depth":
            return depth_condition(image, self.depth_estimator())
        return image

    def prepare_condition(self, run: Run) -> None:
        """The run's condition maps: at the full output size (8H x 8W px) and at the reference size (8h x 8w px).

        Each is extracted at its own size, so a Canny map stays crisp 0/255 edges at both (an area
        downscale of the full map would be grey and soft, unlike what the ControlNet was trained on).
        A depth map is estimated once, at full size, and area-downscaled: depth is smooth, and that
        saves a second estimate. At ratio 1 both are the same map.
        """
        c, f, tic = run.extras["control"], self.vae_scale_factor, time.perf_counter()
        (H, W), (h, w) = run.layout.latent_size, run.layout.reference_size
        image = self.condition_map(c, W * f, H * f)
        full = to_tensor(image)  # (1, 3, 8H, 8W)
        if (h, w) == (H, W):
            reference = full
        elif c.condition == "depth":
            reference = F.interpolate(full, size=(h * f, w * f), mode="area")  # (1, 3, 8h, 8w), no aliasing
        else:
            reference = to_tensor(self.condition_map(c, w * f, h * f))
        c.pil, c.full, c.reference = image, full.to(self.device, self.dtype), reference.to(self.device, self.dtype)
        c.seconds = time.perf_counter() - tic

    def control_batch(self, run: Run, regions: list[Region]) -> torch.Tensor:
        """Condition of each sample, zero-padded like its latent: (N, 3, 8D, 8D) in [0, 1]."""
        c, f = run.extras["control"], self.vae_scale_factor
        maps = []
        for region in regions:
            (r0, r1), (c0, c1) = region.rows, region.cols
            if region.kind == "reference":
                source = c.reference
                assert source.shape[-2:] == ((r1 - r0) * f, (c1 - c0) * f), "reference size mismatch"
            else:  # "local": a crop of the full-resolution map, not of an upsampled reduced one
                assert region.kind == "local", f"no ControlNet condition for region kind {region.kind!r}"
                source = c.full[:, :, r0 * f:r1 * f, c0 * f:c1 * f]
            top, bottom, left, right = (p * f for p in region.padding)
            maps.append(F.pad(source, (left, right, top, bottom)))
        return torch.cat(maps)

    def unet_extra_kwargs(self, run, latents, t, prompt_embeds, added_cond_kwargs, regions) -> dict:
        """The ControlNet's residuals for this UNet call: the UNet's own inputs plus each sample's condition."""
        down, mid = self.controlnet(latents, t, encoder_hidden_states=prompt_embeds,
                                    controlnet_cond=self.control_batch(run, regions),
                                    conditioning_scale=float(run.extras["control"].scale), guess_mode=False,
                                    added_cond_kwargs=added_cond_kwargs, return_dict=False)
        count = run.counters
        count["controlnet_calls"] = count.get("controlnet_calls", 0) + 1
        for key in [f"controlnet_{r.kind}_samples" for r in regions] + ["controlnet_samples"] * len(regions):
            count[key] = count.get(key, 0) + 1
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def prepare(self, run: Run) -> None:
        """The base per-run preparation, plus the condition maps for this size."""
        super().prepare(run)
        run.stage("condition", 0, 1)
        self.prepare_condition(run)

    def finish_run(self, run: Run) -> None:
        super().finish_run(run)
        c = run.extras["control"]  # its device tensors go; the PIL map stays for `info`
        c.full, c.reference = None, None
        self.offload_controlnet()  # low-VRAM: the ControlNet is not needed until the next run

    def decode(self, *args, **kwargs):
        self.offload_controlnet()  # low-VRAM: free the GPU for the VAE
        return super().decode(*args, **kwargs)

    def generate(self, prompt, negative_prompt="", height=None, width=None, *args, condition_image=None,
                 condition: str | None = None, controlnet_conditioning_scale: float = CONTROLNET_KNOBS[0].default,
                 canny_low: int = CONTROLNET_KNOBS[1].default, canny_high: int = CONTROLNET_KNOBS[2].default,
                 **kwargs):
        """`ElasticDiffusion.generate` plus the ControlNet input; returns (images, info).

        condition_image: file path or PIL image (any mode, EXIF orientation applied, at most 64 MP); it is scaled
        to cover the output size and centre-cropped (nothing stretched or letterboxed). condition: 'canny',
        'depth', or 'image'/'none' for a ready-made edge or depth map (default: the ControlNet's type, 'image'
        for custom ids); it is extracted once, at the output size. `info.condition_image` is that map (PIL).
        """
        control = control_request(condition_image, condition or self.default_condition,
                                  controlnet_conditioning_scale, canny_low, canny_high)
        self.check_control(control)
        images, info = super().generate(prompt, negative_prompt, height, width, *args, extras={"control": control},
                                        **kwargs)
        info.settings.update(control_settings(self.controlnet_model, control))
        info.condition_image, info.timings["condition"] = control.pil, control.seconds
        return images, info


def build_parser() -> argparse.ArgumentParser:
    """The base sampler's flags (1536 x 1536 by default here) plus the ControlNet's."""
    p = ed.build_parser()
    p.description = ("ElasticDiffusion with a ControlNet: any size and aspect ratio, following an input image's "
                     "edges or depth. The input is scaled to cover the output size and centre-cropped.")
    p.set_defaults(prompt=DEFAULT_PROMPT, default_px=1536)
    g = p.add_argument_group("ControlNet")
    g.add_argument("--condition_image", default=DEFAULT_INPUT, help="input image (any mode, at most 64 MP)")
    g.add_argument("--condition", choices=CONDITIONS, default=None,
                   help="canny edges, depth map, or image/none when the input already is an edge or depth map "
                        "(default: the ControlNet's type; image for custom ids)")
    g.add_argument("--controlnet_model", default="canny",
                   help="canny or depth (the default ControlNet of the model's family), a hub id or a local folder")
    for row in CONTROLNET_KNOBS:  # the scale defaults to the official demo's 0.5 here (Python's: 1.0)
        default = DEMO_SCALE if row.name == "controlnet_conditioning_scale" else row.default
        g.add_argument(f"--{row.name}", type=row.type, default=default, help=row.help)
    g.add_argument("--depth_model", default=DEFAULT_DEPTH_MODEL, help="transformers depth-estimation model id/folder")
    g.add_argument("--save_condition", action=argparse.BooleanOptionalAction, default=True,
                   help="also save the condition map next to the images")
    return p


def main(argv=None) -> list[str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    make = lambda: ElasticDiffusionControlNet(controlnet_model=args.controlnet_model,  # noqa: E731
                                              depth_model=args.depth_model, **ed.sampler_kwargs(args))
    extra = (lambda info: [("condition", info.condition_image)]) if args.save_condition else None
    request = lambda: control_request(args.condition_image, args.condition or default_condition(  # noqa: E731
        args.controlnet_model), args.controlnet_conditioning_scale, args.canny_low, args.canny_high)
    return ed.run_cli(parser, args, make, {name: getattr(args, name) for name in CONTROL_ARGS}, extra,
                      check_call=lambda: check_control_request(request(), True))


if __name__ == "__main__":
    sys.modules["elastic_diffusion_w_controlnet"] = sys.modules[__name__]  # batch.py imports this copy, not another
    main()
