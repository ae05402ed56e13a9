"""Image-to-image (docs/method.md#image-to-image): the SDEdit start through the same loop, on tiny random models."""
import numpy as np
import pytest
import torch
from PIL import Image

import elastic_diffusion as ed

QUIET = dict(progress=False, output_type="latent")
# A smooth colour picture, 384 x 256: its own size is a valid size for the 512-px tiny model.
Y, X = np.mgrid[0:256, 0:384]
PICTURE = np.stack([X * 255 // 383, Y * 255 // 255, (X + Y) * 255 // 638], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path):
    return ed.ElasticDiffusion(device="cpu", sd_version=tiny_sd1_path)


@torch.no_grad()
def encoded(sampler, image: Image.Image) -> torch.Tensor:
    """Our own resize -> VAE posterior mean -> scaling, written out."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    return sampler.vae.encode(pixels).latent_dist.mean * sampler.vae.config.scaling_factor


def unet_samples(sampler, **call) -> tuple[int, ed.GenerationInfo]:
    counted = []
    handle = sampler.unet.register_forward_pre_hook(lambda module, args: counted.append(args[0].shape[0]))
    try:
        _, info = sampler("a cat", **call)
    finally:
        handle.remove()
    return sum(counted), info


def test_strength_zero_is_the_vae_round_trip_of_the_resized_image(sd1):
    fitted = Image.fromarray(PICTURE).resize((768, 512), Image.Resampling.LANCZOS)  # same aspect: fit = resize
    z = encoded(sd1, fitted)
    expected = sd1.vae.decode(z / sd1.vae.config.scaling_factor).sample
    expected = (expected / 2 + 0.5).clamp(0, 1)
    samples, info = unet_samples(sd1, image=PICTURE, upscale=2, strength=0, seed=1, output_type="pt", progress=False)
    assert samples == 0 and info["unet_calls"] == 0 and info["vae_encodes"] == 0
    images, _ = sd1("a dog on the moon", image=PICTURE, upscale=2, strength=0, seed=2, output_type="pt",
                    progress=False)
    assert images.shape == (1, 3, 512, 768)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)  # any seed, any prompt
    latent, _ = sd1("x", image=PICTURE, upscale=2, strength=0, seed=3, **QUIET)
    torch.testing.assert_close(latent, z, rtol=0, atol=1e-6)
    assert info["settings"]["strength"] == 0 and info["settings"]["upscale"] == 2
    assert info["settings"]["image_hash"] == ed.image_hash(Image.fromarray(PICTURE))


@pytest.mark.parametrize("strength", [0.1, 0.35, 0.5, 0.8, 1.0])
def test_the_unet_samples_at_each_strength_are_the_cost_models(sd1, strength):
    call = dict(image=PICTURE, upscale=2, strength=strength, num_inference_steps=10, seed=0, **QUIET)
    samples, info = unet_samples(sd1, **call)
    s = info["settings"]
    cost = ed.unet_cost(768, 512, s, sd1.native_latent, strength=strength)
    assert (samples, info["unet_calls"], info["vae_encodes"]) == (cost.samples, cost.calls, cost.vae_encodes)
    assert cost.samples > 0 and ed.run_steps(10, strength) == int(10 * strength)
    if strength == 1.0:  # what text-to-image at this size costs
        text, text_info = unet_samples(sd1, width=768, height=512, num_inference_steps=10, seed=0, **QUIET)
        assert (samples, info["unet_calls"]) == (text, text_info["unet_calls"]) == (cost.samples, cost.calls)


def test_the_start_latent_is_the_image_latent_noised_forward_with_the_seeds_noise(sd1, monkeypatch):
    starts = []
    sample = sd1.sample
    monkeypatch.setattr(sd1, "sample", lambda run, x, *args: starts.append((run.first_step, x.clone())) or
                        sample(run, x, *args))
    sd1("a cat", image=PICTURE, upscale=2, strength=0.4, num_inference_steps=10, seed=5, **QUIET)
    first, x = starts[0]
    assert first == 6  # the last 4 of 10 steps
    z = encoded(sd1, Image.fromarray(PICTURE).resize((768, 512), Image.Resampling.LANCZOS))
    noise = sd1.initial_latents(512, 768, 1, 5)
    alpha = float(sd1.model.alphas_cumprod[sd1.timesteps(10)[6]])
    torch.testing.assert_close(x, alpha ** 0.5 * z + (1 - alpha) ** 0.5 * noise, rtol=0, atol=1e-5)


def test_each_run_step_has_text_to_images_guidance_weight_and_index(sd1, monkeypatch):
    calls = []
    weight = ed.rrg_weight
    monkeypatch.setattr(ed, "rrg_weight", lambda *args: calls.append(args) or weight(*args))
    steps = []
    callback = lambda pipe, i, t, tensors: steps.append((i, t))  # noqa: E731
    common = dict(num_inference_steps=8, cosine_scale=1, rrg_stop_t=0, seed=0, callback_on_step_end=callback, **QUIET)
    sd1("a cat", width=768, height=512, **common)
    text, text_steps = calls[:], steps[:]
    calls.clear(), steps.clear()
    sd1("a cat", image=PICTURE, upscale=2, strength=0.5, **common)
    assert steps == text_steps[4:] and calls == text[4:]
    assert [weight(*args) for args in calls] == [weight(*args) for args in text[4:]]
    assert weight(*calls[0]) > 10  # RRG acts in the run steps (1.5x the native size)


def test_lower_strength_stays_nearer_the_image_and_runs_reproduce(sd1):
    z = encoded(sd1, Image.fromarray(PICTURE).resize((768, 512), Image.Resampling.LANCZOS))
    distance = {}
    for strength in (0.2, 0.9):
        x, _ = sd1("a cat", image=PICTURE, upscale=2, strength=strength, num_inference_steps=10, seed=0, **QUIET)
        again, _ = sd1("a cat", image=PICTURE, upscale=2, strength=strength, num_inference_steps=10, seed=0, **QUIET)
        assert torch.equal(x, again)
        distance[strength] = float((x - z).norm() / z.norm())
    assert distance[0.2] < distance[0.9]
    other, _ = sd1("a cat", image=PICTURE, upscale=2, strength=0.9, num_inference_steps=10, seed=1, **QUIET)
    assert not torch.equal(other, x)


def test_the_size_follows_the_image_and_upscale(sd1):
    images, info = sd1("a cat", image=Image.fromarray(PICTURE).resize((301, 203)), upscale=2.5, strength=0.2,
                       num_inference_steps=2, seed=0, progress=False)
    assert images[0].size == (752, 504)  # 752.5 and 507.5, rounded down to multiples of 8
    images, _ = sd1("a cat", image=PICTURE, width=512, height=512, strength=0.2, num_inference_steps=2, seed=0,
                    progress=False)
    assert images[0].size == (512, 512)  # given sizes win; the picture is fitted (cover, centre crop)


@pytest.mark.parametrize("call, message", [
    (dict(strength=1.5), "strength must be between 0 and 1; got 1.5"),
    (dict(strength="0.5"), "strength must be a number between 0 and 1; got '0.5'"),
    (dict(upscale=0), "upscale must be > 0; got 0"),
    (dict(upscale=3), "image is 384x256 pixels and upscale 3 makes it 1152x768: width must be between 128 and 1024"),
    (dict(image=PICTURE[:60, :60]), "image is 60x60 pixels and upscale 1 makes it 56x56: height must be at least 128"),
    (dict(image="/no/such/picture.png"), "image: '/no/such/picture.png' is not a readable image file"),
    (dict(image=PICTURE.astype(np.float32)), "image as an array must be H x W x 3 uint8"),
    (dict(image=None, strength=0.5), "strength and upscale go with image"),
])
def test_bad_image_inputs_name_the_argument(sd1, call, message):
    with pytest.raises(ValueError) as error:
        sd1("a cat", **{"image": PICTURE, **call}, num_inference_steps=1, **QUIET)
    assert message in str(error.value)


def test_an_unreadable_file_is_named(sd1, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="image: .*broken.png' is not a readable image file"):
        sd1("a cat", image=str(broken), **QUIET)


def test_cli_upscales_an_image_file_and_records_no_path(tiny_sd1_path, tmp_path):
    import json

    source = tmp_path / "private" / "holiday.png"
    source.parent.mkdir()
    Image.fromarray(PICTURE).save(source)
    paths = ed.main(["--sd_version", tiny_sd1_path, "--image", str(source), "--upscale", "2", "--strength", "0.3",
                     "--steps", "4", "--seed", "1", "--outdir", str(tmp_path / "out")])
    picture = Image.open(paths[0])
    assert picture.size == (768, 512)
    record = json.loads(picture.text["elastic_diffusion"])
    assert (record["strength"], record["upscale"], record["width"]) == (0.3, 2.0, 768)
    assert record["image_hash"] == ed.image_hash(Image.fromarray(PICTURE))
    assert "private" not in picture.text["elastic_diffusion"] + picture.text["parameters"]


@pytest.mark.parametrize("argv, message", [
    (["--strength", "0.5"], "--strength and --upscale go with --image"),
    (["--image", "/no/such.png"], "--image: '/no/such.png' is not a readable image file"),
    (["--image", "PICTURE", "--strength", "2"], "--strength must be between 0 and 1; got 2"),
    (["--image", "PICTURE", "--upscale", "4"], "width must be between 128 and 1024 pixels for this model"),
])
def test_cli_bad_image_flags_exit_before_loading(tiny_sd1_path, tmp_path, capsys, argv, message):
    Image.fromarray(PICTURE).save(tmp_path / "p.png")
    argv = [str(tmp_path / "p.png") if a == "PICTURE" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        ed.main(["--sd_version", tiny_sd1_path, "--outdir", str(tmp_path / "never"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_more_than_2x_runs_in_stages_of_at_most_2x(sd1):
    """upscale=4 of a 192x128 picture: a first run to 384x256 (2x), then from it to 768x512 (2x); the info counts
    both, the record names the picture given."""
    small = Image.fromarray(PICTURE).resize((192, 128), Image.Resampling.LANCZOS)
    sizes = []
    encode = sd1.encode_image
    sd1.encode_image = lambda image, tiled=False: sizes.append(image.size) or encode(image, tiled)
    try:
        samples, info = unet_samples(sd1, image=small, upscale=4, strength=0.5, num_inference_steps=4, seed=0,
                                     **QUIET)
    finally:
        del sd1.encode_image
    assert sizes == [(384, 256), (768, 512)]  # each stage's input fitted to its own size: 2x, then 2x
    first, last = (ed.settings_for(w, h, 512, num_inference_steps=4) for w, h in ((384, 256), (768, 512)))
    expected = (ed.unet_cost(384, 256, first, 64, strength=0.5).samples
                + ed.unet_cost(768, 512, last, 64, strength=0.5).samples)
    assert samples == info["unet_samples"] == expected
    assert (info["settings"]["upscale"], info["settings"]["width"]) == (4, 768)
    assert info["settings"]["image_hash"] == ed.image_hash(small)
    with pytest.raises(ValueError, match="one image at a time"):
        sd1("a cat", image=small, upscale=4, num_images_per_prompt=2, **QUIET)
    sizes.clear()  # a tiny picture: no stage below the smallest size (128 px), so its first stage is 3x
    sd1.encode_image = lambda image, tiled=False: sizes.append(image.size) or encode(image, tiled)
    try:
        sd1("a cat", image=PICTURE[:64, :64], width=768, height=768, strength=0.5, num_inference_steps=2, **QUIET)
    finally:
        del sd1.encode_image
    assert sizes == [(192, 192), (384, 384), (768, 768)]
