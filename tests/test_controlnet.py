"""ElasticDiffusion + ControlNet on tiny random models (CPU, seconds).

The ControlNets are built from the tiny UNets (`save_tiny_controlnet`), saved, and loaded back through the
sampler's `controlnet_model=<folder>` path; the depth model is a tiny random DPT saved the same way.
"""
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import elastic_diffusion as ed
import elastic_diffusion_w_controlnet as edc
from elastic_diffusion import ElasticDiffusion, reference_size
from elastic_diffusion_w_controlnet import (ElasticDiffusionControlNet, canny_condition, depth_condition, fit_image,
                                            load_image, to_tensor)
from tiny_models import save_tiny_controlnet, save_tiny_depth_model

PHOTO = edc.DEFAULT_INPUT  # the shipped public-domain photograph
FAST = dict(num_inference_steps=2, seed=0, progress=False)


def _controlnet_folder(model_path, folder):
    """A tiny ControlNet whose zero-initialised layers are made random, so its residuals depend on the condition."""
    return save_tiny_controlnet(model_path, folder)


@pytest.fixture(scope="module")
def sd1_controlnet(tiny_sd1_path, tmp_path_factory):
    return _controlnet_folder(tiny_sd1_path, tmp_path_factory.mktemp("controlnet_sd1"))


@pytest.fixture(scope="module")
def sdxl_controlnet(tiny_sdxl_path, tmp_path_factory):
    return _controlnet_folder(tiny_sdxl_path, tmp_path_factory.mktemp("controlnet_sdxl"))


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path, sd1_controlnet):
    return ElasticDiffusionControlNet(device="cpu", sd_version=tiny_sd1_path, controlnet_model=sd1_controlnet)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path, sdxl_controlnet):
    return ElasticDiffusionControlNet(device="cpu", sd_version=tiny_sdxl_path, controlnet_model=sdxl_controlnet)


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    return save_tiny_depth_model(tmp_path_factory.mktemp("tiny_dpt"))


class Recorder:
    """Records the regions and conditions of each ControlNet call, its batch sizes, and the UNet's residuals."""

    def __init__(self, pipe):
        self.calls, self.unet_residuals, self.controlnet_batches = [], [], []
        control_batch = pipe.control_batch

        def record(run, regions):
            cond = control_batch(run, regions)
            self.calls.append((list(regions), cond.clone()))
            return cond

        pipe.control_batch = record
        self.handles = [pipe.unet.register_forward_pre_hook(self.unet_hook, with_kwargs=True),
                        pipe.controlnet.register_forward_pre_hook(self.controlnet_hook, with_kwargs=True)]
        self.pipe = pipe

    def unet_hook(self, module, args, kwargs):
        self.unet_residuals.append((kwargs.get("down_block_additional_residuals"),
                                    kwargs.get("mid_block_additional_residual")))

    def controlnet_hook(self, module, args, kwargs):
        self.controlnet_batches.append((args[0].shape[0], kwargs["controlnet_cond"].shape[0]))

    def close(self):
        del self.pipe.control_batch
        for handle in self.handles:
            handle.remove()


def expected_samples(pipe, info, batch):
    """(reference, local) UNet samples of a finished run, by the cost model (docs/method.md#cost-model)."""
    s = info["settings"]
    cost = ed.unet_cost(s["width"], s["height"], s, pipe.native_latent, batch, s["view_batch_size"])
    T, f = s["num_inference_steps"], pipe.vae_scale_factor
    passes = T + (T - 1 if s["repaint"] and s["resampling_steps"] > 0 else 0)  # main and repaint passes
    at_native = info["reference_size"] == (s["height"] // f, s["width"] // f)  # one [neg; pos] pair a pass
    local = 0 if at_native else passes * batch * info["num_views"]
    return cost.samples - local, local


# --------------------------------------------------------------------------------------------------
# Extension point, conditions per region, equivalence with the base sampler
# --------------------------------------------------------------------------------------------------


def test_residuals_feed_every_reference_and_local_sample(sd1):
    rec = Recorder(sd1)
    try:
        images, info = sd1("a cat", condition_image=PHOTO, condition="canny", width=1024, height=512,
                           resampling_steps=1, **FAST)
    finally:
        rec.close()
    assert images[0].size == (1024, 512) and info["condition_image"].size == (1024, 512)
    V = info["num_views"]
    assert V == 4  # 1024x512 on a 512-px model: four 64x64 latent crops along the width
    ref, local = expected_samples(sd1, info, batch=1)
    assert (info["controlnet_reference_samples"], info["controlnet_local_samples"]) == (ref, local) == (10, 12)
    assert info["controlnet_samples"] == info["unet_samples"] == ref + local
    assert [n for n, _ in rec.controlnet_batches] == [m for _, m in rec.controlnet_batches]  # batch-matched
    assert sum(n for n, _ in rec.controlnet_batches) == ref + local
    # Every UNet call got ControlNet residuals, one per down block plus the mid block.
    assert len(rec.unet_residuals) == info["unet_calls"] == info["controlnet_calls"]
    for down, mid in rec.unet_residuals:
        assert mid is not None and len(down) == len(sd1.controlnet.controlnet_down_blocks)
    for regions, cond in rec.calls:
        assert cond.shape == (len(regions), 3, 512, 512)  # the native canvas in pixels


def test_local_conditions_are_full_resolution_crops(sd1):
    rec = Recorder(sd1)
    try:
        _, info = sd1("a cat", condition_image=PHOTO, condition="canny", width=1024, height=512,
                      resampling_steps=0, num_inference_steps=1, seed=0, progress=False)
    finally:
        rec.close()
    full = to_tensor(info["condition_image"])
    assert set(full.unique().tolist()) == {0.0, 1.0}
    h, w = reference_size(512, 1024, 512)
    # The reference map is extracted at the reference size: crisp edges, not an area downscale of the full map.
    reference = to_tensor(canny_condition(fit_image(load_image(PHOTO), 8 * w, 8 * h)))
    assert set(reference.unique().tolist()) == {0.0, 1.0}
    nearest_up = F.interpolate(reference, size=full.shape[-2:], mode="nearest")  # the official local condition
    seen = {"reference": 0, "local": 0}
    for regions, cond in rec.calls:
        for region, c in zip(regions, cond):
            top, bottom, left, right = (8 * p for p in region.padding)
            inner = c[:, top:c.shape[1] - bottom, left:c.shape[2] - right]
            assert c.sum() == inner.sum()  # zero padding outside the sample
            if region.kind == "local":
                (r0, r1), (c0, c1) = region.rows, region.cols
                torch.testing.assert_close(inner, full[0, :, 8 * r0:8 * r1, 8 * c0:8 * c1], rtol=0, atol=0)
                assert not torch.equal(inner, nearest_up[0, :, 8 * r0:8 * r1, 8 * c0:8 * c1])
            else:
                assert (region.rows, region.cols) == ((0, h), (0, w))
                torch.testing.assert_close(inner, reference[0], rtol=0, atol=0)
            seen[region.kind] += 1
    assert seen == {"reference": 2, "local": 4}  # [neg; pos] of the reference, the four windows


def test_one_controlnet_forward_per_unet_sample_and_the_map_before_step_one(sd1):
    stages = []
    _, info = sd1("a cat", condition_image=PHOTO, condition="canny", width=1024, height=512, resampling_steps=1,
                  num_inference_steps=2, seed=0, progress=False, output_type="latent",
                  callback_on_stage=lambda stage, done, total: stages.append(stage))
    assert info["controlnet_samples"] == info["unet_samples"] and info["controlnet_calls"] == info["unet_calls"]
    assert stages[-1] == "condition"  # the map is made before step 1, reported


def test_canny_maps_are_binary_at_both_sizes_on_the_photo_at_2048(sdxl):
    """The shipped photo at 2048² on SDXL: an area downscale of the full-resolution Canny map to the 1024²
    reference is grey (soft edges the ControlNet never saw in training); both maps the sampler uses are 0/1."""
    rec = Recorder(sdxl)
    try:
        _, info = sdxl("a cat", condition_image=PHOTO, condition="canny", width=2048, height=2048,
                       resampling_steps=0, num_inference_steps=1, seed=0, progress=False, output_type="latent")
    finally:
        rec.close()
    full = to_tensor(info["condition_image"])
    edges_area = F.interpolate(full, size=(1024, 1024), mode="area")
    assert float(edges_area[edges_area > 0].median()) <= 0.5  # what the global branch got before
    seen = {"reference": 0, "local": 0}
    for regions, cond in rec.calls:
        for region, c in zip(regions, cond):
            assert set(c.unique().tolist()) == {0.0, 1.0}, region.kind
            seen[region.kind] += 1
    assert seen["reference"] > 0 and seen["local"] > 0


def test_scale_zero_equals_the_base_sampler(sd1):
    kwargs = dict(width=1024, height=512, resampling_steps=0, output_type="latent", **FAST)
    base, _ = ElasticDiffusion.from_pipe(sd1.pipe, device="cpu")("a cat", **kwargs)
    off, _ = sd1("a cat", condition_image=PHOTO, condition="canny", controlnet_conditioning_scale=0.0, **kwargs)
    on, info = sd1("a cat", condition_image=PHOTO, condition="canny", **kwargs)
    photo, _ = sd1("a cat", condition_image=PHOTO, condition="image", **kwargs)
    assert info["controlnet_samples"] > 0 and info["settings"]["controlnet_conditioning_scale"] == 1.0
    assert torch.equal(off, base)  # the residual path is the only difference
    assert (on - base).abs().max() > 0.1 and (on - photo).abs().max() > 0.1  # the condition map matters


def test_a_starting_image_combines_with_the_condition(sd1):
    """image= and strength= go through the ControlNet sampler too: the condition comes from condition_image, the
    start from image, and only the last int(T * strength) steps run, each with the ControlNet's residuals."""
    kwargs = dict(condition_image=PHOTO, condition="canny", width=1024, height=512, output_type="latent", **FAST)
    x, info = sd1("a cat", image=PHOTO, strength=0.5, **dict(kwargs, num_inference_steps=4))
    cost = ed.unet_cost(1024, 512, info["settings"], sd1.native_latent, strength=0.5)
    assert info["controlnet_samples"] == info["unet_samples"] == cost.samples > 0
    assert info["settings"]["strength"] == 0.5 and info["settings"]["condition"] == "canny"
    text, _ = sd1("a cat", **dict(kwargs, num_inference_steps=4))
    assert not torch.equal(x, text)


def test_sdxl_two_prompts(sdxl, sdxl_controlnet):
    pipe = sdxl
    assert pipe.is_sdxl and pipe.default_condition == "image"  # a custom folder: no preprocessing by default
    images, info = pipe(["a cat", "a dog"], condition_image=PHOTO, condition="canny", width=1024, height=512,
                        output_type="np", **FAST)
    assert images.shape == (2, 512, 1024, 3) and np.isfinite(images).all()
    ref, local = expected_samples(pipe, info, batch=2)
    assert (info["controlnet_reference_samples"], info["controlnet_local_samples"]) == (ref, local) == (8, 0)
    assert info["settings"]["condition"] == "canny" and info["settings"]["controlnet_model"] == sdxl_controlnet


def test_low_vram_and_from_pipe(sd1, tiny_depth_model):
    pipe = ElasticDiffusionControlNet.from_pipe(sd1.pipe, controlnet_model=sd1.controlnet, depth_model=tiny_depth_model,
                                                low_vram=True)
    try:
        assert pipe.controlnet is sd1.controlnet and pipe._controlnet_hook is not None
        images, info = pipe("a cat", condition_image=PHOTO, condition="depth", width=512, height=256, **FAST)
        assert images[0].size == (512, 256) and info["controlnet_samples"] == info["unet_samples"]
        depth = np.array(info["condition_image"])
        assert depth.shape == (256, 512, 3) and (depth[..., 0] == depth[..., 2]).all()
        estimator = pipe.depth_estimator()
        assert estimator.device.type == "cpu"  # low VRAM: the depth model stays off the GPU
    finally:
        pipe.set_low_vram(False)
    assert pipe._controlnet_hook is None and not hasattr(sd1.controlnet, "_hf_hook")
    # The estimator was made for the other mode: it is made again, on the device this one wants.
    assert pipe.depth_estimator() is not estimator and pipe.depth_estimator().device == pipe.device


def test_low_vram_sets_the_memory_mode_once_without_moving_the_pipeline(tiny_sd1_path, sd1_controlnet, monkeypatch):
    """low_vram=True: the ControlNet is loaded first, then offloading is set up once for all models; the
    pipeline is never moved whole to the device (on a GPU that would need the memory low-VRAM mode saves)."""
    from diffusers import DiffusionPipeline

    calls, inside = [], []
    to, offload = DiffusionPipeline.to, DiffusionPipeline.enable_model_cpu_offload

    def spy_to(self, *args, **kwargs):
        if not inside:  # enable_model_cpu_offload's own moves to the CPU are part of setting it up
            calls.append("to")
        return to(self, *args, **kwargs)

    def spy_offload(self, *args, **kwargs):
        calls.append("offload")
        inside.append(True)
        try:
            return offload(self, *args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(DiffusionPipeline, "to", spy_to)
    monkeypatch.setattr(DiffusionPipeline, "enable_model_cpu_offload", spy_offload)
    pipe = ElasticDiffusionControlNet(device="cpu", sd_version=tiny_sd1_path, controlnet_model=sd1_controlnet,
                                      low_vram=True)
    assert calls == ["offload"] and pipe._controlnet_hook is not None
    assert type(getattr(pipe.unet, "_hf_hook", None)).__name__ == "CpuOffload"
    calls.clear()
    pipe.set_low_vram(False)
    assert calls == ["to"] and pipe._controlnet_hook is None and not hasattr(pipe.controlnet, "_hf_hook")


def test_a_callers_controlnet_is_not_converted(sd1):
    from diffusers import ControlNetModel

    other = ControlNetModel.from_config(sd1.controlnet.config).to(torch.float16)
    with pytest.raises(ValueError, match="controlnet_model is torch.float16.*convert it first"):
        sd1.load_controlnet(other)
    assert other.dtype == torch.float16


def test_official_entry_point_and_condition_preview(sd1):
    images, info = sd1.generate_image("a cat", "", 256, 512, condition_image=load_image(PHOTO).convert("L"),
                                      repaint_sampling=False, **FAST)
    assert images[0].size == (512, 256) and info["settings"]["condition"] == "image"  # a custom id: no preprocessing
    assert info["condition_image"].size == (512, 256) and info["settings"]["condition_image"] == "PIL image"


# --------------------------------------------------------------------------------------------------
# Loading models
# --------------------------------------------------------------------------------------------------


def test_default_controlnet_per_family(sd1, tiny_sdxl_path, sd1_controlnet):
    with pytest.raises(ValueError, match="lllyasviel/sd-controlnet-canny"):  # offline: not in the cache
        sd1.load_controlnet("canny")
    with pytest.raises(ValueError, match="lllyasviel/sd-controlnet-depth"):
        sd1.load_controlnet("depth")
    assert edc.CONTROLNET_IDS["canny"]["sdxl"] == "diffusers/controlnet-canny-sdxl-1.0"
    with pytest.raises(ValueError, match="does not fit this base model"):
        ElasticDiffusionControlNet(device="cpu", sd_version=tiny_sdxl_path, controlnet_model=sd1_controlnet)
    with pytest.raises(ValueError, match="controlnet_model"):
        sd1.load_controlnet("/no/such/folder")


# --------------------------------------------------------------------------------------------------
# Conditions and input images
# --------------------------------------------------------------------------------------------------


def test_canny_condition_is_binary_and_on_the_edges():
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    ImageDraw.Draw(image).rectangle([16, 12, 47, 35], fill=(255, 255, 255))
    edges = np.array(canny_condition(image))
    assert edges.shape == (48, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    on = edges[..., 0] > 0
    assert on[12:36, 14:18].any(axis=1).all() and on[10:14, 16:48].any(axis=0).all()  # left and top sides
    assert not on[:8].any() and not on[20:28, 24:40].any()  # flat background and flat inside
    faint = Image.new("RGB", (64, 48), (100, 100, 100))
    ImageDraw.Draw(faint).rectangle([16, 12, 47, 35], fill=(120, 120, 120))
    assert not np.array(canny_condition(faint)).any()  # below the default 100/200 thresholds
    assert np.array(canny_condition(faint, low=10, high=40)).any()


def test_depth_condition_with_a_tiny_model(tiny_depth_model):
    from transformers import pipeline

    estimator = pipeline("depth-estimation", model=tiny_depth_model)
    depth = depth_condition(load_image(PHOTO).resize((96, 64)), estimator)
    assert depth.mode == "RGB" and depth.size == (96, 64)


def test_fit_is_cover_then_centre_crop():
    image = Image.new("RGB", (300, 100))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        ImageDraw.Draw(image).rectangle([100 * i, 0, 100 * i + 99, 99], fill=colour)
    square = np.array(fit_image(image, 64, 64))
    assert square.shape == (64, 64, 3) and (square[:, 32] == (0, 255, 0)).all()  # the middle third, no bars
    wide = np.array(fit_image(image, 128, 16))  # taller than 300x100 in proportion: the centre rows, full width
    assert wide.shape == (16, 128, 3) and tuple(wide[8, 2]) == (255, 0, 0) and tuple(wide[8, 125]) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "L", "1", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_any_mode_becomes_rgb(mode):
    image = Image.open(PHOTO).convert(mode if mode not in ("I;16", "PA") else "L")
    if mode == "I;16":
        image = Image.fromarray(np.array(image).astype(np.uint16) * 257)
    elif mode == "PA":
        image = image.convert("P").convert("PA")
    out = load_image(image)
    assert out.mode == "RGB" and out.size == (512, 512)


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    out = load_image(image)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((5, 5)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.info["transparency"] = 1  # palette index 1 (blue) is transparent
    palette.putpixel((0, 0), 0)
    out = load_image(palette)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    ImageDraw.Draw(image).rectangle([20, 0, 39, 19], fill=(0, 0, 255))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rotated.jpg")
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 34))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # left went to the top


def _png_header(width, height):
    """A PNG that declares width x height pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("content, message", [
    (b"", "not a readable image"),
    (b"this is not an image" * 10, "not a readable image"),
    ("truncated", "could not be decoded"),
    (_png_header(100_000, 100_000), "too large"),  # beyond Pillow's own bomb limit
    (_png_header(10_000, 10_000), "100 MP"),  # under Pillow's limit, over ours
])
def test_bad_files_give_clear_errors(tmp_path, content, message):
    if content == "truncated":
        content = open(PHOTO, "rb").read()[:5000]
    path = tmp_path / "input.img"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"condition_image.*{message}"):
        load_image(path, "condition_image")


def test_bad_inputs_fail_before_sampling(sd1):
    attributes = set(vars(sd1))
    for bad, message in [(Image.new("RGB", (0, 0)), "no pixels"), ("/no/such/image.png", "not a readable"),
                         (42, "image file path, a PIL image"), (None, "required")]:
        with pytest.raises(ValueError, match=f"condition_image.*{message}"):
            sd1("a cat", condition_image=bad, width=512, height=256, **FAST)
    for kwargs, message in [(dict(condition="sketch"), "condition must be one of"),
                            (dict(controlnet_conditioning_scale=float("nan")), "controlnet_conditioning_scale"),
                            (dict(canny_low=200, canny_high=100), "canny_low and canny_high")]:
        with pytest.raises(ValueError, match=message):
            sd1("a cat", condition_image=PHOTO, width=512, height=256, **FAST, **kwargs)
    assert set(vars(sd1)) == attributes  # no per-call state on the sampler
    no_depth = ElasticDiffusionControlNet.from_pipe(sd1.pipe, controlnet_model=sd1.controlnet, depth_model="/no/dpt")
    with pytest.raises(ValueError, match="depth_model '/no/dpt' could not be loaded"):
        no_depth("a cat", condition_image=PHOTO, condition="depth", width=512, height=256, **FAST)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_cli_end_to_end(tiny_sd1_path, sd1_controlnet, tmp_path, capsys):
    paths = edc.main(["--sd_version", tiny_sd1_path, "--controlnet_model", sd1_controlnet, "--device", "cpu",
                      "--condition_image", PHOTO, "--condition", "canny", "--width", "512", "--height", "256",
                      "--steps", "2", "--outdir", os.fspath(tmp_path), "--controlnet_conditioning_scale", "0.7",
                      "--canny_low", "50", "--canny_high", "150"])
    assert len(paths) == 2 and paths[1].endswith("_condition.png")
    assert capsys.readouterr().out.split() == paths
    with Image.open(paths[0]) as image:
        assert image.size == (512, 256)
        record = json.loads(image.text["elastic_diffusion"])
    assert record["condition"] == "canny" and record["controlnet_conditioning_scale"] == 0.7
    assert (record["canny_low"], record["canny_high"]) == (50, 150) and record["condition_image"] == PHOTO
    with Image.open(paths[1]) as condition:
        assert condition.size == (512, 256) and set(np.unique(np.array(condition))) == {0, 255}


def test_cli_flags():
    parser = edc.build_parser()
    args = parser.parse_args([])
    assert (args.width, args.height, args.default_px, args.controlnet_model, args.condition) == (None, None, 1536, "canny",
                                                                                             None)
    assert args.controlnet_conditioning_scale == 0.5 and args.save_condition and os.path.isfile(args.condition_image)
    assert not parser.parse_args(["--no-save_condition"]).save_condition
    assert not parser.parse_args(["--no-low_vram"]).low_vram and parser.parse_args(["--low_vram"]).low_vram
    assert parser.parse_args(["--controlnet_model", "someone/controlnet-scribble"]).controlnet_model  # any id, not only the defaults
    assert "centre-cropped" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--condition", "sketch"])


def test_cli_reports_bad_images(tiny_sd1_path, sd1_controlnet, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as exit_info:
        edc.main(["--sd_version", tiny_sd1_path, "--controlnet_model", sd1_controlnet, "--device", "cpu",
                  "--condition_image", os.fspath(tmp_path / "bad.jpg"), "--width", "512", "--height", "256"])
    assert exit_info.value.code == 2 and "condition_image" in capsys.readouterr().err
    assert not any(tmp_path.glob("*.png"))
