"""What only a CUDA GPU can check: the real SDXL architecture in half precision, where the memory modes
really put the models, out-of-memory handling, and torch.compile's CUDA kernels.

The models are the real SDXL architecture with random weights, built by `benchmarks/benchmark.py`'s
builders (nothing is downloaded). Every check is short (T = 2); the whole file takes a few minutes on
an H100/H200. `benchmarks/gpu_check.sh` runs it (`-rA` shows each test's printed figures). Without CUDA
every test is skipped with the reason below; the CPU suite checks the same code paths with tiny models.
"""
import gc
import os

import pytest
import torch

import elastic_diffusion as ed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (real SDXL architecture in fp16; run benchmarks/gpu_check.sh on one)"),
]

PROMPT = ed.DEMO_PRESETS[0]["prompt"]
FAST = dict(num_inference_steps=2, seed=0, progress=False)
GiB = 2 ** 30


def _benchmark_script():
    from test_benchmark_smoke import _load_benchmark  # the one loader of benchmarks/benchmark.py

    return _load_benchmark()


@pytest.fixture(scope="module")
def bm():
    return _benchmark_script()


@pytest.fixture(scope="module")
def pipe(bm):
    """The real SDXL pipeline, fp16 weights built directly on the GPU (the sampler's default dtype on CUDA)."""
    pipe, _ = bm.build_real_pipeline("sdxl", torch.device("cuda"), torch.float16, seed=0)
    yield pipe
    del pipe
    gc.collect()
    torch.cuda.empty_cache()


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def on_gpu(module: torch.nn.Module) -> bool:
    return next(module.parameters()).device.type == "cuda"


def allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fp16_unet_and_bf16_vae_give_finite_images_at_2048(pipe):
    sampler = ed.ElasticDiffusion.from_pipe(pipe)
    assert sampler.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16
    assert sampler.vae.dtype == torch.bfloat16  # the SDXL VAE overflows in fp16: a bf16 copy decodes
    finite = []

    def watch(_, step, t, tensors):
        finite.append(bool(torch.isfinite(tensors["latents"]).all()) and bool(torch.isfinite(tensors["x0"]).all()))

    images, info = sampler(PROMPT, height=2048, width=2048, output_type="pt", callback_on_step_end=watch, **FAST)
    print(f"2048x2048 fp16 UNet + bf16 VAE: peak {info['peak_memory_gib']:.2f} GiB allocated, "
          f"image mean {images.mean():.3f} std {images.std():.3f}")
    assert info["settings"]["resampling_steps"] == 10 and info["num_views"] == 16
    assert info["unet_samples"] == 2 * (2 * 11 + 16) + (2 + 16)  # T = 2: two main passes, one repaint pass
    assert finite == [True, True]
    assert images.shape == (1, 3, 2048, 2048) and images.dtype == torch.float32
    assert torch.isfinite(images).all()  # clamp keeps NaN: a NaN anywhere in the decode shows here
    assert images.std() > 0


def test_low_vram_keeps_the_unet_off_the_gpu_outside_the_loop(pipe):
    unet_bytes = module_bytes(pipe.unet)
    sampler = ed.ElasticDiffusion.from_pipe(pipe, low_vram=True)
    try:
        gc.collect()
        torch.cuda.empty_cache()
        idle = allocated()
        assert not on_gpu(sampler.unet)
        assert idle < 0.1 * unet_bytes  # no model of the sampler on the GPU (the fixture's own fp16 VAE is)
        seen = []

        def stage(name, done, total):
            seen.append((name, on_gpu(sampler.unet), on_gpu(sampler.text_encoder_2), allocated()))

        def step(_, i, t, tensors):
            seen.append(("step", on_gpu(sampler.unet), on_gpu(sampler.text_encoder_2), allocated()))

        for output_type in ("pt", "latent"):  # with and without a decode at the end
            seen.clear()
            images, info = sampler(PROMPT, height=1024, width=2048, output_type=output_type,
                                   callback_on_stage=stage, callback_on_step_end=step, **FAST)
            del images
            after = allocated()
            print(f"low_vram, {output_type}: idle {idle / GiB:.2f} GiB, before the loop "
                  f"{max(m for n, *_, m in seen if n != 'step') / GiB:.2f} GiB, in the loop "
                  f"{min(m for n, *_, m in seen if n == 'step') / GiB:.2f}-{max(m for n, *_, m in seen if n == 'step') / GiB:.2f} "
                  f"GiB, after {after / GiB:.2f} GiB, peak {info['peak_memory_gib']:.2f} GiB; UNet {unet_bytes / GiB:.2f} GiB")
            before_loop = [s for s in seen if s[0] != "step"]
            in_loop = [s for s in seen if s[0] == "step"]
            assert {s[0] for s in before_loop} >= {"encode_prompt", "backgrounds"} and len(in_loop) == 2
            assert not any(unet for _, unet, _, _ in before_loop)  # prompt encoding and background encodes
            assert all(unet and not text for _, unet, text, _ in in_loop)
            assert all(memory >= idle + unet_bytes for *_, memory in in_loop)  # the figures do see the UNet
            assert not on_gpu(sampler.unet)
            assert after - idle < 0.02 * unet_bytes  # every model and the run's tensors left the GPU
    finally:
        sampler.set_low_vram(False)
    assert on_gpu(pipe.unet)


def test_controlnet_low_vram_never_holds_the_whole_pipeline(bm, pipe):
    from elastic_diffusion_w_controlnet import ElasticDiffusionControlNet

    controlnet = bm.build_controlnet(pipe.unet, torch.device("cuda"), torch.float16)
    sampler = ElasticDiffusionControlNet.from_pipe(pipe, controlnet_model=controlnet, low_vram=True)
    models = {name: getattr(sampler, name) for name in ("text_encoder", "text_encoder_2", "unet", "controlnet", "vae")}
    sizes = {name: module_bytes(m) for name, m in models.items()}
    whole = sum(sizes.values())
    records, handles = [], []
    # Forward hooks run after accelerate's offload hook has placed the module: what is on the GPU during it.
    watched = {**{n: m for n, m in models.items() if n != "vae"}, "vae": sampler.vae.decoder,
               "vae_encoder": sampler.vae.encoder}
    for name, module in watched.items():
        handles.append(module.register_forward_hook(
            lambda m, args, out, name=name: records.append(
                (name, {n for n, model in models.items() if on_gpu(model)}, allocated()))))
    condition = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "imgs", "input",
                             "astronaut.jpg")
    try:
        gc.collect()
        torch.cuda.empty_cache()
        idle = allocated()
        assert not any(on_gpu(m) for m in models.values())
        # 1024x2048: prompt, background encodes, loop, decode. 1024x1024 with 2 samples per call: the peak.
        _, wide = sampler(PROMPT, condition_image=condition, height=1024, width=2048, view_batch_size=4,
                          output_type="pt", **FAST)
        _, square = sampler(PROMPT, condition_image=condition, height=1024, width=1024, view_batch_size=2,
                            output_type="pt", **FAST)
        after = allocated()
    finally:
        for handle in handles:
            handle.remove()
        sampler.set_low_vram(False)
        del sampler, controlnet
        gc.collect()
        torch.cuda.empty_cache()
    print(f"ControlNet low_vram: models {', '.join(f'{n} {b / GiB:.2f}' for n, b in sizes.items())} GiB, "
          f"together {whole / GiB:.2f} GiB; peak 1024x2048 (v=4) {wide['peak_memory_gib']:.2f} GiB, "
          f"1024x1024 (v=2) {square['peak_memory_gib']:.2f} GiB; idle {idle / GiB:.2f}, after {after / GiB:.2f} GiB")
    assert wide["controlnet_samples"] == wide["unet_samples"] and square["controlnet_samples"] == square["unet_samples"]
    names = {name for name, *_ in records}
    assert names == {"text_encoder", "text_encoder_2", "unet", "controlnet", "vae", "vae_encoder"}
    for name, resident, memory in records:
        assert resident != set(models), f"the whole pipeline was on the GPU during {name}"
        if name == "unet":
            assert {"unet", "controlnet"} <= resident and not resident & {"text_encoder", "text_encoder_2"}
        if name == "vae":  # the decode
            assert not resident & {"unet", "controlnet"}
        assert memory < idle + whole
    assert square["peak_memory_gib"] * GiB < whole  # weights held at once plus activations < all the weights
    assert after - idle < 0.02 * sizes["unet"]


def test_out_of_memory_gives_advice_and_the_next_call_works(pipe):
    sampler = ed.ElasticDiffusion.from_pipe(pipe)
    gc.collect()
    torch.cuda.empty_cache()
    base = allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    # 2 GiB above what the models hold: one call of all 38 samples of a 2048^2 main pass cannot fit.
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 2 * GiB) / total))
    try:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            sampler(PROMPT, height=2048, width=2048, view_batch_size=38, output_type="latent", **FAST)
        message = str(caught.value)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    del caught  # its traceback holds the failed run's frames
    gc.collect()
    torch.cuda.empty_cache()
    leftover = allocated() - base
    print(f"OOM at view_batch_size=38 under a {base / GiB:.2f} + 2 GiB cap; left allocated after it: "
          f"{leftover / 2 ** 20:.1f} MiB; message: {message[:160]}...")
    assert message.startswith("out of GPU memory:")
    assert "view_batch_size (now 38;" in message and "low_vram=True" in message and "tiled_decoder=True" in message
    assert leftover < 64 * 2 ** 20
    with sampler.exclusive():  # the failed run left nothing holding the sampler (this would wait)
        pass
    images, info = sampler(PROMPT, height=1024, width=2048, output_type="pt", **FAST)
    assert images.shape == (1, 3, 1024, 2048) and torch.isfinite(images).all()


def test_compiled_unet_gives_the_eager_image(pipe):
    """compile_unet=True on CUDA (Triton kernels, dynamic batch): the eager result within fp16 tolerance, and one
    compilation serves a second size. 1e-2 is about 20x fp16's unit roundoff (4.9e-4): room for the
    different reduction orders of fused kernels over two steps, far below any real difference."""
    import torch._dynamo

    eager = ed.ElasticDiffusion.from_pipe(pipe)
    compiled = ed.ElasticDiffusion.from_pipe(pipe, compile_unet=True)
    args = dict(height=2048, width=2048, output_type="latent", **FAST)
    reference, _ = eager(PROMPT, **args)
    torch._dynamo.utils.counters.clear()
    out, info = compiled(PROMPT, **args)
    first_call = info["timings"]["total"]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    latent_error = relative_error(out, reference)
    image_error = relative_error(eager.decode(out, output_type="pt"), eager.decode(reference, output_type="pt"))
    torch._dynamo.utils.counters.clear()
    _, other = compiled(PROMPT, height=1024, width=2048, output_type="latent", **FAST)  # other batch sizes
    print(f"compiled UNet: first call {first_call:.1f} s ({graphs} graph(s)), relative error latent "
          f"{latent_error:.2e}, image {image_error:.2e}; second size batch sizes {other['unet_batch_sizes']}, "
          f"{torch._dynamo.utils.counters['stats']['unique_graphs']} graph(s) compiled for it")
    assert graphs >= 1  # the counter does count compiles
    assert latent_error < 1e-2 and image_error < 1e-2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    assert set(other["unet_batch_sizes"]) - set(info["unet_batch_sizes"])  # it did run new batch sizes
