#!/usr/bin/env python
"""Speed and memory benchmark of the ElasticDiffusion sampler on the real model architectures.

The models are the published SDXL, SD 1.5 and SD 3.5 Medium architectures
(docs/method.md#benchmark-architectures) with random weights: nothing is downloaded, and timing
does not depend on weight values. Each preset
run is compared with the *UNet floor* measured in the same process: the number of native-size UNet
samples the run needs (`elastic_diffusion.unet_cost`, docs/method.md#cost-model) times the best
per-sample time of the bare UNet at a saturated batch.
The ratio wall / floor says how much the sampler costs on top of the UNet work it cannot avoid.

Modes:

* ``gpu`` (default when CUDA is available): real architectures built directly on the GPU in the
  target dtype, real sizes, T = 50.
* ``tiny`` (CPU, used in CI): the tiny random pipelines of ``tests/tiny_models.py``, T = 2. A
  liveness check of this script and of the counts; its times mean nothing.
* ``meta``: build the real architectures on the meta device (no memory), check their parameter
  counts against docs/method.md#benchmark-architectures and exit.

    python benchmarks/benchmark.py --mode gpu --model sdxl --presets 1,3 --json benchmarks/out/sdxl.json

Output: a JSON file (``--json``) with every number, and a markdown table printed last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach the hub

import torch  # noqa: E402

import elastic_diffusion as ed  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
DEFAULT_PRESETS = (1, 3)  # 2048x2048 and 1024x2048: the largest preset and a padded one
DEFAULT_FLOOR_BATCHES = (2, 8, 16, 24, 32)
TINY_FLOOR_BATCHES = (2, 8, 16)

# --------------------------------------------------------------------------------------------------
# Real architectures (docs/method.md#benchmark-architectures)
# --------------------------------------------------------------------------------------------------

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' legacy name: heads per block
    cross_attention_dim=2048,
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 * 256 time ids
    use_linear_projection=True,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    mid_block_type="UNetMidBlock2DCrossAttn",
    layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
)


# SD 3.5 Medium's MMDiT-X (stabilityai/stable-diffusion-3.5-medium, transformer/config.json).
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)


def vae_config(model: str) -> dict:
    sdxl, sd3 = model == "sdxl", model == "sd35m"
    return dict(
        in_channels=3, out_channels=3, latent_channels=16 if sd3 else 4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        act_fn="silu", norm_num_groups=32,
        sample_size=512 if model == "sd15" else 1024,
        scaling_factor=1.5305 if sd3 else 0.13025 if sdxl else 0.18215,
        **(dict(shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False) if sd3 else
           dict(force_upcast=sdxl)),
    )


def clip_config(kind: str):
    """ViT-L/14 text tower ("L", SD 1.x and SDXL encoder 1) or OpenCLIP bigG ("bigG", SDXL encoder 2)."""
    from transformers import CLIPTextConfig

    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  layer_norm_eps=1e-5)
    if kind == "L":
        return CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              intermediate_size=3072, hidden_act="quick_gelu", projection_dim=768,
                              pad_token_id=49407, **common)
    return CLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                          hidden_act="gelu", projection_dim=1280, pad_token_id=0, **common)


# Parameter counts of docs/method.md#benchmark-architectures, in millions, to one decimal.
EXPECTED_PARAMS_M = {
    "sdxl": {"unet": 2567.5, "vae": 83.7, "text_encoder": 123.1, "text_encoder_2": 694.7},
    "sd15": {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1},
    # From the hub config (Stability rounds the transformer to "2.5B"); CLIP-L here with its projection.
    "sd35m": {"transformer": 2243.2, "vae": 83.8, "text_encoder": 123.7, "text_encoder_2": 694.7},
}


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def build_empty_components(model: str, meta_buffers: bool = False) -> dict:
    """The networks of `model` with parameters on the meta device (no memory, well under a second).

    Buffers (CLIP's position ids, SD 3's 384 x 384 positional table: 10 s to compute) stay real on the CPU, for
    `materialize`; `meta_buffers` puts them on the meta device too (enough to count parameters).
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if model not in EXPECTED_PARAMS_M:
        raise ValueError(f"model must be one of {sorted(EXPECTED_PARAMS_M)}; got {model!r}")
    with init_empty_weights(include_buffers=meta_buffers), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model == "sd35m":
            return {"transformer": SD3Transformer2DModel(**SD35M_TRANSFORMER),
                    "vae": AutoencoderKL(**vae_config(model)),
                    "text_encoder": CLIPTextModelWithProjection(clip_config("L")),
                    "text_encoder_2": CLIPTextModelWithProjection(clip_config("bigG"))}
        parts = {
            "unet": UNet2DConditionModel(**(SDXL_UNET if model == "sdxl" else SD15_UNET)),
            "vae": AutoencoderKL(**vae_config(model)),
            "text_encoder": CLIPTextModel(clip_config("L")),
        }
        if model == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(clip_config("bigG"))
    return parts


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_param_counts(model: str, parts: dict) -> dict:
    """Parameter counts in millions; AssertionError when one is off the published table (a config typo)."""
    counts = {name: count_params(module) / 1e6 for name, module in parts.items()}
    for name, expected in EXPECTED_PARAMS_M[model].items():
        got = counts[name]
        assert abs(got - expected) < 0.06, (
            f"{model} {name}: {got:.3f} M parameters, the published architecture has {expected} M: check the config")
    return counts


@torch.no_grad()
def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator) -> torch.nn.Module:
    """Allocate meta parameters directly on `device` in `dtype` and fill them with small random normals.

    Matrices and convolutions get std 1/sqrt(fan_in) (activations stay in range in half precision),
    norm weights 1 + noise, everything else N(0, 0.02). Never all-zero weights: kernels may shortcut.
    """
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            data = torch.empty(param.shape, device=device, dtype=dtype)
            if isinstance(sub, norms):
                data.normal_(1.0 if name == "weight" else 0.0, 0.02, generator=generator)
            elif param.dim() >= 2:
                data.normal_(0.0, math.prod(param.shape[1:]) ** -0.5, generator=generator)
            else:
                data.normal_(0.0, 0.02, generator=generator)
            sub._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    return module.to(device).eval().requires_grad_(False)  # buffers (CLIP position ids) follow


def build_real_pipeline(model: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A diffusers pipeline of the real `model` architecture with random weights, built on `device`.

    Returns (pipeline, parameter counts in millions).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline, \
        StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    parts = build_empty_components(model)
    counts = check_param_counts(model, parts)
    generator = torch.Generator(device).manual_seed(seed)
    parts = {name: materialize(module, device, dtype, generator) for name, module in parts.items()}
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(FIXTURES, "clip_tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(FIXTURES, "clip_tokenizer_pad0"))
    if model == "sdxl":
        pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=ddim_scheduler(),
                                         **parts)
    elif model == "sd35m":  # without the optional T5 encoder, as the sampler loads it by default
        pipe = StableDiffusion3Pipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, text_encoder_3=None,
                                        tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **parts)
    else:
        pipe = StableDiffusionPipeline(tokenizer=tokenizer, scheduler=ddim_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False, **parts)
    return pipe, counts


def build_controlnet(unet, device: torch.device, dtype: torch.dtype, seed: int = 1):
    """A ControlNet of `unet`'s architecture (diffusers' `from_unet` config) with random weights on `device`.

    Built on the meta device and filled like the other models (no random zero convolutions: the
    residuals are not zero, as with trained weights).
    """
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    return materialize(controlnet, device, dtype, torch.Generator(device).manual_seed(seed))


def build_tiny(model: str):
    from tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline({"sdxl": "sdxl", "sd35m": "sd3"}.get(model, "sd1"))
    return pipe, {name: count_params(getattr(pipe, name)) / 1e6 for name in EXPECTED_PARAMS_M[model]}


# --------------------------------------------------------------------------------------------------
# Expected cost: the sampler's own cost model (docs/method.md#cost-model)
# --------------------------------------------------------------------------------------------------


def denoiser(pipe):
    """The network every sample goes through: the UNet, or SD 3's transformer."""
    return getattr(pipe, "transformer", None) or pipe.unet


def expected_cost(height: int, width: int, native: int, patch: int, R: int, T: int, B: int, v: int,
                  repaint: bool = True, flow: bool = False) -> dict:
    """UNet samples and calls of one generation by `elastic_diffusion.unet_cost`, for the JSON report."""
    settings = dict(num_inference_steps=T, resampling_steps=R, patch_size=patch, repaint=repaint)
    cost = ed.unet_cost(width, height, settings, native, batch=B, view_batch_size=v, flow=flow)
    return dict(V=cost.views, samples_per_main_pass=cost.samples_per_main_pass,
                samples_per_repaint_pass=cost.samples_per_repaint_pass, samples=cost.samples, calls=cost.calls,
                vae_encodes=cost.vae_encodes, plain_cfg_samples=2 * B * T)


def call_sizes(samples: int, v: int) -> list[int]:
    """Sizes of the balanced UNet calls of one pass of `samples` samples at most `v` per call (38 at 16: 13, 13, 12)."""
    if samples <= 0:
        return []
    calls = -(-samples // v)
    size = -(-samples // calls)
    return [min(size, samples - start) for start in range(0, samples, size)]


def planned_batch_sizes(expected: dict, steps: int, v: int) -> dict[int, int]:
    """Call size -> number of calls over a whole run, from `expected_cost`'s samples per pass.

    What the sampler reports as `unet_batch_sizes`; known before the run, so the floor can time
    these sizes up front (also for a view batch size that is not run).
    """
    sizes = {}
    for samples, passes in ((expected["samples_per_main_pass"], steps),
                            (expected["samples_per_repaint_pass"], steps - 1)):
        for size in call_sizes(samples, v):
            sizes[size] = sizes.get(size, 0) + passes
    return {size: count for size, count in sorted(sizes.items()) if count}


def preset_request(index: int, native_px: int, latent_channels: int = 4) -> dict:
    """Demo preset `index` (1-based), sizes scaled to the model (SD 1.5: half the SDXL sizes), the RRG weight to its
    latent channels (SD 3: 16, `recommended_settings`)."""
    if not 1 <= index <= len(ed.DEMO_PRESETS):
        raise ValueError(f"presets are numbered 1..{len(ed.DEMO_PRESETS)}; got {index}")
    preset = ed.DEMO_PRESETS[index - 1]
    scale = native_px / 1024
    return dict(
        prompt=preset["prompt"],
        width=int(preset["width"] * scale) // 8 * 8,
        height=int(preset["height"] * scale) // 8 * 8,
        resampling_steps=preset["resampling_steps"],
        new_p=preset["new_p"],
        rrg_init_weight=preset["rrg_init_weight"] * scale * scale * latent_channels / 4,  # same pull per value
    )


# The official implementation on an H200 (SDXL, fp32 weights under fp16 autocast, v = 16), as measured by the
# authors of this project's method reference, not by this project: context for a GPU run, never a result.
REFERENCE_SDXL = {
    (2048, 2048): dict(wall_s=95.9, unet_calls=698, vae_encodes=0, peak_gib=32.1),
    (1024, 2048): dict(wall_s=68.6, unet_calls=548, vae_encodes=898, peak_gib=22.6),
}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def unet_inputs(unet, n: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Inputs of the right shapes for n native-size samples (SDXL: (n, 77, 2048) + added cond; SD 3: 77 + 256 text
    tokens of 4096 and pooled 2048)."""
    config = unet.config
    D, gen = int(config.sample_size), torch.Generator(device).manual_seed(1)
    if "joint_attention_dim" in config:  # SD 3's transformer, as the sampler calls it (`FlowModel`)
        return dict(hidden_states=torch.randn(n, config.in_channels, D, D, generator=gen, device=device, dtype=dtype),
                    timestep=torch.tensor(500.0, device=device).expand(n),
                    encoder_hidden_states=torch.randn(n, 333, config.joint_attention_dim, generator=gen, device=device,
                                                      dtype=dtype),
                    pooled_projections=torch.randn(n, config.pooled_projection_dim, generator=gen, device=device,
                                                   dtype=dtype))
    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs = dict(
        sample=torch.randn(n, config.in_channels, D, D, generator=gen, device=device, dtype=dtype),
        timestep=torch.tensor(500, device=device),  # a 0-d tensor on the device, as the sampler passes it
        encoder_hidden_states=torch.randn(n, 77, cross, generator=gen, device=device, dtype=dtype),
    )
    if config.get("addition_embed_type") == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        size = 8 * 8 * D  # 4x the native pixel size, as the sampler's default conditioning
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(n, pooled, generator=gen, device=device, dtype=dtype),
            # contiguous, as the sampler passes them: a stride-0 expand would make a compiled UNet recompile
            time_ids=torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype).expand(n, -1).contiguous())
    return inputs


@torch.no_grad()  # not inference_mode: its tensors would make a compiled UNet recompile
def time_unet(unet, batch: int, device: torch.device, dtype: torch.dtype, iters: int, warmup: int) -> float:
    """Seconds per call of `unet` on `batch` native-size samples (CUDA events on a GPU).

    The inputs look like the sampler's (batch dimension marked dynamic, timestep a device tensor), so
    a UNet the sampler compiled is timed without compiling again.
    """
    inputs = unet_inputs(unet, batch, device, dtype)
    if batch > 1:
        added = inputs.get("added_cond_kwargs", {})
        for name, tensor in (*inputs.items(), *added.items()):
            if torch.is_tensor(tensor) and name != "timestep":
                torch._dynamo.mark_dynamic(tensor, 0)
    positional = [inputs.pop("sample"), inputs.pop("timestep")] if "sample" in inputs else []

    def call():  # the UNet positional (sample, t), the transformer by keyword, as the sampler calls each
        unet(*positional, **inputs)

    for _ in range(warmup):
        call()
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    tic = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - tic) / iters


def per_sample_costs(unet, batches, device, dtype, iters: int, warmup: int, known: dict | None = None,
                     label: str = "UNet alone") -> dict:
    """Seconds per sample of `unet` at each batch size (None: out of memory); sizes in `known` are not re-timed.

    `known` maps batch size -> seconds per sample and is updated in place (one cache per UNet).
    """
    known = {} if known is None else known
    for batch in batches:
        if batch in known:
            continue
        try:
            known[batch] = time_unet(unet, batch, device, dtype, iters, warmup) / batch
        except torch.OutOfMemoryError:
            known[batch] = None
            torch.cuda.empty_cache()
        shown = "OOM" if known[batch] is None else f"{1000 * known[batch]:.2f} ms/sample"
        print(f"  {label}, batch {batch:3d}: {shown}", flush=True)
    return {batch: known[batch] for batch in batches}


def measure_floor(unet, batches, device, dtype, iters: int, warmup: int, known: dict | None = None) -> dict:
    """Per-sample UNet time at each batch size; the best one is the floor's per-sample cost."""
    per_sample = per_sample_costs(unet, batches, device, dtype, iters, warmup, known)
    measured = {b: s for b, s in per_sample.items() if s is not None}
    if not measured:
        raise RuntimeError("the UNet floor could not be measured at any batch size (out of memory)")
    best = min(measured, key=measured.get)
    return dict(per_sample_s={str(b): s for b, s in per_sample.items()}, best_batch=best,
                best_per_sample_s=measured[best])


# --------------------------------------------------------------------------------------------------
# One preset
# --------------------------------------------------------------------------------------------------


def generate(sampler, request: dict, steps: int, batch: int, patch: int, seed: int, **image_kwargs):
    kwargs = dict(request, **image_kwargs)
    prompt = kwargs.pop("prompt")
    synchronize(sampler.device)
    tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: NaN pixels cast to uint8
        images, info = sampler(prompt, ed.PRESET_NEGATIVE_PROMPT, num_inference_steps=steps, guidance_scale=10.0,
                               cosine_scale=10.0, rrg_stop_t=0.4, patch_size=patch, repaint=True,
                               tiled_decoder=False, seed=seed, num_images_per_prompt=batch, progress=False,
                               output_type="pil", **kwargs)
    synchronize(sampler.device)
    return images, info, time.perf_counter() - tic


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (dynamo's counter; 0 without dynamo)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - every supported torch has dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def calls_floor(batch_sizes: dict, per_sample: dict) -> float | None:
    """UNet seconds of exactly the calls a run made: sum over sizes of calls x size x per-sample cost at that size.

    `batch_sizes` maps call size -> number of calls (the sampler's `unet_batch_sizes`). None when a
    size has no measured cost (out of memory, or not timed).
    """
    if any(per_sample.get(size) is None for size in batch_sizes):
        return None
    return sum(count * size * per_sample[size] for size, count in batch_sizes.items())


def run_upscale(sampler, request: dict, args, patch: int, text_info, text_wall: float) -> dict:
    """The 2x upscale to the preset's size (docs/method.md#image-to-image): a half-size picture, its image-to-image
    run at `args.upscale_strength`, its UNet samples against the cost model and beside text-to-image's."""
    import numpy as np

    width, height, strength = request["width"], request["height"], args.upscale_strength
    picture = np.random.default_rng(args.seed).integers(0, 256, (height // 2, width // 2, 3), dtype=np.uint8)
    _, info, wall = generate(sampler, request, args.steps, args.batch, patch, args.seed, image=picture,
                             strength=strength)
    expected = ed.unet_cost(width, height, info.settings, sampler.native_latent, args.batch, args.view_batch_size,
                            sampler.vae_scale_factor, strength, sampler.is_flow).samples
    print(f"  2x upscale from {width // 2}x{height // 2} at strength {strength}: samples {info.unet_samples} "
          f"(expected {expected}; text-to-image {text_info.unet_samples}), wall {wall:.2f} s "
          f"(text-to-image {text_wall:.2f} s)", flush=True)
    return dict(strength=strength, from_size=[width // 2, height // 2], unet_samples=info.unet_samples,
                expected_samples=expected, samples_match=info.unet_samples == expected, wall_s=wall,
                timings=info.timings, text_unet_samples=text_info.unet_samples, text_wall_s=text_wall,
                wall_vs_text=wall / text_wall if text_wall else None)


def run_preset(sampler, index: int, args, floor: dict, compiled_per_sample: float | None,
               costs: dict | None = None) -> dict:
    """One timed generation of demo preset `index` (after an optional short warm-up run), with its floors.

    `costs` (batch size -> seconds per sample) is the per-sample cost cache of the UNet this sampler
    calls; the sizes the run used that are not in it are timed after the run (not in low-VRAM mode,
    where timing the bare UNet would move it), giving `calls_floor_s`: the UNet time of exactly the
    calls made, at the batch sizes actually used.
    """
    D = sampler.native_latent
    patch = args.patch_size or D // 2
    request = preset_request(index, sampler.native_px, sampler.latent_channels)
    width, height, R = request["width"], request["height"], request["resampling_steps"]
    expected = expected_cost(height, width, D, patch, R, args.steps, args.batch, args.view_batch_size,
                             flow=sampler.is_flow)
    print(f"preset {index}: {width}x{height}, R={R}, T={args.steps}, V={expected['V']}, "
          f"v={args.view_batch_size}{', low_vram' if sampler.low_vram else ''}"
          f"{', compiled' if sampler.compiled else ''}", flush=True)
    warm_s = warm_graphs = None
    if args.warmup:
        graphs = compiled_graphs()
        warm_steps = min(args.warmup_steps, args.steps)
        _, _, warm_s = generate(sampler, request, warm_steps, args.batch, patch, args.seed)
        warm_graphs = compiled_graphs() - graphs
        print(f"  warm-up (T={warm_steps}): {warm_s:.2f} s"
              + (f", {warm_graphs} graph(s) compiled" if sampler.compiled else ""), flush=True)
    if sampler.device.type == "cuda":
        torch.cuda.empty_cache()  # the reserved peak below is this run's, not the allocator's leftovers
    graphs = compiled_graphs()
    _, info, wall = generate(sampler, request, args.steps, args.batch, patch, args.seed)
    timed_graphs = compiled_graphs() - graphs
    reserved = (torch.cuda.max_memory_reserved(sampler.device) / 2 ** 30
                if sampler.device.type == "cuda" else None)  # generate reset the peak at its start

    batch_sizes = {int(size): count for size, count in sorted(info.unet_batch_sizes.items())}
    graphs = compiled_graphs()
    if costs is not None and not sampler.low_vram:
        per_sample_costs(sampler.unet, sorted(batch_sizes), sampler.device, sampler.dtype, args.floor_iters,
                         warmup=1, known=costs, label="  compiled UNet" if sampler.compiled else "  UNet alone")
    timing_graphs = compiled_graphs() - graphs  # time_unet calls the UNet as the sampler does: must be 0
    used = {size: (costs or {}).get(size) for size in batch_sizes}
    used_floor = calls_floor(batch_sizes, used)

    per_sample = floor["best_per_sample_s"]
    floor_s = info.unet_samples * per_sample
    result = dict(
        model=args.model, preset=index, width=width, height=height, resampling_steps=R, new_p=request["new_p"],
        rrg_init_weight=request["rrg_init_weight"], steps=args.steps, batch=args.batch, patch_size=patch,
        view_batch_size=args.view_batch_size, low_vram=bool(sampler.low_vram), compiled=bool(sampler.compiled),
        num_views=info.num_views, reference_size=list(info.reference_size),
        unet_samples=info.unet_samples, unet_calls=info.unet_calls, vae_encodes=info.vae_encodes,
        unet_batch_sizes={str(size): count for size, count in batch_sizes.items()},
        expected=expected,
        samples_match=info.unet_samples == expected["samples"],
        calls_match=info.unet_calls == expected["calls"],
        views_match=info.num_views == expected["V"],
        encodes_match=info.vae_encodes == expected["vae_encodes"],
        warmup_s=warm_s, warmup_graphs_compiled=warm_graphs if sampler.compiled else None,
        graphs_compiled_in_timed_run=timed_graphs if sampler.compiled else None,
        graphs_compiled_timing_the_unet=timing_graphs if sampler.compiled else None,
        wall_s=wall, timings=info.timings, decode_s=info.timings.get("decode"),
        peak_memory_gib=info.peak_memory_gib, peak_reserved_gib=reserved,
        floor_s=floor_s, ratio=wall / floor_s if floor_s else None,
        denoise_ratio=info.timings["denoise"] / floor_s if floor_s else None,
        per_sample_at_used_batches_s={str(size): cost for size, cost in used.items()},
        calls_floor_s=used_floor, ratio_to_calls_floor=wall / used_floor if used_floor else None,
        plain_cfg_samples=expected["plain_cfg_samples"],
        plain_cfg_floor_s=expected["plain_cfg_samples"] * per_sample,
    )
    two_b = str(2 * args.batch)
    if floor["per_sample_s"].get(two_b) is not None:  # plain CFG runs batch-2B calls
        result["plain_cfg_est_s"] = expected["plain_cfg_samples"] * floor["per_sample_s"][two_b]
    if compiled_per_sample is not None:
        result.update(compiled_per_sample_s=compiled_per_sample,
                      compiled_floor_s=info.unet_samples * compiled_per_sample,
                      ratio_compiled=wall / (info.unet_samples * compiled_per_sample))
    reference = REFERENCE_SDXL.get((width, height)) if args.model == "sdxl" else None
    if reference and args.steps == 50 and args.batch == 1 and args.mode == "gpu":
        result["reference_h200"] = reference
    if args.upscale_strength is not None:
        result["upscale"] = run_upscale(sampler, request, args, patch, info, wall)
    shown_used = ", ".join(f"{size}: {'-' if cost is None else f'{1000 * cost:.2f}'}" for size, cost in used.items())
    print(f"  samples {info.unet_samples} (expected {expected['samples']}), calls {info.unet_calls} "
          f"(expected {expected['calls']}), VAE encodes {info.vae_encodes}, wall {wall:.2f} s, "
          f"floor {floor_s:.2f} s, ratio {result['ratio']:.2f}, decode {result['decode_s']:.3f} s", flush=True)
    print(f"  batch sizes {batch_sizes}, ms/sample at them {{{shown_used}}}, calls floor "
          f"{'-' if used_floor is None else f'{used_floor:.2f} s'}", flush=True)
    if compiled_per_sample is not None:
        print(f"  compiled floor {result['compiled_floor_s']:.2f} s, ratio {result['ratio_compiled']:.2f}, "
              f"graphs compiled in the timed run: {timed_graphs}", flush=True)
    return result


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["gpu", "tiny", "meta"], default=None,
                   help="gpu: real architectures (default with CUDA); tiny: tiny CPU models (CI); "
                        "meta: only check the real architectures' parameter counts")
    p.add_argument("--model", choices=sorted(EXPECTED_PARAMS_M), default="sdxl",
                   help="sd35m: SD 3.5 Medium's transformer (without T5)")
    p.add_argument("--presets", default=",".join(map(str, DEFAULT_PRESETS)),
                   help="1-based indexes into DEMO_PRESETS (SD 1.5: sizes halved)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps T (default 50 gpu, 2 tiny)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt B")
    p.add_argument("--view_batch_size", type=int, default=16, help="most UNet samples per call v")
    p.add_argument("--patch_size", type=int, default=None, help="local window (default native latent / 2)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="bfloat16",
                   help="weight dtype in gpu mode (tiny mode is float32)")
    p.add_argument("--device", default=None, help="override the device (default cuda in gpu mode, cpu in tiny)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (sampler's compile_unet)")
    p.add_argument("--low_vram", action="store_true", help="sampler's low_vram (model CPU offload)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="run each preset once with a few steps before the timed run (compiles under --compile)")
    p.add_argument("--warmup_steps", type=int, default=None,
                   help="steps of the warm-up run (default 2 gpu: main and repaint passes, two timesteps; 1 tiny)")
    p.add_argument("--floor_batches", default=None,
                   help="batch sizes at which the bare UNet is timed (default "
                        f"{','.join(map(str, DEFAULT_FLOOR_BATCHES))} gpu, "
                        f"{','.join(map(str, TINY_FLOOR_BATCHES))} tiny)")
    p.add_argument("--floor_iters", type=int, default=None, help="timed UNet calls per batch (default 3 gpu, 1 tiny)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 in tiny mode: robust on a shared CPU; torch's default otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--upscale_strength", type=float, default=None,
                   help="also time a 2x upscale to each preset's size (image-to-image at this strength)")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    return p


def variant_name(result: dict) -> str:
    """eager, compiled or low_vram (combined with '+'), after the model when it is not SDXL."""
    parts = [name for name, on in (("compiled", result.get("compiled")), ("low_vram", result.get("low_vram"))) if on]
    model = result.get("model", "sdxl")
    return " ".join([*([model] if model != "sdxl" else []), "+".join(parts) or "eager"])


def markdown_table(results: list[dict], card: str) -> str:
    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    lines = ["| preset | size | R | samples | calls | wall s | floor s | ratio | calls floor s | wall / calls floor "
             "| peak GiB | v | variant | card |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['preset']} | {r['width']}x{r['height']} | {r['resampling_steps']} | {r['unet_samples']} | "
                     f"{r['unet_calls']} | {num(r['wall_s'], '.2f')} | {num(r['floor_s'], '.2f')} | "
                     f"{num(r['ratio'], '.2f')} | {num(r.get('calls_floor_s'), '.2f')} | "
                     f"{num(r.get('ratio_to_calls_floor'), '.2f')} | {num(r['peak_memory_gib'], '.1f')} | "
                     f"{r['view_batch_size']} | {variant_name(r)} | {card} |")
    return "\n".join(lines)


def versions() -> dict:
    import diffusers
    import transformers

    return dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, cuda=torch.version.cuda)


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the mode-dependent defaults of parsed arguments, in place (mode, T, warm-up, floor batches)."""
    if args.mode is None:
        args.mode = "gpu" if torch.cuda.is_available() else "tiny"
    tiny = args.mode == "tiny"
    args.steps = args.steps or (2 if tiny else 50)
    args.floor_iters = args.floor_iters or (1 if tiny else 3)
    args.warmup_steps = args.warmup_steps or (1 if tiny else 2)
    if args.threads or tiny:
        # Tiny models are too small for intra-op parallelism; on a busy CPU, OpenMP's spinning threads
        # made them 10-100x slower.
        torch.set_num_threads(args.threads or 1)
    args.floor_batches = args.floor_batches or ",".join(map(str, TINY_FLOOR_BATCHES if tiny else DEFAULT_FLOOR_BATCHES))


def build(args: argparse.Namespace) -> dict:
    """The pipeline of `args` (tiny, or the real architecture with random weights) on its device.

    Returns dict(pipe, params_m, device, dtype, card, build_s).
    """
    tiny = args.mode == "tiny"
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    dtype = torch.float32 if tiny else getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs CUDA; use --mode tiny on a CPU (or --device cpu to force it)")
    tic = time.perf_counter()
    if tiny:
        pipe, counts = build_tiny(args.model)
        pipe.to(device)
    else:
        pipe, counts = build_real_pipeline(args.model, device, dtype, args.seed)
    synchronize(device)
    built = dict(pipe=pipe, params_m=counts, device=device, dtype=dtype, card=card_name(device),
                 build_s=time.perf_counter() - tic)
    print(f"{args.mode} {args.model} on {built['card']}, {str(dtype).replace('torch.', '')}; built in "
          f"{built['build_s']:.1f} s; " + ", ".join(f"{k} {v:.1f} M" for k, v in counts.items()), flush=True)
    return built


def parse_ints(text: str) -> list[int]:
    """Comma-separated integers (batch sizes, preset numbers); empty items are ignored."""
    return [int(b) for b in text.split(",") if b.strip()]


def compile_first_call(sampler, index: int, args: argparse.Namespace) -> dict:
    """Time a compiled sampler's first generation (preset `index`, T = warm-up steps): mostly compilation.

    Returns dict(first_call_s, steps, graphs_compiled). Every UNet input is native-size with a
    dynamic batch dimension, so these graphs serve every later size; `run_preset` checks that its
    timed run compiles nothing.
    """
    steps = min(args.warmup_steps, args.steps)
    graphs = compiled_graphs()
    request = preset_request(index, sampler.native_px, sampler.latent_channels)
    _, _, first = generate(sampler, request, steps, args.batch,
                           args.patch_size or sampler.native_latent // 2, args.seed)
    done = dict(first_call_s=first, steps=steps, graphs_compiled=compiled_graphs() - graphs, preset=index)
    print(f"  compiled UNet: first call (preset {index}, T={steps}) {first:.1f} s, "
          f"{done['graphs_compiled']} graph(s) compiled", flush=True)
    return done


def check_results(results: list[dict]) -> list[str]:
    """What a run got wrong: counts off the cost model, or a compiled UNet compiling inside the timed run."""
    failures = [f"preset {r['preset']}: {what} {r[key]} != expected {r['expected'][exp]}"
                for r in results
                for what, key, exp, ok in (("samples", "unet_samples", "samples", r["samples_match"]),
                                           ("calls", "unet_calls", "calls", r["calls_match"]),
                                           ("views", "num_views", "V", r["views_match"]),
                                           ("VAE encodes", "vae_encodes", "vae_encodes", r["encodes_match"]))
                if not ok]
    failures += [f"preset {r['preset']}: 2x upscale samples {r['upscale']['unet_samples']} != expected "
                 f"{r['upscale']['expected_samples']}" for r in results
                 if "upscale" in r and not r["upscale"]["samples_match"]]
    failures += [f"preset {r['preset']}: {r['graphs_compiled_in_timed_run']} graph(s) compiled inside the timed run"
                 for r in results if r.get("graphs_compiled_in_timed_run")]
    failures += [f"preset {r['preset']}: timing the compiled UNet alone compiled {r['graphs_compiled_timing_the_unet']} "
                 "graph(s): benchmark.time_unet does not call it as the sampler does" for r in results
                 if r.get("graphs_compiled_timing_the_unet")]
    return failures


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    resolve_defaults(args)
    report = dict(command=" ".join(shlex.quote(a) for a in ["python", "benchmarks/benchmark.py", *argv]),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  versions=versions(), mode=args.mode, model=args.model)

    if args.mode == "meta":
        counts = check_param_counts(args.model, build_empty_components(args.model, meta_buffers=True))
        report["params_m"] = counts
        for name, value in counts.items():
            print(f"{args.model} {name}: {value:.2f} M parameters (published: {EXPECTED_PARAMS_M[args.model][name]} M)")
        _write_json(args.json, report)
        return report

    presets = parse_ints(args.presets)
    built = build(args)
    pipe, device, dtype, card = built["pipe"], built["device"], built["dtype"], built["card"]
    report.update(device=str(device), card=card, dtype=str(dtype).replace("torch.", ""), params_m=built["params_m"],
                  build_s=built["build_s"], settings=vars(args))

    # The floor, in the same process, on the bare (eager) UNet before the sampler touches it.
    print("UNet floor (eager):", flush=True)
    eager_costs = {}
    floor = measure_floor(denoiser(pipe), parse_ints(args.floor_batches), device, dtype, args.floor_iters,
                          warmup=1 if args.mode == "tiny" else 2, known=eager_costs)
    report["floor"] = floor
    if device.type == "cuda":
        torch.cuda.empty_cache()

    sampler = ed.ElasticDiffusion.from_pipe(pipe, device=device, view_batch_size=args.view_batch_size,
                                            low_vram=args.low_vram, compile_unet=args.compile)
    results, compiled_per_sample = [], None
    costs = {} if args.compile else eager_costs  # per-sample costs of the UNet the sampler calls
    for index in presets:
        if args.compile and compiled_per_sample is None and not args.low_vram:
            report["compile"] = compile_first_call(sampler, index, args)
            # The compiled UNet's floor: its per-sample time at batch v.
            compiled_per_sample = per_sample_costs(sampler.unet, [args.view_batch_size], device, dtype,
                                                   args.floor_iters, warmup=1, known=costs,
                                                   label="compiled UNet")[args.view_batch_size]
            report["floor"]["compiled_per_sample_s"] = compiled_per_sample
        results.append(run_preset(sampler, index, args, floor, compiled_per_sample, costs))
    report["results"] = results

    failures = check_results(results)
    report["failures"] = failures
    report["all_checks_passed"] = not failures
    report["table"] = markdown_table(results, card)
    _write_json(args.json, report)
    for failure in failures:
        print(f"MISMATCH: {failure}", file=sys.stderr)
    print()
    print(report["table"], flush=True)
    return report


def _write_json(path: str | None, report: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    sys.exit(0 if main().get("all_checks_passed", True) else 1)
