"""End-to-end checks of the sampler on tiny random models loaded through `from_pretrained`.

Exactness (plain CFG at native size; the independent implementation of the whole loop is in
test_method.py), UNet evaluation counts for every demo preset, seeding, batching invariance,
threads, conditioning details and the fixes of the reference implementation's defects that need a model
(docs/method.md#what-this-project-fixes-in-the-official-implementation).
"""
import concurrent.futures
import threading

import pytest
import torch

import elastic_diffusion as ed

QUIET = dict(progress=False, output_type="latent")


@pytest.fixture(scope="module")
def xl(tiny_sdxl_path):
    return ed.ElasticDiffusion(device="cpu", sd_version=tiny_sdxl_path, view_batch_size=16)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_path):
    return ed.ElasticDiffusion(device="cpu", sd_version=tiny_sd1_path, view_batch_size=16)


class UNetSpy:
    """Forward pre-hook that records the batch size, spatial size and conditioning of each call."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        added = kwargs.get("added_cond_kwargs") or {}
        self.calls.append(dict(shape=tuple(sample.shape), t=int(args[1] if len(args) > 1 else kwargs["timestep"]),
                               sample=sample.detach().clone(), time_ids=added.get("time_ids")))

    @property
    def samples(self):
        return sum(c["shape"][0] for c in self.calls)

    def remove(self):
        self.handle.remove()


def relative_error(a, b):
    """||a - b|| / ||b||: fp32 round-off lands near 1e-7 to 1e-6 after a few DDIM steps."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def expected_cost(sampler, info, batch=1) -> ed.Cost:
    """The cost model's counts for a finished run, from the settings it reports."""
    s = info["settings"]
    return ed.unet_cost(s["width"], s["height"], s, sampler.native_latent, batch, s["view_batch_size"])


# ------------------------------------------------------------------------------ exactness


def _diffusers_latents(sampler, pipe_kwargs, T, omega, latents):
    return sampler.pipe(num_inference_steps=T, guidance_scale=omega, latents=latents.clone(), output_type="latent",
                        **pipe_kwargs).images


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_native_size_without_resampling_equals_plain_cfg_ddim(kind, request):
    path = request.getfixturevalue(f"tiny_{kind}_path")
    sampler = ed.ElasticDiffusion(device="cpu", sd_version=path)
    P, T, omega = sampler.native_px, 4, 7.5
    latents = torch.randn(1, 4, P // 8, P // 8, generator=torch.Generator().manual_seed(0))
    ours, info = sampler("a red house by the sea", "blurry", height=P, width=P, num_inference_steps=T,
                         guidance_scale=omega, resampling_steps=0, rrg_init_weight=0, time_ids_scale=1,
                         latents=latents, **QUIET)
    embeds, pooled = sampler.encode_prompt(["blurry", "a red house by the sea"])
    kwargs = dict(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], height=P, width=P)
    if kind == "sdxl":
        kwargs.update(pooled_prompt_embeds=pooled[1:], negative_pooled_prompt_embeds=pooled[:1])
    reference = _diffusers_latents(sampler, kwargs, T, omega, latents)
    assert info["unet_samples"] == 2 * T  # the local view is the reference's neg sample: plain CFG's cost
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5), (ours - reference).abs().max()


# ------------------------------------------------------------------------------ counts


@pytest.mark.parametrize("preset", ed.DEMO_PRESETS, ids=lambda p: f"{p['width']}x{p['height']}")
def test_unet_sample_count_matches_cost_formula(xl, preset):
    """The counters of a real run (and a forward pre-hook on the UNet) equal the cost model, at every preset."""
    T = 3
    spy = UNetSpy(xl.unet)
    try:
        _, info = xl(preset["prompt"], ed.PRESET_NEGATIVE_PROMPT, height=preset["height"], width=preset["width"],
                     num_inference_steps=T, resampling_steps=preset["resampling_steps"],
                     rrg_init_weight=preset["rrg_init_weight"], seed=0, **QUIET)
    finally:
        spy.remove()
    cost = expected_cost(xl, info)
    assert spy.samples == info["unet_samples"] == cost.samples
    assert len(spy.calls) == info["unet_calls"] == cost.calls
    assert (info["vae_encodes"], info["num_views"]) == (cost.vae_encodes, cost.views)
    assert {c["shape"][1:] for c in spy.calls} == {(4, 128, 128)}  # every UNet input is D x D
    assert all(c["shape"][0] <= 16 for c in spy.calls)
    W, H = preset["width"] // 8, preset["height"] // 8
    h, w = ed.reference_size(preset["height"], preset["width"], 1024)
    crop = (min(H, 128), min(W, 128))
    strips = set(ed.padding_strips(h, w, 128).items()) | set(ed.padding_strips(*crop, 128).items())
    assert info["vae_encodes"] == T * len(strips)  # each strip once per timestep


@pytest.mark.parametrize("width,height,R", [(2048, 2048, None), (1024, 2048, None), (768, 768, None),
                                            (768, 2048, None), (1080, 1920, None), (1024, 1024, 2)])
def test_cost_model_with_a_batch_and_small_calls(xl, width, height, R):
    """Two images per prompt in calls of at most 5 samples: presets 1, 3 and 11, one with padded crops, one
    whose windows are moved back, and the native size with resampling; with and without repaint."""
    for repaint in (True, False):
        _, info = xl(["a corgi", "a cat"], height=height, width=width, num_inference_steps=2, view_batch_size=5,
                     resampling_steps=R, repaint=repaint, seed=0, **QUIET)
        cost = expected_cost(xl, info, batch=2)
        assert (info["unet_samples"], info["unet_calls"], info["vae_encodes"], info["num_views"]) == (
            cost.samples, cost.calls, cost.vae_encodes, cost.views)
        assert max(info["unet_batch_sizes"]) <= 5


# 37 s and 25 s on 2 cores: marked slow. The 50-step counts are also the cost-model table's (test_geometry.py), and
# the cost model equals the sampler's counts at every preset (test_unet_sample_count_matches_cost_formula).
@pytest.mark.slow
@pytest.mark.parametrize("width,height,samples,encodes", [(2048, 2048, 2782, 0), (1024, 2048, 1294, 100)])
def test_unet_sample_count_at_50_steps(xl, width, height, samples, encodes):
    _, info = xl("a corgi", height=height, width=width, num_inference_steps=50, seed=0, **QUIET)
    assert info["unet_samples"] == samples
    assert info["vae_encodes"] == encodes
    assert info["settings"]["resampling_steps"] == (10 if width == 2048 and height == 2048 else 7)


def test_one_unet_call_per_pass_when_the_batch_fits(xl):
    # 2048x1024: main pass 2(R+1) + V = 20 samples, repaint pass 2 + V = 6 samples.
    _, info = xl("a corgi", height=1024, width=2048, num_inference_steps=3, seed=0, view_batch_size=20, **QUIET)
    assert info["settings"]["view_batch_size"] == 20 and xl.view_batch_size == 16
    assert info["unet_calls"] == 3 + 2  # one call per main pass, one per repaint pass
    assert info["unet_samples"] == 3 * 20 + 2 * 6


def test_repaint_structure(xl):
    """R > 0: every step but the last runs a second (repaint) pass at the same t; R = 0: one pass."""
    spy = UNetSpy(xl.unet)
    try:
        xl("x", height=1024, width=2048, num_inference_steps=4, resampling_steps=2, seed=0, **QUIET)
        with_repaint = [(c["t"], c["shape"][0]) for c in spy.calls]
        spy.calls.clear()
        xl("x", height=1024, width=2048, num_inference_steps=4, resampling_steps=0, seed=0, **QUIET)
        without = [(c["t"], c["shape"][0]) for c in spy.calls]
        spy.calls.clear()
        xl("x", height=1024, width=2048, num_inference_steps=4, resampling_steps=1, seed=0, **QUIET)
        one_pass = [(c["t"], c["shape"][0]) for c in spy.calls]
    finally:
        spy.remove()
    # 2048x1024: V = 4; main pass 2(R+1) + V = 10 samples, repaint pass 2 + V = 6; v = 16 holds each pass
    assert with_repaint == [(751, 10), (751, 6), (501, 10), (501, 6), (251, 10), (251, 6), (1, 10)]
    assert without == [(751, 6), (501, 6), (251, 6), (1, 6)]
    assert one_pass == [(751, 8), (751, 6), (501, 8), (501, 6), (251, 8), (251, 6), (1, 8)]  # R = 1 repaints too


# ------------------------------------------------------------------------------ randomness and batching


def test_same_seed_same_image_and_different_seed_differs(xl):
    args = dict(height=1024, width=2048, num_inference_steps=3, **QUIET)
    a, info = xl("a fox", seed=11, **args)
    b, _ = xl("a fox", seed=11, **args)
    c, _ = xl("a fox", seed=12, **args)
    assert info["seed"] == 11
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_generator_and_latents_follow_diffusers_conventions(xl):
    args = dict(height=1024, width=2048, num_inference_steps=2, **QUIET)
    a, _ = xl("a fox", generator=torch.Generator().manual_seed(5), **args)
    b, _ = xl("a fox", generator=torch.Generator().manual_seed(5), **args)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seed or generator"):
        xl("a fox", seed=1, generator=torch.Generator(), **args)
    with pytest.raises(ValueError, match="latents must have shape"):
        xl("a fox", latents=torch.randn(1, 4, 10, 10), **args)


@pytest.mark.parametrize("view_batch_size", [1, 7, 64])
def test_batching_changes_nothing_but_speed(xl, view_batch_size):
    args = dict(height=1080, width=1920, num_inference_steps=3, seed=3, **QUIET)
    reference, ref_info = xl("a lake", **args)
    xl.view_batch_size = view_batch_size
    try:
        other, info = xl("a lake", **args)
    finally:
        xl.view_batch_size = 16
    assert info["unet_samples"] == ref_info["unet_samples"]
    assert relative_error(other, reference) < 1e-5


def test_calls_are_balanced_and_reported(xl):
    # 2048x1024, R = 7, V = 4: main pass 20 samples -> 10 + 10 at v = 16; repaint pass 6 -> one call of 6
    _, info = xl("a lake", height=1024, width=2048, num_inference_steps=3, seed=3, **QUIET)
    assert info["unet_batch_sizes"] == {10: 2 * 3, 6: 2}
    assert info["unet_calls"] == 8 and info["unet_samples"] == 3 * 20 + 2 * 6


def test_batch_of_prompts_equals_single_runs(xl):
    latents = torch.randn(2, 4, 128, 256, generator=torch.Generator().manual_seed(0))
    args = dict(height=1024, width=2048, num_inference_steps=2, resampling_steps=0, **QUIET)
    both, _ = xl(["a cat", "a dog"], ["", "blurry"], latents=latents, seed=0, **args)
    one, _ = xl("a dog", "blurry", latents=latents[1:], seed=0, **args)
    assert both.shape == (2, 4, 128, 256)
    assert relative_error(both[1:], one) < 1e-5


def test_num_images_per_prompt(xl):
    images, info = xl("a cat", height=512, width=1024, num_inference_steps=1, num_images_per_prompt=2, seed=0,
                      progress=False)
    assert len(images) == 2 and images[0].size == (1024, 512)
    assert images[0].tobytes() != images[1].tobytes()


# ------------------------------------------------------------------------------ threads


def idle(sampler, seconds: float = 5) -> bool:
    """No generation holds the sampler: `exclusive()` is granted within `seconds`."""
    entered = threading.Event()

    def enter():
        with sampler.exclusive():
            entered.set()

    threading.Thread(target=enter, daemon=True).start()
    return entered.wait(seconds)


def test_two_threads_do_not_mix_their_runs(xl):
    """Two threads generate at once with different prompts, seeds, sizes and batch sizes: each gets exactly its
    single-threaded result."""
    requests = [dict(prompt="a fox", height=512, width=1024, seed=1, view_batch_size=3),
                dict(prompt="a lighthouse", height=1024, width=768, seed=2, view_batch_size=16)]
    common = dict(num_inference_steps=3, resampling_steps=2, **QUIET)
    alone = [xl(**request, **common)[0] for request in requests]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda request: xl(**request, **common)[0], requests))
    for result, expected in zip(results, alone):
        assert torch.equal(result, expected)


def test_low_vram_switch_and_low_vram_runs_take_the_sampler_alone(tiny_sd1_path):
    sampler = ed.ElasticDiffusion(device="cpu", sd_version=tiny_sd1_path)
    args = dict(height=256, width=512, num_inference_steps=2, seed=0, **QUIET)
    inside, release, events = threading.Event(), threading.Event(), []

    def hold(pipe, step, t, tensors):
        events.append(("run", step))
        inside.set()
        assert release.wait(30)
        return {}

    def run(name, **kwargs):
        sampler("x", **args, **kwargs)
        events.append((name, "done"))

    first = threading.Thread(target=run, args=("first",), kwargs=dict(callback_on_step_end=hold))
    first.start()
    assert inside.wait(30)
    switch = threading.Thread(target=lambda: (sampler.set_low_vram(True), events.append(("switch", "done"))))
    switch.start()
    switch.join(0.5)
    assert switch.is_alive() and sampler.low_vram is False  # waits for the running generation
    release.set()
    first.join(30)
    switch.join(30)
    assert events[-2:] == [("first", "done"), ("switch", "done")] and sampler.low_vram is True
    # Low-VRAM runs move modules between devices: a second one waits for the first.
    inside.clear(), release.clear(), events.clear()
    first = threading.Thread(target=run, args=("first",), kwargs=dict(callback_on_step_end=hold))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    second.join(0.5)
    assert second.is_alive()
    release.set()
    first.join(30)
    second.join(30)
    assert events == [("run", 0), ("run", 1), ("first", "done"), ("second", "done")]
    sampler.set_low_vram(False)
    assert idle(sampler)


def test_a_failed_switch_out_of_low_vram_leaves_a_working_low_vram_sampler(tiny_sd1_path, monkeypatch):
    """Out of memory while moving the models to the device (after the offload hooks came off): the sampler
    goes back to low VRAM, hooks and all, and its next run gives the image it gave before."""
    sampler = ed.ElasticDiffusion(device="cpu", sd_version=tiny_sd1_path, low_vram=True)
    args = dict(height=256, width=512, num_inference_steps=2, seed=0, **QUIET)
    before, _ = sampler("x", **args)
    moves = []
    real_to = sampler.pipe.to

    def out_of_memory_once(*a, **k):
        moves.append(a)
        if len(moves) == 1:
            real_to(*a, **k)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_to(*a, **k)

    monkeypatch.setattr(sampler.pipe, "to", out_of_memory_once)
    with pytest.raises(torch.OutOfMemoryError):
        sampler.set_low_vram(False)
    assert sampler.low_vram is True
    assert type(getattr(sampler.unet, "_hf_hook", None)).__name__ == "CpuOffload"
    assert type(getattr(sampler.text_encoder, "_hf_hook", None)).__name__ == "CpuOffload"
    assert torch.equal(sampler("x", **args)[0], before)
    sampler.set_low_vram(False)
    assert sampler.low_vram is False and getattr(sampler.unet, "_hf_hook", None) is None


# ------------------------------------------------------------------------------ conditioning and padding


def test_sdxl_time_ids_are_four_times_the_size(xl):
    for (width, height), expected in (((2048, 2048), [8192, 8192, 0, 0, 8192, 8192]),
                                      ((1920, 1080), [4320, 7680, 0, 0, 4320, 7680])):
        spy = UNetSpy(xl.unet)
        try:
            xl("x", height=height, width=width, num_inference_steps=1, resampling_steps=0, seed=0, **QUIET)
        finally:
            spy.remove()
        for call in spy.calls:
            assert call["time_ids"].tolist() == [expected] * call["shape"][0]
    spy = UNetSpy(xl.unet)
    try:
        xl("x", height=1024, width=2048, num_inference_steps=1, time_ids_scale=1, seed=0, **QUIET)
    finally:
        spy.remove()
    assert spy.calls[0]["time_ids"][0].tolist() == [1024, 2048, 0, 0, 1024, 2048]


def test_sdxl_embeddings_and_empty_negative_prompt_is_encoded(xl):
    embeds, pooled = xl.encode_prompt(["", "a cat"])
    assert embeds.shape == (2, 77, 64) and pooled.shape == (2, 32)  # tiny: 32 + 32 features
    assert embeds[0].abs().sum() > 0 and pooled[0].abs().sum() > 0  # never zeroed
    assert not torch.allclose(embeds[0], embeds[1])


def test_each_text_encoder_runs_once_per_generation(xl):
    """SDXL's two encoders each run once, on the batch [negatives; prompts] (docs/method.md#fix-text-encoder-runs)."""
    calls = {"text_encoder": [], "text_encoder_2": []}
    hooks = [getattr(xl, name).register_forward_pre_hook(lambda module, args, name=name: calls[name].append(args[0]))
             for name in calls]
    try:
        xl(["a cat", "a dog"], "blurry", height=512, width=1024, num_inference_steps=1, **QUIET)
    finally:
        for hook in hooks:
            hook.remove()
    assert [len(ids) for ids in calls["text_encoder"]] == [len(ids) for ids in calls["text_encoder_2"]] == [4]


def test_the_global_random_state_is_left_untouched(xl):
    """Every draw uses its own generator: the initial noise, the sub-sampler, the re-noising and the padding
    strips (docs/method.md#fix-local-generators)."""
    import random

    import numpy as np

    states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    xl("x", height=1024, width=2048, num_inference_steps=2, resampling_steps=2, seed=0, **QUIET)
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_long_prompt_warns_with_the_cut_text(sd1):
    prompt = " ".join(["word"] * 80) + " tailend"
    with pytest.warns(UserWarning, match="tailend"):
        sd1.encode_prompt([prompt])


def test_background_strips_identical_within_a_step_different_across_steps(xl):
    # 2048x768: H = 96. Reference (48, 128) between 40-row strips; local crops 96 x 128 between 16-row strips.
    spy = UNetSpy(xl.unet)
    try:
        xl("x", height=768, width=2048, num_inference_steps=2, resampling_steps=2, repaint=False, seed=0, **QUIET)
    finally:
        spy.remove()
    by_step = {}
    for call in spy.calls:
        by_step.setdefault(call["t"], []).append(call["sample"])
    assert len(by_step) == 2
    strips = []
    for t, samples in by_step.items():
        stacked = torch.cat(samples)
        assert stacked.shape[0] == 2 * 3 + 4  # 3 reference passes of [neg, pos], then 4 local views
        reference, local = stacked[:6], stacked[6:]
        for group, pad in ((reference, 40), (local, 16)):
            for part in (group[:, :, :pad], group[:, :, 128 - pad:]):  # top and bottom strips
                assert all(torch.equal(part[0], other) for other in part[1:])
        assert not torch.equal(reference[0, :, :16], local[0, :, :16])  # strips of other sizes are drawn apart
        strips.append(reference[0, :, :40])
    assert not torch.allclose(strips[0], strips[1])


def test_native_size_padding_is_one_input(xl):
    """768x768 on SDXL: the latent (96 x 96) is the reference and the one local view, in a 128 canvas."""
    spy = UNetSpy(xl.unet)
    try:
        _, info = xl("x", height=768, width=768, num_inference_steps=2, seed=0, **QUIET)
    finally:
        spy.remove()
    assert info["num_views"] == 1 and info["unet_samples"] == 4 and info["vae_encodes"] == 2 * 4
    for call in spy.calls:  # [neg, pos] of one reference pass: same latent, same strips
        sample = call["sample"]
        assert sample.shape == (2, 4, 128, 128) and torch.equal(sample[0], sample[1])


def test_fp32_direction_on_cpu(xl):
    """The assembled direction stays in the working precision (fp32 here), never fp16
    (docs/method.md#fix-direction-precision)."""
    seen = {}
    original = ed.write_back_direction

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["dtype"] = out.dtype
        return out

    ed.write_back_direction = spy
    try:
        xl("x", height=1024, width=2048, num_inference_steps=1, seed=0, **QUIET)
    finally:
        ed.write_back_direction = original
    assert seen["dtype"] == torch.float32


def test_rrg_changes_the_result_only_when_active(xl):
    args = dict(height=1024, width=2048, num_inference_steps=3, seed=0, resampling_steps=0, **QUIET)
    off, _ = xl("x", rrg_init_weight=0, **args)
    below, _ = xl("x", rrg_init_weight=10, cosine_scale=0, **args)  # lambda = 10 is not > 10
    on, _ = xl("x", rrg_init_weight=1000, **args)
    assert torch.equal(off, below)
    assert not torch.allclose(off, on)


def test_callback_can_replace_latents_and_cancel(xl):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, t, tuple(tensors["latents"].shape), tuple(tensors["x0"].shape)))
        if i == 1:
            raise ed.GenerationCancelled("stop")

    with pytest.raises(ed.GenerationCancelled):
        xl("x", height=512, width=1024, num_inference_steps=5, seed=0, callback_on_step_end=callback, **QUIET)
    assert [s[0] for s in seen] == [0, 1]
    assert seen[0][2] == (1, 4, 64, 128) and seen[0][3] == (1, 4, 64, 128)
    # the sampler serves the next request normally
    images, _ = xl("x", height=512, width=1024, num_inference_steps=1, seed=0, progress=False)
    assert images[0].size == (1024, 512)


def test_stages_before_the_first_step_are_reported_and_can_cancel(xl):
    events = []

    def on_stage(stage, done, total):
        events.append((stage, done, total))

    def on_step(pipe, i, t, tensors):
        events.append(("step", i + 1, 2))
        return {}

    _, info = xl("x", height=512, width=1024, num_inference_steps=2, seed=0, callback_on_stage=on_stage,
                 callback_on_step_end=on_step, **QUIET)
    assert events[0] == ("encode_prompt", 0, 1) and events[-2:] == [("step", 1, 2), ("step", 2, 2)]
    strips = [e for e in events if e[0] == "backgrounds"]
    assert events.index(strips[-1]) < events.index(("step", 1, 2))  # every strip is encoded before step 1
    assert [done for _, done, _ in strips] == sorted(done for _, done, _ in strips)
    assert strips[0][1] == 0 and strips[-1][1] == strips[-1][2] == info["vae_encodes"] > 0

    def cancel(stage, done, total):
        if stage == "backgrounds":
            raise ed.GenerationCancelled("cancelled while encoding padding strips")

    unet_calls = []
    hook = xl.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(1))
    try:
        with pytest.raises(ed.GenerationCancelled):
            xl("x", height=512, width=1024, num_inference_steps=2, seed=0, callback_on_stage=cancel, **QUIET)
    finally:
        hook.remove()
    assert unet_calls == [] and idle(xl)


# ------------------------------------------------------------------------------ decode and memory modes


def test_tiled_decode_is_seamless(xl):
    z = torch.randn(1, 4, 256, 256, generator=torch.Generator().manual_seed(0))
    plain = xl.decode(z, tiled=False, output_type="pt")
    tiled = xl.decode(z, tiled=True, output_type="pt")
    assert tiled.shape == plain.shape == (1, 3, 2048, 2048)
    assert (tiled - plain).abs().mean() < 0.01
    # no step at the tile borders (768 and 1536 px for 1024-px tiles with 25 % overlap)
    step_tiled = (tiled[..., 1:] - tiled[..., :-1]).abs().mean(dim=(0, 1, 2))
    step_plain = (plain[..., 1:] - plain[..., :-1]).abs().mean(dim=(0, 1, 2))
    for border in (767, 1535):
        assert step_tiled[border - 2:border + 3].max() < 1.5 * step_plain[border - 2:border + 3].max() + 1e-3
    assert not getattr(xl.vae, "use_tiling", False)  # tiling switched back off


def test_low_vram_uses_model_offload_and_changes_nothing(xl):
    args = dict(height=1024, width=2048, num_inference_steps=2, seed=0, **QUIET)
    reference, _ = xl("x", **args)
    xl.set_low_vram(True)
    try:
        assert type(getattr(xl.unet, "_hf_hook", None)).__name__ == "CpuOffload"
        offloaded, _ = xl("x", tiled_decoder=True, **dict(args, output_type="pil"))
        latent, _ = xl("x", **args)
    finally:
        xl.set_low_vram(False)
    assert getattr(xl.unet, "_hf_hook", None) is None
    assert torch.equal(reference, latent)
    assert offloaded[0].size == (2048, 1024)


def test_low_vram_runs_end_with_every_model_offloaded(xl, monkeypatch):
    """The offload hooks move a model off the GPU only when the next model of the chain runs, so a run without
    a decode would leave the UNet on the GPU for the next run's text encoders: every low-VRAM run, a latent-output
    or cancelled one too, ends with diffusers' `maybe_free_model_hooks` (all models to the CPU, hooks set again).
    On a CPU every device is the CPU; tests/test_gpu.py checks where the UNet really is on a GPU."""
    freed = []
    free = type(xl.pipe).maybe_free_model_hooks
    monkeypatch.setattr(type(xl.pipe), "maybe_free_model_hooks", lambda pipe: (freed.append(pipe), free(pipe))[1])
    args = dict(height=1024, width=1024, num_inference_steps=2, seed=0, **QUIET)
    xl("x", **args)
    assert freed == []  # normal mode: models stay where they are
    xl.set_low_vram(True)
    try:
        xl("x", **args)
        assert freed == [xl.pipe]

        def cancel(pipe, step, t, tensors):
            raise ed.GenerationCancelled("stop")

        with pytest.raises(ed.GenerationCancelled):
            xl("x", callback_on_step_end=cancel, **args)
        assert freed == [xl.pipe, xl.pipe]
        assert type(getattr(xl.unet, "_hf_hook", None)).__name__ == "CpuOffload"  # still in low-VRAM mode
    finally:
        xl.set_low_vram(False)


def test_from_pipe_reuses_components(xl):
    other = ed.ElasticDiffusion.from_pipe(xl.pipe, device="cpu")
    assert other.unet is xl.unet and other.vae is xl.vae and other.text_encoder_2 is xl.text_encoder_2
    assert other.is_sdxl and other.native_latent == 128 and other.native_px == 1024


def _module_state(pipe):
    return {name: (m.dtype, m.device, hasattr(m, "_hf_hook")) for name, m in pipe.components.items()
            if isinstance(m, torch.nn.Module)}


def test_from_pipe_leaves_the_callers_pipeline_as_it_was(tiny_sdxl_path):
    """An fp16 SDXL pipeline (whose VAE must be upcast to decode): the sampler shares every module but the
    VAE, which it upcasts in a copy; the caller's pipeline keeps its dtypes, devices and has no hooks."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    caller = DiffusionPipeline.from_pretrained(tiny_sdxl_path, dtype=torch.float16)
    before = _module_state(caller)
    sampler = ed.ElasticDiffusion.from_pipe(caller, device="cpu")
    assert _module_state(caller) == before and caller.vae.dtype == torch.float16
    assert sampler.unet is caller.unet and sampler.text_encoder_2 is caller.text_encoder_2
    assert sampler.vae is not caller.vae and sampler.vae.dtype == torch.float32  # bf16 on GPUs that have it
    assert sampler.pipe is not caller and sampler.pipe.vae is sampler.vae
    ed.share_pipeline(sampler.pipe, scheduler=DDIMScheduler.from_config(caller.scheduler.config))
    assert _module_state(caller) == before  # diffusers' from_pipe would have cast everything to fp32
    with pytest.raises(ValueError, match="torch_dtype.*does not convert"):
        ed.ElasticDiffusion.from_pipe(caller, device="cpu", torch_dtype=torch.float32)
    assert _module_state(caller) == before


def test_from_pipe_runs_the_callers_lora(tiny_sd1_path, tmp_path):
    """A UNet LoRA saved and loaded the diffusers way (a peft adapter in the shared UNet): at the
    native size without resampling the sampler equals diffusers' own pipeline with the LoRA, at 2x the LoRA
    changes the image, and unloading it brings back the base model's pixels."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trainer = DiffusionPipeline.from_pretrained(tiny_sd1_path)
    torch.manual_seed(0)  # init_lora_weights=False: random A and B, so the adapter is not the identity
    trainer.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(trainer.unet))

    pipe = DiffusionPipeline.from_pretrained(tiny_sd1_path)
    sampler = ed.ElasticDiffusion.from_pipe(pipe, device="cpu")
    P, T = sampler.native_px, 3
    native = dict(height=P, width=P, num_inference_steps=T, guidance_scale=7.5, resampling_steps=0, rrg_init_weight=0,
                  **QUIET)
    latents = torch.randn(1, 4, P // 8, P // 8, generator=torch.Generator().manual_seed(0))
    wide = dict(height=P, width=2 * P, num_inference_steps=T, seed=1, **QUIET)
    base_native, _ = sampler("a red house", "", latents=latents, **native)
    base_wide, _ = sampler("a red house", "", **wide)

    pipe.load_lora_weights(tmp_path, adapter_name="tiny")
    with_lora, _ = sampler("a red house", "", latents=latents, **native)
    embeds, _ = sampler.encode_prompt(["", "a red house"])
    reference = _diffusers_latents(sampler, dict(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1],
                                                 height=P, width=P), T, 7.5, latents)
    assert torch.allclose(with_lora, reference, atol=1e-5, rtol=1e-5), (with_lora - reference).abs().max()
    assert (with_lora - base_native).abs().max() > 1e-2
    assert (sampler("a red house", "", **wide)[0] - base_wide).abs().max() > 1e-2

    pipe.unload_lora_weights()
    assert torch.equal(sampler("a red house", "", **wide)[0], base_wide)


def test_half_precision_loads_the_fp16_variant(tmp_path):
    """A folder with both weight sets: fp16/bf16 loads read the fp16 variant files, fp32 loads the full
    ones; with one set only, that one is used. (The two sets hold different weights here, to tell them apart.)"""
    from tiny_models import build_tiny_pipeline

    full, half = build_tiny_pipeline("sd1", seed=0), build_tiny_pipeline("sd1", seed=1).to(torch.float16)
    full.save_pretrained(tmp_path / "both")
    half.save_pretrained(tmp_path / "both", variant="fp16")
    full.save_pretrained(tmp_path / "full")
    half.save_pretrained(tmp_path / "half", variant="fp16")
    weight = lambda pipe: pipe.unet.conv_in.weight  # noqa: E731
    for folder, dtype, source in (("both", torch.float16, half), ("both", torch.bfloat16, half),
                                  ("both", torch.float32, full), ("full", torch.float16, full),
                                  ("half", torch.float32, half)):
        loaded = ed.load_pipeline(str(tmp_path / folder), dtype)
        assert weight(loaded).dtype == dtype
        assert torch.equal(weight(loaded), weight(source).to(dtype)), (folder, dtype)


def test_sd2_model_runs_and_reads_geometry_from_config(tiny_sd2_path):
    sampler = ed.ElasticDiffusion(device="cpu", sd_version=tiny_sd2_path)
    assert (sampler.is_sdxl, sampler.native_latent, sampler.native_px, sampler.vae_scale_factor) == (False, 64, 512, 8)
    images, info = sampler("a cat", height=512, width=1024, num_inference_steps=2, seed=0, progress=False)
    assert images[0].size == (1024, 512)
    assert info["reference_size"] == (32, 64)


# ------------------------------------------------------------------------------ info and compatibility


def test_verbose_info_reports_what_was_used(xl):
    images, info = xl("a cat", height=1024, width=2048, num_inference_steps=2, seed=7, progress=False)
    s = info["settings"]
    assert (s["width"], s["height"], s["resampling_steps"], s["rrg_init_weight"], s["new_p"]) == (2048, 1024, 7, 1000.0, 0.3)
    assert info["seed"] == 7 and info["unet_samples"] == expected_cost(xl, info).samples == 2 * (2 * 8 + 4) + 6
    assert set(info["timings"]) >= {"encode_prompt", "backgrounds", "denoise", "decode", "total"}
    assert info["peak_memory_gib"] is None  # CPU
    assert images[0].size == (2048, 1024)


def test_generate_image_official_signature_and_drop_p(xl):
    images, info = xl.generate_image(prompts="a cat", negative_prompts="blurry", height=512, width=1024,
                                     num_inference_steps=1, guidance_scale=10.0, resampling_steps=2, drop_p=0.7,
                                     rrg_init_weight=1000, cosine_scale=10, tiled_decoder=False,
                                     repaint_sampling=False, progress=False)
    assert images[0].size == (1024, 512)
    assert info["settings"]["new_p"] == pytest.approx(0.3) and info["settings"]["repaint"] is False
    with pytest.raises(ValueError, match="drop_p"):
        xl.generate_image("a cat", height=512, width=1024, drop_p=0.7, new_p=0.5)
    _, info = xl.generate_image("a cat", height=512, width=1024, num_inference_steps=1, drop_p=0.7, new_p=0.3,
                                progress=False)
    assert info["settings"]["new_p"] == pytest.approx(0.3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(width=1000 + 4), "multiple of 8"),
    (dict(height=2056), "between 128 and 2048"),
    (dict(width=64), "width must be at least 128 pixels"),
    (dict(width=1024.0), "integer"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(new_p=0.0), "new_p"),
    (dict(new_p=1.5), "new_p"),
    (dict(patch_size=200), "patch_size"),
    (dict(patch_size=0), "patch_size"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(rrg_init_weight=float("inf")), "rrg_init_weight"),
    (dict(resampling_steps=-1), "resampling_steps"),
    (dict(rrg_stop_t=1.0), "rrg_stop_t"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(time_ids_scale=2), "time_ids_scale"),
])
def test_bad_input_is_a_clear_error(xl, kwargs, match):
    args = dict(prompt="a cat", height=1024, width=1024, num_inference_steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        xl(**args)


@pytest.mark.parametrize("source,match", [
    ("3.0", "unknown"),
    ("/nonexistent/folder", "does not exist"),
    ("./missing.safetensors", "does not exist"),
])
def test_bad_model_source(source, match):
    with pytest.raises(ValueError, match=match):
        ed.load_pipeline(source)


def test_non_diffusers_folder_and_pickle_checkpoint(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="model_index.json"):
        ed.load_pipeline(str(tmp_path))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(ValueError, match="allow_pickle"):
        ed.load_pipeline(str(ckpt))


def test_model_keys_map_to_hub_ids():
    assert ed.MODEL_IDS["XL1.0"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert ed.MODEL_IDS["2.0"] == "stabilityai/stable-diffusion-2-base"
    assert set(ed.MODEL_IDS) == {"1.4", "1.5", "2.0", "2.1", "XL1.0", "3.5-medium", "3.5-large"}


# ---------------------------------------------------------- beyond 2x (docs/method.md#fix-general-sub-sampler)


def test_beyond_twice_native_is_refused_by_default_and_runs_when_allowed(sd1):
    with pytest.raises(ValueError, match="max_scale"):
        sd1("a city", height=512, width=1536, num_inference_steps=1, progress=False)
    wider = ed.ElasticDiffusion.from_pipe(sd1.pipe, max_scale=3)  # the same modules, a larger size limit
    assert (sd1.max_scale, wider.max_scale) == (ed.MAX_SCALE, 3)
    assert ed.sampler_kwargs(ed.build_parser().parse_args(["--max_scale", "3"]))["max_scale"] == 3  # the CLI's flag
    with pytest.raises(ValueError, match="max_scale must be >= 1; got 0"):
        ed.ElasticDiffusion.from_pipe(sd1.pipe, max_scale=0)
    spy = UNetSpy(sd1.unet)
    try:
        images, info = wider("a city", height=512, width=1536, num_inference_steps=2, seed=0, progress=False)
    finally:
        spy.remove()
    # 1536x512 on SD 1 (native 512 px = 64 latent): reference (21, 64), groups of 3 columns
    assert info["reference_size"] == (21, 64) and images[0].size == (1536, 512)
    V = len(ed.local_views(64, 192, 64, 32))
    assert V == 6 and info["settings"]["resampling_steps"] == 10
    assert spy.samples == expected_cost(sd1, info).samples == 2 * (2 * 11 + V) + (2 + V)


def test_general_subsampler_at_three_times():
    H, W, h, w = 192, 192, 64, 64
    counts = ed.candidate_counts(H, W, h, w)
    assert counts.unique().tolist() == [9]
    cells = ed.choose_cells(30, counts, 0.3, torch.Generator().manual_seed(0))
    rows, cols = ed.source_indices(cells, H, W)
    hit = torch.zeros(H * W, dtype=torch.bool)
    for r, c in zip(rows, cols):
        flat = (r * W + c).flatten()
        assert flat.unique().numel() == h * w  # one distinct source pixel per cell in every pass
        hit[flat] = True
    assert hit.float().mean() > 0.9  # the 9 candidates of every cell get visited over the passes


@pytest.mark.slow  # about 2 minutes of inductor compilation on 2 CPU cores: `make test ARGS="-m slow"`
def test_compiled_unet_same_image_and_no_recompile_on_new_size(tiny_sdxl_path):
    import torch._dynamo

    args = dict(num_inference_steps=2, seed=0, progress=False, output_type="latent")
    eager = ed.ElasticDiffusion(device="cpu", sd_version=tiny_sdxl_path, view_batch_size=8)
    compiled = ed.ElasticDiffusion(device="cpu", sd_version=tiny_sdxl_path, view_batch_size=8, compile_unet=True)
    assert compiled.compiled
    reference, _ = eager("x", height=1024, width=2048, **args)
    torch._dynamo.utils.counters.clear()
    out, _ = compiled("x", height=1024, width=2048, **args)
    assert relative_error(out, reference) < 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the counter does count compiles
    torch._dynamo.utils.counters.clear()
    _, info = compiled("x", height=768, width=2048, resampling_steps=5, **args)  # other size and batches
    assert 8 in info["unet_batch_sizes"]  # the first image ran batches of 7 and 6 only
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_single_file_checkpoints_route_to_the_right_diffusers_loader(tmp_path, monkeypatch):
    """A .safetensors file goes through diffusers' own `from_single_file` of the architecture its keys
    name (the conversion itself needs the original configs from the hub, so it is not run here)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    calls = []
    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", classmethod(lambda c, path, **kw: calls.append((c, path, kw))))
    xl_file, sd_file = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, str(xl_file))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, str(sd_file))
    ed.load_pipeline(str(xl_file), torch.float16)
    ed.load_pipeline(str(sd_file))
    assert [c for c, _, _ in calls] == [StableDiffusionXLPipeline, StableDiffusionPipeline]
    assert calls[0][1] == str(xl_file) and calls[0][2]["dtype"] == torch.float16
