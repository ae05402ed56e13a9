"""Checks that the offline fixtures behave like the real Stable Diffusion models.

The sampler's tests rely on these properties (token ids, pad ids, embedding
widths, latent sizes, VAE factor); if a library upgrade changes them, these
tests fail first and point at the fixture rather than at the sampler.
"""

import os

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import AutoTokenizer, CLIPTokenizer

from tiny_models import TOKENIZER_EOS_PAD, TOKENIZER_ZERO_PAD, build_tiny_controlnet, build_tiny_pipeline

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("folder, pad_id", [(TOKENIZER_EOS_PAD, 49407), (TOKENIZER_ZERO_PAD, 0)])
@pytest.mark.parametrize("cls", [CLIPTokenizer, AutoTokenizer])
def test_tokenizer_ids(cls, folder, pad_id):
    tok = cls.from_pretrained(folder)
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == CAT_IDS
    padded = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert tok.model_max_length == 77 and len(padded) == 77
    assert padded[: len(CAT_IDS)] == CAT_IDS
    assert padded[76] == pad_id and tok.pad_token_id == pad_id


@pytest.fixture(scope="module")
def loaded(tiny_sd1_path, tiny_sd2_path, tiny_sdxl_path):
    paths = {"sd1": tiny_sd1_path, "sd2": tiny_sd2_path, "sdxl": tiny_sdxl_path}
    return {k: DiffusionPipeline.from_pretrained(p, use_safetensors=True) for k, p in paths.items()}


@pytest.mark.parametrize(
    "kind, cls, sample_size, pad_ids",
    [
        ("sd1", StableDiffusionPipeline, 64, (49407,)),
        ("sd2", StableDiffusionPipeline, 64, (0,)),
        ("sdxl", StableDiffusionXLPipeline, 128, (49407, 0)),
    ],
)
def test_pipeline_round_trip(loaded, kind, cls, sample_size, pad_ids):
    pipe = loaded[kind]
    assert type(pipe) is cls
    assert pipe.unet.config.sample_size == sample_size
    assert pipe.vae_scale_factor == 8
    toks = [pipe.tokenizer] + ([pipe.tokenizer_2] if kind == "sdxl" else [])
    assert tuple(t.pad_token_id for t in toks) == pad_ids
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.steps_offset, sched.timestep_spacing) == ("scaled_linear", 1, "leading")
    size = sample_size * pipe.vae_scale_factor
    out = pipe("a photo of a cat", num_inference_steps=2, height=size, width=size, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, size, size, 3)
    assert np.isfinite(out.images).all()


def test_weights_deterministic(loaded):
    fresh = build_tiny_pipeline("sd1", seed=0)
    for a, b in zip(fresh.unet.state_dict().values(), loaded["sd1"].unet.state_dict().values()):
        assert torch.equal(a, b)


def test_sdxl_prompt_embeddings(loaded):
    pipe = loaded["sdxl"]
    ids = pipe.tokenizer_2("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out1 = pipe.text_encoder(ids, output_hidden_states=True)
        out2 = pipe.text_encoder_2(ids, output_hidden_states=True)
        embeds, _, pooled, _ = pipe.encode_prompt("a photo of a cat", device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False)
    assert out1.hidden_states[-2].shape == (1, 77, 32)
    assert out2.hidden_states[-2].shape == (1, 77, 32)
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)
    # pooled (text_embeds) comes from the first <|endoftext|>, not from the padding
    eos = CAT_IDS.index(49407)
    expected = pipe.text_encoder_2.text_projection(out2.last_hidden_state[:, eos])
    torch.testing.assert_close(out2.text_embeds, expected)
    assert pipe.unet.config.projection_class_embeddings_input_dim == 32 + 6 * 8


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_controlnet_forward(loaded, kind, tmp_path):
    unet = loaded[kind].unet
    controlnet = build_tiny_controlnet(unet, tmp_path / "controlnet")
    assert os.path.isfile(tmp_path / "controlnet" / "config.json")
    lat, batch = unet.config.sample_size, 2
    x = torch.randn(batch, 4, lat, lat)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim)
    extra = {}
    if kind == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)}
    with torch.no_grad():
        down, mid = controlnet(x, 500, context, controlnet_cond=torch.rand(batch, 3, 8 * lat, 8 * lat),
                               return_dict=False, **extra)
        out = unet(x, 500, context, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                   **extra).sample
    assert out.shape == x.shape
