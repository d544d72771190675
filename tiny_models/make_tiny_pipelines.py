"""Build the tiny random SD1.5, SDXL, SD3.5-Medium and FLUX.1-dev style pipelines shipped in this folder.

They have the components, configs and conditioning paths of the real models (scheduler
configs copied from SD1.5 / SDXL / SD3.5 / FLUX.1-dev), random weights and a tiny byte-level tokenizer, so that
every script's real loading code runs offline in seconds on a CPU. Deterministic:

    python tiny_models/make_tiny_pipelines.py    # writes tiny_models/sd15, sdxl, sd35, flux

The SD3.5 one has the MMDiT-X layout of SD3.5-Medium: joint attention, QK RMS-norm, a dual-attention layer
(layer 0), three text-encoder slots (two CLIPs with projection of different widths, padded to the T5 width, and a
tiny T5). The FLUX one has double- and single-stream blocks, a guidance embedding (FLUX.1-dev), rotary position
ids and 2x2 latent packing (in_channels = 4 x the VAE's 16 latent channels), CLIP + T5 slots. Both VAEs have 16
latent channels and the real models' scaling and shift factors. The T5 slots hold the tiny CLIP tokenizer (any
tokenizer object works there; no sentencepiece file is needed offline).
"""

import argparse
import os

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, PNDMScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel)

HERE = os.path.dirname(os.path.abspath(__file__))

# The real schedulers' configs (SD1.5: PNDM, SDXL: Euler); the scripts build DDPM / DDIM / DPM++ from them.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
                      timestep_spacing="leading", prediction_type="epsilon")
# SDXL's file also carries DDIM/PNDM keys that Euler ignores but a DDIM built from it reads: set_alpha_to_one=False
# makes DDIM's last step stop at abar_0 < 1 (stochastic with eta > 0), as for SD1.5.
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      interpolation_type="linear", prediction_type="epsilon", steps_offset=1,
                      timestep_spacing="leading", use_karras_sigmas=False, trained_betas=None, clip_sample=False,
                      sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True)

# SD3.5-Medium's and FLUX.1-dev's scheduler files.
SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)


def tiny_tokenizer():
    """A byte-level CLIP BPE tokenizer: 256 byte symbols, their end-of-word forms, a few merges, then the
    special tokens last so that EOS is the largest id (transformers pools CLIP text at argmax(input_ids))."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the others to 256 + n.
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("i", "n"), ("e", "r")]
    vocab += [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77)


def text_config(tokenizer, hidden_size, projection_dim=None):
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          projection_dim=projection_dim or hidden_size, hidden_act="gelu",
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def tiny_vae(scaling_factor):
    # Three blocks: 4x spatial compression, 4 latent channels, as the real VAE has 8x and 4.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor)


def flow_vae(scaling_factor, shift_factor):
    # SD3's and FLUX's VAE: 16 latent channels, no quant convs, a shift factor; 4x compression here.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def tiny_t5(tokenizer, d_model):
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id))


def make_sd35(path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    # CLIP-L and CLIP-G stand-ins of different widths (16, 24): penultimate states side by side (40) padded to the T5
    # width (48); pooled = both projections side by side (16 + 24)
    text_encoder = CLIPTextModelWithProjection(text_config(tokenizer, 16))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, 24))
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                        caption_projection_dim=16, pooled_projection_dim=40, pos_embed_max_size=16,
                                        qk_norm="rms_norm", dual_attention_layers=(0,))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
                                    vae=flow_vae(1.5305, 0.0609), text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(),
                                    text_encoder_3=tiny_t5(tokenizer, 48), tokenizer_3=tiny_tokenizer())
    pipe.save_pretrained(path)


def make_flux(path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                        vae=flow_vae(0.3611, 0.1159), text_encoder=CLIPTextModel(text_config(tokenizer, 16)),
                        tokenizer=tokenizer, text_encoder_2=tiny_t5(tokenizer, 48), tokenizer_2=tiny_tokenizer())
    pipe.save_pretrained(path)


def make_sd15(path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(text_config(tokenizer, 32))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    pipe = StableDiffusionPipeline(vae=tiny_vae(0.18215), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)


def make_sdxl(path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, 32, projection_dim=32))
    # SDXL conditioning: cross-attention on both encoders' penultimate states (32 + 32), pooled text_embeds of
    # encoder 2 (32) plus six Fourier-embedded time ids (6 * 8) into the additional embedding.
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True,
                                transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=HERE)
    args = parser.parse_args()
    make_sd15(os.path.join(args.output_dir, "sd15"))
    make_sdxl(os.path.join(args.output_dir, "sdxl"))
    make_sd35(os.path.join(args.output_dir, "sd35"))
    make_flux(os.path.join(args.output_dir, "flux"))
