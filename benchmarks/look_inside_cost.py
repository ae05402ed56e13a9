#!/usr/bin/env python
"""What the demo's "Look inside" option adds after sampling: drawing the pictures, and their size on disk.

`app_gradio.save_look_inside` (the app's own function: PCA, contact sheet, animation, window overlay,
PNGs with metadata) is timed on a synthetic recording of the most steps the demo keeps
(`app_gradio.LOOK_INSIDE_STEPS` + 1) at each size, with the latent shapes of the chosen model family.
The maps are random noise: the worst case for the PNG and WebP encoders, so the file sizes are upper
bounds. The sampler's own extra work with the option on (one small GPU-to-CPU copy of each recorded
step's maps) is not in this number. On a ZeroGPU Space the drawing runs while the GPU is held, which is
why the demo's duration estimate adds `app_gradio.look_inside_seconds`.

    python benchmarks/look_inside_cost.py --model sdxl --sizes 1024x1024,2048x1024,2048x2048
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import app_gradio as app  # noqa: E402
import elastic_diffusion as ed  # noqa: E402
import pca_diffusion_scores as pca  # noqa: E402

NATIVE_PX = {"sdxl": 1024, "sd15": 512}


def synthetic_recording(width: int, height: int, native_px: int, steps: int, seed: int = 0) -> pca.Recording:
    """A recording with random maps of the shapes the sampler records at this size (4 latent channels)."""
    f, native_latent = 8, native_px // 8
    H, W = height // f, width // f
    h, w = ed.reference_size(height, width, native_px, f)
    generator = torch.Generator().manual_seed(seed)

    def maps(*shape):
        return torch.randn(steps, *shape, generator=generator).half()

    settings = dict(ed.recommended_settings(width, height, native_px), width=width, height=height)
    return pca.Recording(
        method="elastic", prompt="p", negative_prompt="", steps=list(range(steps)), timesteps=list(range(steps)),
        num_inference_steps=steps, x0=maps(4, H, W), direction=maps(4, H, W), local_uncond=maps(4, H, W),
        reference_direction=maps(4, h, w),
        x0_preview=torch.randint(0, 256, (steps, 3, H, W), generator=generator, dtype=torch.uint8),
        image_pt=torch.rand(3, height, width, generator=generator),
        info=ed.GenerationInfo(settings, seed, "synthetic"),
        views=ed.local_views(H, W, native_latent, settings["patch_size"]), reference_size=(h, w),
        vae_scale_factor=f)


def measure(width: int, height: int, native_px: int, steps: int) -> dict:
    """Seconds of `app_gradio.save_look_inside` and the bytes of each file it writes."""
    recording = synthetic_recording(width, height, native_px, steps)
    with tempfile.TemporaryDirectory() as folder:
        tic = time.perf_counter()
        pictures = app.save_look_inside(lambda name: os.path.join(folder, name), recording, recording.info)
        seconds = time.perf_counter() - tic
        sizes = {name: os.path.getsize(getattr(pictures, name)) for name in ("sheet", "animation", "windows")}
    return dict(width=width, height=height, megapixels=width * height / 1e6, steps=steps, seconds=seconds,
                bytes=sizes, reserved_seconds=app.look_inside_seconds(width, height))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(NATIVE_PX), default="sdxl", help="latent shapes of this family")
    p.add_argument("--sizes", default="1024x1024,2048x1024,2048x2048", help="WxH, comma-separated")
    p.add_argument("--steps", type=int, default=app.LOOK_INSIDE_STEPS + 1,
                   help="recorded steps (default: the most the demo keeps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
    measure(*sizes[0], NATIVE_PX[args.model], 2)  # warm-up: fonts, encoders and allocations of the first call
    results = [measure(w, h, NATIVE_PX[args.model], args.steps) for w, h in sizes]
    print(f"{args.model}, {args.steps} recorded steps, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads")
    print("| size | MP | drawing s | reserved s | sheet MB | animation MB | windows MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mb = {name: r["bytes"][name] / 1e6 for name in r["bytes"]}
        print(f"| {r['width']}x{r['height']} | {r['megapixels']:.1f} | {r['seconds']:.2f} | "
              f"{r['reserved_seconds']:.1f} | {mb['sheet']:.1f} | {mb['animation']:.1f} | {mb['windows']:.1f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(model=args.model, threads=torch.get_num_threads(), results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
