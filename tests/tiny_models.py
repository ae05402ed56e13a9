"""Tiny random-weight Stable Diffusion pipelines for offline tests.

The sampler must be tested against the real diffusers code paths (prompt
encoding, VAE scaling, UNet/ControlNet calls, scheduler config) without
downloading gigabytes of weights. These builders create pipelines whose
*geometry* matches the real models — CLIP tokenizers with the real ids, 77
tokens, VAE scale factor 8, UNet ``sample_size`` 64 (SD 1.x/2.x) or 128
(SDXL), SDXL's ``text_time`` conditioning — but whose networks are tiny
(UNet ~0.1M parameters, 4-32 channels), so a denoising step at 128x128
latents costs milliseconds on a CPU.

Tests save them with ``save_pretrained`` (see ``conftest.py``) and load them
back through ``DiffusionPipeline.from_pretrained(folder)``, exactly as a user
loads a real checkpoint.

Deliberate deviations from the real models, to keep things cheap:

* the UNet has four levels (downsampling factor 8, like SD 1.x/2.x; real
  SDXL has three, factor 4) and attention only at its lowest resolution;
* the VAE has no mid-block attention (a 2048x2048 decode would otherwise
  attend over 65,536 tokens).

The tokenizer folders come from ``tests/make_clip_tokenizer.py``.
"""

from __future__ import annotations

import os

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOKENIZER_EOS_PAD = os.path.join(FIXTURES, "clip_tokenizer")  # pads with <|endoftext|> (49407)
TOKENIZER_ZERO_PAD = os.path.join(FIXTURES, "clip_tokenizer_pad0")  # pads with "!" (0)

KINDS = ("sd1", "sd2", "sdxl", "sd3")
TEXT_HIDDEN = 32  # width of every tiny text encoder
ADD_TIME_DIM = 8  # SDXL addition_time_embed_dim


def _tokenizer(folder: str) -> CLIPTokenizer:
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        raise FileNotFoundError(f"{folder} missing: run `python tests/make_clip_tokenizer.py`")
    return CLIPTokenizer.from_pretrained(folder)


def _text_config(hidden_act: str, pad_token_id: int, projection_dim: int = TEXT_HIDDEN) -> CLIPTextConfig:
    # eos_token_id must be the real 49407 (not the legacy 2): CLIPTextModel then
    # pools at the first <|endoftext|> position, whatever the pad token is.
    return CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


def _vae(kind: str) -> AutoencoderKL:
    sdxl, sd3 = kind == "sdxl", kind == "sd3"
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),  # four blocks -> scale factor 8
        layers_per_block=1,
        norm_num_groups=2,
        latent_channels=16 if sd3 else 4,
        sample_size=1024 if sdxl else 512,
        scaling_factor=1.5305 if sd3 else 0.13025 if sdxl else 0.18215,
        shift_factor=0.0609 if sd3 else None,  # SD3's latents are shifted and scaled
        use_quant_conv=not sd3,
        use_post_quant_conv=not sd3,
        force_upcast=True,
        mid_block_add_attention=False,
    )


def _unet(kind: str) -> UNet2DConditionModel:
    kwargs = dict(
        sample_size=128 if kind == "sdxl" else 64,
        in_channels=4,
        out_channels=4,
        # Four levels (3 downsamplings): attention runs at 1/8 of the latent
        # size only, i.e. 16x16 tokens for a 128x128 latent.
        block_out_channels=(4, 8, 16, 16),
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        norm_num_groups=4,
        # diffusers' legacy naming: this is the number of heads per block.
        attention_head_dim=(1, 2, 4, 4),
        cross_attention_dim=2 * TEXT_HIDDEN if kind == "sdxl" else TEXT_HIDDEN,
        use_linear_projection=kind != "sd1",
    )
    if kind == "sdxl":
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=ADD_TIME_DIM,
            projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * ADD_TIME_DIM,
            transformer_layers_per_block=1,
        )
    return UNet2DConditionModel(**kwargs)


def _scheduler() -> DDIMScheduler:
    # The real Stable Diffusion (1.x, 2.x base, XL) DDIM configuration.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _sd3_pipeline(vae: AutoencoderKL) -> StableDiffusion3Pipeline:
    """SD 3.5's layout (16-channel latents in 2 x 2 patches, the shift-3 flow schedule, two CLIP encoders with
    projections) on a 2-layer transformer, without the optional T5, at half SD 3.5's native size: 512 px
    (64 x 64 latents, 1,024 tokens; at 1024 px a sample would cost 10x more)."""
    transformer = SD3Transformer2DModel(
        sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=2 * TEXT_HIDDEN, caption_projection_dim=16,
        pooled_projection_dim=2 * TEXT_HIDDEN, pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=CLIPTextModelWithProjection(_text_config("quick_gelu", pad_token_id=49407)),
        tokenizer=_tokenizer(TOKENIZER_EOS_PAD),
        text_encoder_2=CLIPTextModelWithProjection(_text_config("gelu", pad_token_id=0)),
        tokenizer_2=_tokenizer(TOKENIZER_ZERO_PAD), text_encoder_3=None, tokenizer_3=None)


def build_tiny_pipeline(kind: str, seed: int = 0):
    """Return an in-memory tiny pipeline; ``kind`` is "sd1", "sd2", "sdxl" or "sd3" (SD 3.5's layout)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    vae = _vae(kind)
    if kind == "sd3":
        return _sd3_pipeline(vae)
    unet = _unet(kind)
    scheduler = _scheduler()
    if kind == "sd1":
        text_encoder = CLIPTextModel(_text_config("quick_gelu", pad_token_id=49407))
        tokenizer = _tokenizer(TOKENIZER_EOS_PAD)
    elif kind == "sd2":
        text_encoder = CLIPTextModel(_text_config("gelu", pad_token_id=0))
        tokenizer = _tokenizer(TOKENIZER_ZERO_PAD)
    else:
        text_encoder = CLIPTextModel(_text_config("quick_gelu", pad_token_id=49407))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config("gelu", pad_token_id=0))
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=_tokenizer(TOKENIZER_EOS_PAD),
            tokenizer_2=_tokenizer(TOKENIZER_ZERO_PAD),
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(kind: str, folder) -> str:
    """Build the tiny ``kind`` pipeline, save it as safetensors in ``folder``, return the path."""
    folder = os.fspath(folder)
    build_tiny_pipeline(kind).save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_controlnet(unet: UNet2DConditionModel, folder=None) -> ControlNetModel:
    """ControlNet mirroring ``unet`` (weights copied from it); saved to ``folder`` if given.

    Its conditioning image is RGB at 8x the latent size: the four conditioning
    channels give three stride-2 convolutions, i.e. a factor 8.
    """
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 8, 8))
    if folder is not None:
        controlnet.save_pretrained(os.fspath(folder), safe_serialization=True)
    return controlnet


def save_tiny_controlnet(model_path, folder, seed: int = 1) -> str:
    """A tiny ControlNet for the saved pipeline at ``model_path``, with random output layers, saved to ``folder``.

    A fresh ControlNet's zero convolutions (and its conditioning embedding's last layer) are zero, so its
    residuals would not depend on the condition: they are re-drawn here (variance-preserving, so the
    condition is not washed out).
    """
    controlnet = build_tiny_controlnet(UNet2DConditionModel.from_pretrained(os.fspath(model_path), subfolder="unet"))
    torch.manual_seed(seed)
    for layer in [*controlnet.controlnet_cond_embedding.modules(), controlnet.controlnet_mid_block,
                  *controlnet.controlnet_down_blocks]:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(layer.weight)
            torch.nn.init.normal_(layer.bias, std=0.02)
    controlnet.save_pretrained(os.fspath(folder), safe_serialization=True)
    return os.fspath(folder)


def save_tiny_depth_model(folder) -> str:
    """A tiny random DPT depth-estimation model with its image processor, saved to ``folder`` (for 'depth')."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 16, 16],
                       fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(config).save_pretrained(os.fspath(folder))
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(os.fspath(folder))
    return os.fspath(folder)


def main(argv=None) -> str:
    """`python tests/tiny_models.py [FOLDER]` (`make tiny-model`): a tiny model to try the project without the hub."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Write a tiny random-weight Stable Diffusion model, with a tiny ControlNet and depth model, to "
                    "try the command line, the demos, batch jobs and cog without the hub or a GPU. Its pictures "
                    "are noise.")
    parser.add_argument("folder", nargs="?", default="tiny-model", help="where to write it (default: %(default)s)")
    parser.add_argument("--kind", choices=KINDS, default="sdxl",
                        help="the architecture: SD 1.x, SD 2.x, SDXL (the default model's) or SD 3.5 (default: "
                             "%(default)s)")
    args = parser.parse_args(argv)
    folder = save_tiny_pipeline(args.kind, args.folder)
    if args.kind == "sd3":  # no ControlNet for SD 3 here
        print(f"Wrote a tiny random-weight SD 3 model to {folder}/ (its pictures are noise); for example:\n"
              f'  make run ARGS="--model {folder} --width 1024 --height 512 --steps 4"')
        return folder
    save_tiny_controlnet(folder, os.path.join(folder, "controlnet"))
    save_tiny_depth_model(os.path.join(folder, "depth"))
    print(f"""Wrote a tiny random-weight {args.kind} model to {folder}/, with a ControlNet in {folder}/controlnet and a
depth model in {folder}/depth. Its pictures are noise: it is for trying the command line, the demos, batch
jobs and cog without the hub or a GPU, not for pictures. For example:
  make run ARGS="--model {folder} --width 512 --height 512 --steps 4"
  make app ARGS="--model {folder}"
  make app-img2img ARGS="--model {folder} --controlnet {folder}/controlnet --condition canny --depth-model {folder}/depth"
  python elastic_diffusion.py --model {folder} --prompts_file docs/examples/prompts.jsonl --steps 4
  cog predict -e MODEL=/src/{folder} -i prompt="a test"   # a folder in this checkout (docs/replicate.md)""")
    return folder


if __name__ == "__main__":
    main()
