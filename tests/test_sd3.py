"""SD 3 / 3.5 (flow matching) through the same loop: a tiny random SD 3 pipeline (2-layer transformer, 16-channel
VAE, two CLIP encoders, no T5) saved and loaded like a real one.

The 2x loop is pinned against the independent implementation in test_method.py (`sd3_1.5x`); here: plain SD 3 at
and below the native size, the flow form's stages against diffusers and their closed forms, and the options an
SD 3 model refuses.
"""
import inspect
import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import elastic_diffusion as ed
from test_sampler import QUIET


@pytest.fixture(scope="module")
def sd3(tiny_sd3_path):
    return ed.ElasticDiffusion(device="cpu", sd_version=tiny_sd3_path)


@pytest.mark.parametrize("height, width", [(512, 512), (384, 512)])
def test_at_or_below_the_native_size_equals_diffusers_sd3(sd3, height, width):
    """Within the native size the reference is the latent itself: one [neg; pos] pair per step, unpadded, stepped
    by Euler on the shifted sigmas, equals StableDiffusion3Pipeline from the same latents to fp32 round-off."""
    latents = sd3.initial_latents(height, width, 1, 0)
    ours, info = sd3("a red house", "blurry", height=height, width=width, latents=latents, num_inference_steps=3,
                     guidance_scale=4.5, **QUIET)
    theirs = sd3.pipe("a red house", negative_prompt="blurry", height=height, width=width, latents=latents,
                      num_inference_steps=3, guidance_scale=4.5, output_type="latent").images
    assert (info.unet_samples, info.unet_calls, info.vae_encodes) == (6, 3, 0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    assert ours.abs().max() > 1  # not a trivially small latent


def test_flow_step_is_diffusers_euler_step_and_its_x0():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 16, 8, 8, generator=gen), torch.randn(1, 16, 8, 8, generator=gen)
    for i, t in enumerate(scheduler.timesteps):
        sigma, sigma_next = (float(s) for s in scheduler.sigmas[i:i + 2])
        x0, x_next = ed.flow_step(v, x, sigma, sigma_next)
        torch.testing.assert_close(x_next, scheduler.step(v, t, x).prev_sample, rtol=0, atol=1e-6)
        eps = x0 + v  # v = eps - x0, and x = (1 - sigma) x0 + sigma eps
        torch.testing.assert_close((1 - sigma) * x0 + sigma * eps, x, rtol=0, atol=1e-5)


def test_flow_renoise_reaches_the_noisier_level_of_the_forward_process():
    """From x' = (1 - s') x0 + s' e: a x' + b n = (1 - s) x0 + sqrt(a^2 s'^2 + b^2) e'' with total noise std s."""
    sigma, sigma_next = 0.8, 0.6
    x0 = torch.ones(1, 4, 2, 2)
    assert torch.allclose(ed.flow_renoise(0.4 * x0, sigma_next, sigma, torch.zeros_like(x0)), (1 - sigma) * x0)
    a = (1 - sigma) / (1 - sigma_next)
    b = float(ed.flow_renoise(torch.zeros(1), sigma_next, sigma, torch.ones(1)))
    assert math.isclose(a ** 2 * sigma_next ** 2 + b ** 2, sigma ** 2, rel_tol=1e-6)  # b in fp32
    assert math.isclose(b, math.sqrt(0.64 - 0.5 ** 2 * 0.36), rel_tol=1e-6)
    # From a clean latent (sigma 0) it is the forward process itself: the image-to-image start.
    noise = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(ed.flow_renoise(x0, 0.0, sigma, noise), (1 - sigma) * x0 + sigma * noise)


def test_the_cost_model_counts_an_sd3_run(sd3):
    settings = dict(sd3.resolve_settings(768, 512, num_inference_steps=2, resampling_steps=1))
    _, info = sd3("a castle", height=512, width=768, seed=3, **settings, **QUIET)
    cost = ed.unet_cost(768, 512, settings, sd3.native_latent, flow=True)
    assert (cost.samples, cost.calls, cost.vae_encodes) == (info.unet_samples, info.unet_calls, info.vae_encodes)
    assert info.vae_encodes > 0  # the reference (42 x 64 latent pixels) is padded to the native size
    assert ed.unet_cost(384, 512, settings, sd3.native_latent, flow=True).vae_encodes == 0  # unpadded


def test_sd3_presets_and_geometry(sd3, tiny_sd3_path):
    assert (sd3.is_flow, sd3.native_px, sd3.latent_channels, sd3.is_sdxl) == (True, 512, 16, False)  # tiny: half
    assert ed.native_size(tiny_sd3_path) == ed.Native(512, 8, f"{tiny_sd3_path}'s configs", True)
    assert ed.native_size("3.5-large").flow and not ed.native_size("XL1.0").flow
    assert ed.is_flow_model(tiny_sd3_path) and not ed.is_flow_model("XL1.0") and not ed.is_flow_model("no/such-model")
    mps = torch.device("mps")  # an accelerator: half precision, SD 3's in bf16
    assert (ed.default_dtype(mps, flow=True), ed.default_dtype(mps), ed.default_dtype(torch.device("cpu"), True)) == (
        torch.bfloat16, torch.float16, torch.float32)
    flow, xl = ed.recommended_settings(2048, 2048, 1024, flow=True), ed.recommended_settings(2048, 2048, 1024)
    assert (flow["num_inference_steps"], flow["guidance_scale"]) == (28, 4.5)
    # The pull 2 lambda0 / (C H W) is SDXL's: 16 channels take 4x the weight of SDXL's 4.
    assert flow["rrg_init_weight"] == 4 * xl["rrg_init_weight"] == 8000
    assert sd3.resolve_settings(1024, 1024) == ed.recommended_settings(1024, 1024, 512, flow=True)


def test_sd3_refuses_what_it_does_not_have(sd3, tiny_sd3_path):
    with pytest.raises(ValueError, match="time_ids_scale is SDXL's size conditioning: SD 3 models have none"):
        sd3("a cat", height=512, width=512, time_ids_scale=1, **QUIET)
    from elastic_diffusion_w_controlnet import ElasticDiffusionControlNet

    with pytest.raises(ValueError, match="ControlNet.*SD 1.x, 2.x and XL"):
        ElasticDiffusionControlNet(device="cpu", sd_version=tiny_sd3_path, controlnet_model="canny")


def test_image_to_image_on_sd3_starts_from_the_noised_image(sd3):
    """Strength 0.5 of 4 steps runs the last 2 from (1 - sigma) z + sigma noise at the third sigma."""
    image = ed.Image.new("RGB", (512, 384), (200, 40, 40))
    seen = []
    out, info = sd3("a red wall", image=image, strength=0.5, num_inference_steps=4, seed=1, **QUIET,
                    callback_on_step_end=lambda pipe, i, t, tensors: seen.append(i))
    assert seen == [2, 3] and info.unet_samples == 4 and info.settings["image_hash"] == ed.image_hash(image)
    zero, _ = sd3("a red wall", image=image, strength=0.0, num_inference_steps=4, seed=1, **QUIET)
    torch.testing.assert_close(zero, sd3.encode_image(image))  # no step: the image's own latent


def test_look_inside_records_v_and_the_class_direction_plain_and_elastic(sd3):
    """At the native size both methods see the same two transformer outputs per step: the same maps."""
    import pca_diffusion_scores as pca

    kwargs = dict(height=512, width=512, steps_to_keep=[0, 1], seed=5, progress=False, num_inference_steps=2,
                  guidance_scale=4.5)
    plain = pca.record_scores(sd3, "a fox", "", method="plain", **kwargs)
    elastic = pca.record_scores(sd3, "a fox", "", method="elastic", **kwargs)
    assert plain.info.settings["method"] == "plain flow" and plain.direction.shape == (2, 16, 64, 64)
    for name in ("direction", "local_uncond", "x0"):
        torch.testing.assert_close(getattr(plain, name).float(), getattr(elastic, name).float(), rtol=0, atol=2e-3)
    assert plain.direction.float().abs().max() > 0.01


def test_cog_runs_an_sd3_model_with_its_own_defaults(tiny_sd3_path, monkeypatch):
    """cog's literal defaults are SDXL's (50 steps, guidance 10): on SD 3 they stand for the model's (28, 4.5)."""
    import predict

    monkeypatch.setenv("MODEL", tiny_sd3_path)
    predictor = predict.Predictor()
    predictor.setup()
    inputs = {name: p.default.default for name, p in inspect.signature(predictor.predict).parameters.items()}
    call = predict.check_request(dict(inputs, width=512, height=512), predictor.sampler)
    assert (call["num_inference_steps"], call["guidance_scale"]) == (None, None)
    assert predict.check_request(dict(inputs, width=512, height=512, guidance_scale=6.0),
                                 predictor.sampler)["guidance_scale"] == 6.0
    (path,) = predictor.predict(**dict(inputs, width=512, height=384, num_inference_steps=1, seed=2))
    with ed.Image.open(path) as image:
        record = json.loads(image.text["elastic_diffusion"])
    assert image.size == (512, 384) and (record["num_inference_steps"], record["guidance_scale"]) == (1, 4.5)


def test_the_demos_offer_sd3_its_presets_and_refine_only(sd3, examples_cache):
    import gradio as gr

    import app_gradio
    import app_gradio_img2img

    text = app_gradio.TextToImageApp(sd3)
    recommended = text.recommended(1024, 1024)  # 2x the tiny model's 512 px: 4 native areas, as 2048² on SD 3.5
    assert (recommended["num_inference_steps"], recommended["guidance_scale"], recommended["rrg_init_weight"]) == (
        28, 4.5, 8000)
    assert "untuned" in text.model_note() and text.gpu_seconds(dict(width=1024, height=1024)) > 20
    image = app_gradio_img2img.ImageToImageApp(sd3)
    assert [row[3] for row in image.example_rows] == ["refine"] and len(image.example_labels) == 1
    demo = image.build()
    (guide,) = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "condition"]
    assert [value for _, value in guide.choices] == ["refine"]
    with pytest.raises(gr.Error, match="Guide 'canny' needs a ControlNet.*choose Refine"):
        image.parse_control(dict(condition="canny", image=None))


def test_cli_and_batch_run_sd3_with_its_defaults(tiny_sd3_path, tmp_path):
    (path,) = ed.main(["--sd_version", tiny_sd3_path, "--width", "512", "--height", "384", "--steps", "1",
                       "--outdir", str(tmp_path / "cli")])
    with ed.Image.open(path) as image:
        record = json.loads(image.text["elastic_diffusion"])
    assert image.size == (512, 384) and (record["num_inference_steps"], record["guidance_scale"]) == (1, 4.5)
    lines = tmp_path / "prompts.jsonl"
    lines.write_text(json.dumps(dict(prompt="a lake", width=512, height=384, num_inference_steps=1)) + "\n")
    (path,) = ed.main(["--sd_version", tiny_sd3_path, "--prompts_file", str(lines), "--outdir", str(tmp_path / "b")])
    with ed.Image.open(path) as image:
        assert json.loads(image.text["elastic_diffusion"])["guidance_scale"] == 4.5


def test_low_vram_offloads_the_transformer_and_gives_the_same_latent(sd3):
    """diffusers' model CPU offload on SD 3's pipeline (SD 3.5 Large's memory mode): hooks on the transformer,
    the same result; switched back off for the other tests (the modules are shared)."""
    args = dict(prompt="a boat", height=512, width=384, num_inference_steps=1, seed=4, **QUIET)
    expected, _ = sd3(**args)
    offloaded = ed.ElasticDiffusion.from_pipe(sd3.pipe, low_vram=True)
    try:
        assert type(getattr(sd3.unet, "_hf_hook", None)).__name__ == "CpuOffload"
        torch.testing.assert_close(offloaded(**args)[0], expected, rtol=0, atol=0)
    finally:
        offloaded.set_low_vram(False)
    assert getattr(sd3.unet, "_hf_hook", None) is None
