"""Full-size models for the GPU runs of benchmarks.sweep and benchmarks.preference: the published SD1.5 and SDXL
architectures with random weights (nothing downloaded), and the paper's DRTune settings for each."""

import os
import shutil

import torch

from benchmarks import common

SD15_UNET = dict(  # runwayml SD1.5 unet/config.json: 859.5 M parameters
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(  # SDXL 1.0 base unet/config.json: 2.567 B parameters
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SD_VAE = dict(  # the SD / SDXL autoencoder: 83.7 M parameters, 8x down-sampling, 4 latent channels
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
CLIP_L = dict(  # OpenAI CLIP ViT-L/14 text tower: 123.1 M parameters
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(  # OpenCLIP ViT-bigG/14 text tower with projection (SDXL text_encoder_2): 694.7 M parameters
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")

# The paper's settings (drtune.py's sd15-paper / sdxl-paper presets) as flags that every script takes, at batch 1.
# The tokenizer, scheduler config and model_index.json come from tiny_models/<name>: only token ids matter.
FULL_SIZE = {
    "sd15": dict(title="SD1.5 (512 px)", unet=SD15_UNET, vae=dict(SD_VAE, sample_size=512, scaling_factor=0.18215),
                 text_encoders=[CLIP_L], T=50, K=5, batch=8, goal_gib=20,
                 flags=["--resolution", "512", "--reward_resolution", "224", "--sampler", "ddpm",
                        "--guidance_scale", "7.5"]),
    "sdxl": dict(title="SDXL (1024 px)", unet=SDXL_UNET, vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025),
                 text_encoders=[CLIP_L, CLIP_BIGG], T=25, K=3, batch=1, goal_gib=24,
                 flags=["--resolution", "1024", "--sampler", "dpmpp", "--guidance_scale", "5.0"]),
}


def full_size_models(name, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407):
    """Random-weight UNet, VAE and text encoders of a full-size pipeline, built on the current default device
    (`with torch.device("meta"):` counts parameters without allocating them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    spec, ids = FULL_SIZE[name], dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    text_encoders = [cls(CLIPTextConfig(**config, **ids))
                     for cls, config in zip([CLIPTextModel, CLIPTextModelWithProjection], spec["text_encoders"])]
    return dict(unet=UNet2DConditionModel(**spec["unet"]), vae=AutoencoderKL(**spec["vae"]),
                text_encoders=text_encoders)


def write_full_size(job):
    """Worker: a diffusers folder job["folder"] with random full-size weights of job["name"] (bf16 on disk), loadable
    by the scripts' load_models. Runs in a process of its own (it changes the default dtype)."""
    from transformers import AutoTokenizer
    name, folder = job["name"], job["folder"]
    tiny = os.path.join(common.ROOT, "tiny_models", name)
    shutil.copy(os.path.join(tiny, "model_index.json"), folder)
    for sub in ("scheduler", "tokenizer", "tokenizer_2"):
        if os.path.isdir(os.path.join(tiny, sub)):
            shutil.copytree(os.path.join(tiny, sub), os.path.join(folder, sub))
    tokenizer = AutoTokenizer.from_pretrained(tiny, subfolder="tokenizer")  # EOS must be its largest id (pooling)
    torch.set_default_dtype(torch.bfloat16)  # this is a throw-away process: half the memory and disk, no casts
    with torch.device(job["device"]):
        models = full_size_models(name, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    components = [("unet", models["unet"]), ("vae", models["vae"]),
                  *zip(["text_encoder", "text_encoder_2"], models["text_encoders"])]
    for sub, model in components:
        model.save_pretrained(os.path.join(folder, sub))
    return dict(params={sub: sum(p.numel() for p in model.parameters()) for sub, model in components})


def build_full_size(context, args, folder):
    """Write the random-weight full-size pipeline of --full_size into folder; returns its parameter counts."""
    print(f"building random-weight full-size {args.full_size} in {folder} ...", flush=True)
    built = common.run_in_fresh_process(context, write_full_size, dict(
        name=args.full_size, folder=folder, device=args.device, num_threads=args.num_threads))
    if built["status"] != "ok":
        common.error(f"building the full-size model failed: {built['reason']}\n{built.get('traceback', '')}")
    extra = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in built["params"].items())
    print(f"parameters: {extra}", flush=True)
    return extra


def require_gpu(args):
    """--full_size on a CPU only with --allow_cpu (a smoke)."""
    if args.full_size and args.device == "cpu" and not args.allow_cpu:
        common.error(f"--full_size {args.full_size} needs a GPU (a full-size UNet forward+backward takes seconds on "
                 f"a CPU); pass --allow_cpu for a one-iteration smoke at 64 px, T=1, K=1")
