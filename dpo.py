"""Diffusion-DPO: preference tuning of text-to-image diffusion models, offline on Pick-a-Pic pairs or online
self-rewarding.

Paper: Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization" (CVPR 2024),
https://arxiv.org/abs/2311.12908. Online mode: the self-rewarding SDXL-DPO pipeline of the blog post "Your SDXL
is a slow learner" (after Yuan et al., "Self-Rewarding Language Models", https://arxiv.org/abs/2401.10020).

DPO needs no reward gradient and no sampling chain: a pair (winner x_w, loser x_l, caption) is noised with the
same noise and the same timestep t (uniform over the training timesteps, scheduler.add_noise), and the policy
is pushed to denoise the winner better than the loser, relative to a frozen reference (eq. 14):

    L_w = mean over pixels of (target - model(x_w,t, t))^2 with x_w,t the noised winner; Lref_w the same for the
    reference; L_l, Lref_l alike for the loser
    loss = -log sigmoid(-beta/2 * ((L_w - L_l) - (Lref_w - Lref_l))),   beta = --beta_dpo (5000)

target is the noise (or v for v-prediction models). The reference is the same UNet with the LoRA adapters
disabled, run under no_grad: no second UNet is held. Logged per step: the loss, the implicit accuracy (the
fraction of pairs with (L_w - L_l) < (Lref_w - Lref_l)), and the four errors. --sft trains on the winners
alone with the plain diffusion loss (the paper's SFT baseline).

Data (offline): the Pick-a-Pic schema (jpg_0, jpg_1: encoded image bytes; label_0: 1 if jpg_0 is preferred, 0
if jpg_1 is, 0.5 for a tie; caption) from --dataset_name: a hub id (yuvalkirstain/pickapic_v1, _v2), a parquet
file or a folder of them; --streaming for the large sets. Ties are dropped, the winner is put first, the loser is
resized to the winner's size, then both get the same resize (shorter side to --resolution) and center crop
(--random_crop, --random_flip as options). Unreadable images are skipped and counted (metrics: ties_skipped,
corrupt_skipped), never a crash. SDXL is conditioned on each image's original size and crop (add_time_ids).
Resuming restarts the data stream with a shuffle seeded by the resume step (the pairs are not replayed exactly).

Online (--online), per round (--steps_per_round optimizer steps):
  1. sample --images_per_prompt images for each of --prompts_per_round prompts from the current policy (the
     scaffold's sampler, with guidance) and score them with --reward (any rewards.py reward or weighted sum;
     none needs to be differentiable, e.g. jpeg_size);
  2. keep one pair per prompt, best vs worst, when their reward gap exceeds --pair_margin;
  3. train DPO on pairs drawn from the round's pool (their final latents: no VAE encode);
  4. move the reference toward the policy: the reference is base + a second LoRA adapter "ref" on the same
     UNet (memory: one more LoRA, not a second UNet), starting equal to the policy's initial LoRA (B = 0, so the
     reference starts as the base) and updated once per round, after the round's last optimizer step, by
         phi <- phi + rate * (theta - phi)      (rate = --ref_update_rate, on every LoRA A and B tensor)
     rate 0 keeps the classic frozen base (no second adapter is made); rate 1 makes the next round's reference
     the current policy (iterative DPO); in between, an exponential moving average of the policy's LoRA weights.
Logged per round (in the row of its first step): the samples' reward, the mean reward gap of the kept pairs
(pair_margin) and their number; at the end of each round the reward of the policy's samples on the fixed
evaluation prompts and noise (eval_reward).

Knobs that matter: --beta_dpo, --learning_rate (the gradient scales with beta), the effective batch; online:
--images_per_prompt, --pair_margin, --ref_update_rate, --steps_per_round.

Official settings (SalesforceAIResearch/DiffusionDPO launchers): the full UNet, beta 5000, effective batch 2048
pairs (16 GPUs x 1 x accumulation 128), lr 1e-8 scaled by the effective batch (--scale_lr), 500 warmup steps,
2000 steps, fp16, 512 px (SD1.5) / 1024 px (SDXL, with Adafactor) on Pick-a-Pic v2. The LoRA presets below keep
beta, resolution, batch and step count and use the diffusers LoRA port's lr 1e-5 (rank 8 there; 64 here).

    # SD1.5 on Pick-a-Pic v2 (streamed) on 16 GPUs, effective batch 2048 pairs
    accelerate launch --num_processes 16 dpo.py --preset sd15-paper
    # SDXL on 16 GPUs, fp16-fix VAE
    accelerate launch --num_processes 16 dpo.py --preset sdxl-paper
    # the blog's self-rewarding SDXL pipeline with a slowly moving reference
    accelerate launch --num_processes 8 dpo.py --preset sdxl-online
    # offline on local parquet files in the Pick-a-Pic schema
    python dpo.py --pretrained_model_name_or_path /models/sd15 --dataset_name /data/pairs/ --resolution 512
    # the CPU demo: online self-rewarding rounds on the tiny model with the symmetry reward (about a minute)
    python dpo.py --preset demo
"""

import argparse
import contextlib
import copy
import io
import itertools
import json
import math
import os
import re
import resource
import shutil
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import rewards

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------
# Algorithm: arguments and presets
# ---------------------------------------------------------------------------------------------


def add_algorithm_arguments(parser):
    group = parser.add_argument_group("Diffusion-DPO")
    group.add_argument("--beta_dpo", type=float, default=5000.0,
                       help="beta of eq. 14: loss = -log sigmoid(-beta/2 ((L_w - L_l) - (Lref_w - Lref_l)))")
    group.add_argument("--sft", action="store_true",
                       help="supervised fine-tuning on the winners alone (the plain diffusion loss) instead of DPO")
    group.add_argument("--dataset_name", default=None,
                       help="offline pairs in the Pick-a-Pic schema (jpg_0, jpg_1, label_0, caption): a hub id "
                            "(yuvalkirstain/pickapic_v2), a parquet file or a folder of parquet files")
    group.add_argument("--dataset_split", default="train")
    group.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
    group.add_argument("--shuffle_buffer_size", type=int, default=1000, help="shuffle buffer when streaming")
    group.add_argument("--random_crop", action="store_true", help="random instead of center crop (same for the pair)")
    group.add_argument("--random_flip", action="store_true", help="horizontal flip with probability 0.5 (same for the pair)")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument("--vae_encode_batch_size", type=int, default=8, help="images per VAE encode call")
    group.add_argument("--online", action="store_true",
                       help="self-rewarding rounds: sample from the policy, rank with --reward, train on best vs worst")
    group.add_argument("--images_per_prompt", type=int, default=4, help="online: samples per prompt and round")
    group.add_argument("--prompts_per_round", type=int, default=32, help="online: prompts per round and process")
    group.add_argument("--steps_per_round", type=int, default=10, help="online: optimizer steps per round")
    group.add_argument("--pair_margin", type=float, default=0.0,
                       help="online: keep a prompt's best-vs-worst pair only when their reward gap exceeds this")
    group.add_argument("--ref_update_rate", type=float, default=0.0,
                       help="online: after each round the reference LoRA phi <- phi + rate (theta - phi); "
                            "0 = the frozen base (the paper), 1 = the reference is the policy of the last round")


def check_algorithm_arguments(args):
    if args.beta_dpo <= 0:
        raise UsageError(f"--beta_dpo must be > 0, got {args.beta_dpo}")
    if not 0 <= args.ref_update_rate <= 1:
        raise UsageError(f"--ref_update_rate must be in [0, 1], got {args.ref_update_rate}")
    if args.vae_encode_batch_size < 1 or args.shuffle_buffer_size < 1 or args.dataloader_num_workers < 0:
        raise UsageError("--vae_encode_batch_size and --shuffle_buffer_size must be >= 1, "
                         "--dataloader_num_workers >= 0")
    if args.online:
        if args.images_per_prompt < 2:
            raise UsageError(f"--images_per_prompt must be >= 2 to make a pair, got {args.images_per_prompt}")
        if args.prompts_per_round < 1 or args.steps_per_round < 1:
            raise UsageError("--prompts_per_round and --steps_per_round must be >= 1")
        if args.pair_margin < 0:
            raise UsageError(f"--pair_margin must be >= 0, got {args.pair_margin}")
        return
    if args.cache_prompt_embeds:
        raise UsageError("--cache_prompt_embeds needs a finite prompt list: offline DPO's captions come from "
                         "--dataset_name (use it with --online)")
    if args.ref_update_rate > 0:
        raise UsageError("--ref_update_rate moves the reference between rounds of --online; offline DPO keeps the "
                         "frozen base as reference")
    if args.dataset_name is None:
        raise UsageError("offline DPO needs pairs: --dataset_name (a hub id such as yuvalkirstain/pickapic_v2, or "
                         "local parquet files), or --online")
    if not os.path.exists(args.dataset_name) and not is_hub_id(args.dataset_name):
        raise UsageError(f"dataset: local path '{args.dataset_name}' does not exist (--dataset_name)")


PRESETS = {
    # CPU, about a minute: online self-rewarding on the tiny SD pipeline toward symmetric images (eq. 6 of DRTune),
    # the reference moved halfway to the policy after each round. beta 100, not 5000: at a demo-sized lr one step
    # at beta 5000 swings the logits by about 1 and the loss never leaves the noise. The tiny UNet has random
    # weights (its denoising error exceeds that of predicting zero), so DPO's link from a lower denoising error on
    # the winners to sampling them more often does not hold there: the demo shows the mechanics (loss and implicit
    # accuracy within rounds, pair margins, the moving reference), not a reward gain.
    "demo": dict(
        pretrained_model_name_or_path=os.path.join(HERE, "tiny_models", "sd15"), output_dir="outputs/dpo-demo",
        online=True, resolution=32, sampler="ddim", num_inference_steps=6, guidance_scale=7.5, reward="symmetry",
        images_per_prompt=4, prompts_per_round=16, steps_per_round=10, ref_update_rate=0.5, train_batch_size=16,
        learning_rate=3e-3, beta_dpo=100.0, max_grad_norm=1.0, rank=8, max_train_steps=60, validation_steps=1000,
        checkpointing_steps=1000, logging_steps=10, mixed_precision="no",
    ),
    # Offline Diffusion-DPO on Pick-a-Pic v2 (streamed), SD1.5 at 512 px: beta 5000, effective batch 2048 pairs
    # (8 x accumulation 16 per GPU on 16 GPUs), 2000 steps with 500 warmup steps (the official launcher); LoRA
    # rank 64 at lr 1e-5 (the diffusers LoRA port's lr) in place of the full UNet at 2.048e-5. Evaluated with
    # PickScore, the paper's main automatic metric.
    "sd15-paper": dict(
        pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5",
        dataset_name="yuvalkirstain/pickapic_v2", streaming=True, resolution=512, beta_dpo=5000.0,
        train_batch_size=8, gradient_accumulation_steps=16, learning_rate=1e-5, lr_scheduler="constant_with_warmup",
        lr_warmup_steps=500, max_train_steps=2000, rank=64, max_grad_norm=1.0, mixed_precision="fp16",
        gradient_checkpointing=True, checkpointing_granularity="block", dataloader_num_workers=8, reward="pickscore", sampler="ddim",
        num_inference_steps=50, guidance_scale=7.5, validation_steps=200, checkpointing_steps=500,
    ),
    # The same for SDXL at 1024 px with the fp16-fix VAE (the official run: Adafactor, full UNet).
    "sdxl-paper": dict(
        pretrained_model_name_or_path="stabilityai/stable-diffusion-xl-base-1.0",
        pretrained_vae_model_name_or_path="madebyollin/sdxl-vae-fp16-fix", dataset_name="yuvalkirstain/pickapic_v2",
        streaming=True, resolution=1024, beta_dpo=5000.0, train_batch_size=2, gradient_accumulation_steps=64,
        learning_rate=1e-5, lr_scheduler="constant_with_warmup", lr_warmup_steps=500, max_train_steps=2000, rank=64,
        max_grad_norm=1.0, mixed_precision="fp16", gradient_checkpointing=True, checkpointing_granularity="block", dataloader_num_workers=8,
        vae_encode_batch_size=4, reward="pickscore", sampler="dpmpp", num_inference_steps=25, guidance_scale=5.0,
        validation_steps=200, checkpointing_steps=500,
    ),
    # The blog's self-rewarding SDXL-DPO (its recipe is not published; our reading): rounds of 4 images for each
    # of 32 prompts per GPU, ranked by PickScore, best vs worst, 25 steps of DPO per round, the reference moved
    # 10 % of the way to the policy after each round.
    "sdxl-online": dict(
        pretrained_model_name_or_path="stabilityai/stable-diffusion-xl-base-1.0",
        pretrained_vae_model_name_or_path="madebyollin/sdxl-vae-fp16-fix", online=True, resolution=1024,
        sampler="dpmpp", num_inference_steps=25, guidance_scale=5.0, reward="pickscore", images_per_prompt=4,
        prompts_per_round=32, steps_per_round=25, ref_update_rate=0.1, pair_margin=0.0, beta_dpo=5000.0,
        train_batch_size=2, gradient_accumulation_steps=4, learning_rate=1e-5, max_train_steps=1000, rank=64,
        max_grad_norm=1.0, mixed_precision="fp16", gradient_checkpointing=True, checkpointing_granularity="block", validation_steps=100,
        checkpointing_steps=100,
    ),
}

# ---------------------------------------------------------------------------------------------
# Scaffold: identical in every algorithm script (tests/test_scaffold.py keeps it so)
# ---------------------------------------------------------------------------------------------

DEFAULT_PROMPTS = [
    "a photograph of a cat sitting on a windowsill", "an oil painting of a lighthouse at dusk",
    "a bowl of fruit on a wooden table", "a watercolor of a mountain lake", "a robot reading a newspaper",
    "a red sports car on a coastal road", "a portrait of an old fisherman, studio lighting",
    "an anime girl with a blue umbrella in the rain",
]


class UsageError(ValueError):
    """Bad input, reported as one line before any large model is loaded."""


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("experiment")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named overrides of the defaults (printed and saved); explicit flags win")
    g.add_argument("--output_dir", default="outputs/run")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="hub id or local diffusers folder; SD1.5-family or SDXL-family, detected from its components")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="another VAE, e.g. an fp16-safe SDXL VAE (otherwise SDXL's VAE is kept in fp32)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g = parser.add_argument_group("sampling")
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddpm",
                   help="DDPM, DDIM (with --eta) or DPM-Solver++ 2M, built from the pipeline's scheduler config")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0: deterministic, 1: DDPM-like)")
    g.add_argument("--num_inference_steps", type=int, default=50, help="T")
    g.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance; <= 1 disables it")
    g = parser.add_argument_group("reward")
    g.add_argument("--reward", default="hpsv21", help="rewards.py name or weighted sum, e.g. symmetry:1,clipscore:0.1")
    g.add_argument("--reward_options", default="", help="rewards.py options, e.g. hps_checkpoint=/path/file.pt")
    g.add_argument("--reward_resolution", type=int, default=None,
                   help="down-sample images to this size before the reward (the paper: 224 for SD1.5)")
    g.add_argument("--train_prompts", default=None,
                   help="a .txt file (one prompt per line) or a dataset id / folder with a 'prompt' or 'caption' column")
    g.add_argument("--eval_prompts", default=None, help="as --train_prompts; the fixed evaluation grid")
    g.add_argument("--num_eval_prompts", type=int, default=8)
    g = parser.add_argument_group("optimization")
    g.add_argument("--train_batch_size", type=int, default=1, help="per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="constant", help="diffusers.optimization.get_scheduler name")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--rank", type=int, default=128, help="LoRA rank (alpha = rank)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="dtype of the frozen weights and autocast; trainable LoRA weights stay fp32 "
                        "(default: accelerate's config or launch flag)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass instead of keeping them (see "
                        "--checkpointing_granularity)")
    g.add_argument("--checkpointing_granularity", choices=["call", "block", "both"], default="call",
                   help="with --gradient_checkpointing: call = each UNet call and VAE decode with gradient is one "
                        "checkpoint (a trained step keeps only its input: the floor for backprop through a chain); "
                        "block = diffusers' per-block checkpointing (lower peak inside one large call: DPO, SPO, few "
                        "trained steps at full size); both = blocks checkpointed inside the call checkpoint")
    g.add_argument("--cache_prompt_embeds", action="store_true",
                   help="encode every training and evaluation prompt once per run, then move the text encoders off "
                        "the accelerator (for a finite prompt list)")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="stop after this many updates in a row skipped for a NaN/inf loss or gradient")
    g = parser.add_argument_group("logging and saving")
    g.add_argument("--report_to", choices=["tensorboard", "wandb", "none"], default="tensorboard")
    g.add_argument("--logging_steps", type=int, default=10, help="a plain log line every N steps")
    g.add_argument("--validation_steps", type=int, default=100, help="evaluation grid every N steps")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N folder or 'latest'")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    add_algorithm_arguments(parser)
    args = parser.parse_args(argv)
    if args.preset is not None:  # presets replace defaults, so flags given explicitly still win
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return args


def is_hub_id(path):
    return re.fullmatch(r"[\w\-.]+/[\w\-.]+", path) is not None and not path.startswith(".")


def load_config_or_fail(cls, path, what, flag, **kwargs):
    """A small config file: cheap first contact with a hub id or folder, with a one-line error."""
    if not os.path.isdir(path) and not is_hub_id(path):
        raise UsageError(f"{what}: local path '{path}' does not exist ({flag})")
    try:
        return cls.load_config(path, **kwargs)
    except Exception as e:  # offline, not cached, or not a diffusers folder
        raise UsageError(f"{what}: could not load '{path}' ({type(e).__name__}); without network pass a local "
                         f"diffusers folder with {flag} /path/to/model") from e


def read_prompts(source, default):
    if source is None:
        return list(default)
    if os.path.isfile(source) and source.endswith(".txt"):
        with open(source, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        import datasets
        if not os.path.exists(source) and not is_hub_id(source):
            raise UsageError(f"prompt file '{source}' does not exist")
        data = datasets.load_dataset(source, split="train")
        column = next((c for c in ("prompt", "caption", "text") if c in data.column_names), None)
        if column is None:
            raise UsageError(f"prompts '{source}': no 'prompt', 'caption' or 'text' column in {data.column_names}")
        prompts = [p.strip() for p in data[column] if p and p.strip()]
    if not prompts:
        raise UsageError(f"prompt file '{source}' holds no prompts")
    return prompts


def check_arguments(args):
    """Every bad input we can see without loading a large model, each as one line."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    if args.mixed_precision is None:
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a GPU (no fp16 autocast on CPU); use bf16 or no")
    try:
        reward_parts = rewards.parse_spec(args.reward)
        reward_options = rewards.parse_options(args.reward_options)
        rewards.check_options(args.reward, reward_options)
    except (ValueError, rewards.RewardLoadError) as e:
        raise UsageError(f"--reward {args.reward}: {e}") from e
    if NEEDS_DIFFERENTIABLE_REWARD and not rewards.is_differentiable(args.reward):
        names = [n for n, _ in reward_parts if not rewards.REWARDS[n].differentiable]
        raise UsageError(f"--reward: {', '.join(names)} is not differentiable, and this method backpropagates "
                         f"through the reward")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_inference_steps",
                 "rank", "validation_steps", "checkpointing_steps", "logging_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1")
    kwargs = dict(revision=args.revision)
    model_index = load_config_or_fail(DiffusionPipeline, args.pretrained_model_name_or_path, "model",
                                      "--pretrained_model_name_or_path", **kwargs)
    unet_config = load_config_or_fail(UNet2DConditionModel, args.pretrained_model_name_or_path, "model",
                                      "--pretrained_model_name_or_path", subfolder="unet", **kwargs)
    vae_path = args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path
    vae_kwargs = dict(subfolder="vae", **kwargs) if args.pretrained_vae_model_name_or_path is None else {}
    vae_config = load_config_or_fail(AutoencoderKL, vae_path, "VAE", "--pretrained_vae_model_name_or_path",
                                     **vae_kwargs)
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if args.resolution % vae_scale_factor:
        raise UsageError(f"--resolution {args.resolution} is not divisible by the VAE factor {vae_scale_factor}")
    args.train_prompt_list = read_prompts(args.train_prompts, DEFAULT_PROMPTS)
    args.eval_prompt_list = read_prompts(args.eval_prompts, DEFAULT_PROMPTS)[: args.num_eval_prompts]
    check_algorithm_arguments(args)
    is_sdxl = "text_encoder_2" in model_index and unet_config.get("addition_embed_type") == "text_time"
    return dict(is_sdxl=is_sdxl, model_index=model_index, reward_options=reward_options)


def load_models(args, info, device, weight_dtype):
    """Tokenizers, text encoders, VAE and UNet, frozen, in the order of the diffusers examples."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
    path, kw = args.pretrained_model_name_or_path, dict(revision=args.revision)
    names = ["", "_2"] if info["is_sdxl"] else [""]
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{n}", **kw) for n in names]
    kw.update(variant=args.variant, torch_dtype=weight_dtype)
    text_encoders = [cls.from_pretrained(path, subfolder=f"text_encoder{n}", **kw)
                     for cls, n in zip([CLIPTextModel, CLIPTextModelWithProjection], names)]
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    # SDXL's own VAE overflows in fp16; keep it in fp32 unless an fp16-safe VAE was given.
    if args.pretrained_vae_model_name_or_path:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, torch_dtype=weight_dtype)
    else:
        upcast = info["is_sdxl"] and weight_dtype == torch.float16
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **dict(kw, torch_dtype=torch.float32) if upcast else kw)
    for model in [vae, unet, *text_encoders]:
        model.requires_grad_(False).eval().to(device)
    force_zeros = info["model_index"].get("force_zeros_for_empty_prompt", info["is_sdxl"])
    return argparse.Namespace(tokenizers=tokenizers, text_encoders=text_encoders, vae=vae, unet=unet,
                              is_sdxl=info["is_sdxl"], force_zeros_for_empty_prompt=force_zeros,
                              vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1), prompt_cache={})


def make_scheduler(args):
    """DDPM / DDIM / DPM-Solver++ from the pipeline's scheduler config, with the traps made explicit."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
    config = DDPMScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler",
                                        revision=args.revision)
    # from_config drops default-valued keys; SD1.5 and SDXL use "leading" spacing, which DDIM's step assumes.
    spacing = config.get("timestep_spacing", "leading")
    if args.sampler == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=False, variance_type="fixed_small",
                                         timestep_spacing=spacing)
    if args.sampler == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, timestep_spacing=spacing)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                   timestep_spacing=spacing)


def tokenize(tokenizer, prompts, device):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_text(models, prompts, cache=False):
    """Embeddings of the prompts alone, in the UNet's dtype and on its device: (B, 77, D) and, for SDXL, the pooled
    (B, D2) of text encoder 2 (None for SD1.5). Each distinct prompt runs through the text encoders once, in one
    batch; prompts in models.prompt_cache not at all. cache=True keeps the new ones there."""
    new, missing = {}, [p for p in dict.fromkeys(prompts) if p not in models.prompt_cache]
    if missing:  # (a diffusers model's .device and .dtype walk all its modules: only when there is work)
        device, dtype, states = models.unet.device, models.unet.dtype, []
        for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
            out = encoder(tokenize(tokenizer, missing, encoder.device), output_hidden_states=models.is_sdxl)
            # SDXL: penultimate states of both encoders side by side, pooled from encoder 2; SD1.5: the last states
            states.append(out.hidden_states[-2] if models.is_sdxl else out[0])
        embeds = torch.cat(states, dim=-1).to(device, dtype)
        pooled = out[0].to(device, dtype) if models.is_sdxl else [None] * len(missing)
        new = {p: (e, q) for p, e, q in zip(missing, embeds, pooled)}
        if cache:
            models.prompt_cache.update(new)
    rows = [new[p] if p in new else models.prompt_cache[p] for p in prompts]
    return torch.stack([e for e, _ in rows]), torch.stack([q for _, q in rows]) if models.is_sdxl else None


def encode_prompts(models, prompts, resolution):
    """Conditioning of [negative; prompt] for classifier-free guidance, as the diffusers pipelines build it:
    UNet keyword arguments with batch 2B. The negative (the empty prompt) is encoded once per run."""
    n = len(prompts)
    embeds, pooled = encode_text(models, prompts)
    if models.is_sdxl and models.force_zeros_for_empty_prompt:
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = (None if x is None else x.expand(n, *x.shape[1:])
                                            for x in encode_text(models, [""], cache=True))
    if not models.is_sdxl:
        return dict(encoder_hidden_states=torch.cat([negative_embeds, embeds]))  # (2B, 77, D)
    # add_time_ids: original size, crop top-left, target size (we generate at the target size, uncropped)
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=embeds.device)
    return dict(encoder_hidden_states=torch.cat([negative_embeds, embeds]),
                added_cond_kwargs=dict(text_embeds=torch.cat([negative_pooled, pooled]),
                                       time_ids=time_ids.repeat(2 * n, 1).to(embeds.dtype)))


def cache_prompt_embeds(models, prompts, batch_size=32):
    """--cache_prompt_embeds: encode each distinct prompt once for the whole run, then move the text encoders off
    the accelerator (SDXL's two are 0.8 B parameters that training never runs). Returns the cache's MiB."""
    distinct = list(dict.fromkeys(["", *prompts]))
    for start in range(0, len(distinct), batch_size):
        encode_text(models, distinct[start:start + batch_size], cache=True)
    for encoder in models.text_encoders:
        encoder.to("cpu")
    tensors = [x for pair in models.prompt_cache.values() for x in pair if x is not None]
    return sum(x.numel() * x.element_size() for x in tensors) / 2 ** 20


def predict_noise(unet, latents, t, cond, guidance_scale):
    """Model output with classifier-free guidance; latents (B, C, h, w), t a scalar or one timestep per sample (B,),
    cond of batch 2B. One activation checkpoint when enable_checkpointing marked the UNet (see checkpointed)."""
    t = torch.as_tensor(t, device=latents.device)
    if guidance_scale <= 1:  # no guidance: the prompt half only
        half = {k: (v[len(latents):] if torch.is_tensor(v) else {n: x[len(latents):] for n, x in v.items()})
                for k, v in cond.items()}
        return checkpointed(unet, lambda x: unet(x, t, **half, return_dict=False)[0], latents)
    t2 = t.repeat(2) if t.ndim else t  # the two halves of the batch share each sample's timestep
    noise_uncond, noise_text = checkpointed(
        unet, lambda x: unet(torch.cat([x] * 2), t2, **cond, return_dict=False)[0], latents).chunk(2)
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


def checkpointed(module, fn, *inputs):
    """fn(*inputs), a call of `module`, as one activation checkpoint when enable_checkpointing marked the module
    and gradient is on: the forward keeps only the inputs, the backward recomputes the call. Non-reentrant, so
    LoRA weights get their gradients even from detached inputs; the RNG state is preserved for the recomputation."""
    if getattr(module, "checkpoint_calls", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint
        return checkpoint(fn, *inputs, use_reentrant=False)
    return fn(*inputs)


def enable_checkpointing(unet, vae, granularity):
    """--gradient_checkpointing at --checkpointing_granularity.
    call: every UNet call and VAE decode with gradient is one checkpoint (predict_noise, decode): a trained step
      keeps only its input latents, the floor for backpropagating through a chain of steps, for one more forward
      per call. The backward of one call still holds all that call's activations at once.
    block: diffusers' per-block checkpointing: every block's input and the operations between blocks stay (several
      times the floor per trained step) but the backward holds one block's activations at a time.
    both: the call checkpoint with the blocks checkpointed inside: the floor per step and the per-block peak, for a
      third forward per call."""
    if granularity in ("block", "both"):
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    if granularity in ("call", "both"):
        unet.checkpoint_calls = vae.checkpoint_calls = True


def alphas_at(scheduler, t):
    """abar_t and abar_prev of a DDPM/DDIM step with the scheduler's own conventions for the last step; t a scalar
    or one timestep per sample (B,), the results of the same shape."""
    abar, t = scheduler.alphas_cumprod, torch.as_tensor(t).cpu()
    if type(scheduler).__name__ == "DDIMScheduler":
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return abar[t], torch.where(prev >= 0, abar[prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    if scheduler.num_inference_steps is None:  # DDPM's previous_timestep without a schedule
        prev = t - 1
    else:  # the next entry of the schedule (DDPM's previous_timestep, for every sample at once)
        schedule = scheduler.timesteps.cpu()
        following = torch.cat([schedule[1:], schedule.new_tensor([-1])])
        found = schedule == t.reshape(-1, 1)  # (B, T)
        if not found.any(1).all():
            raise ValueError(f"timestep {t.tolist()} is not in the schedule {schedule.tolist()}")
        prev = following[found.int().argmax(1)].reshape(t.shape)
    return abar[t], torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.tensor(1.0))


def per_sample(value, x):
    """A scalar as it is, or one value per sample (B,) as (B, 1, 1, 1) to broadcast over x; on x's device."""
    value = value.to(x.device)
    return value.view(-1, *[1] * (x.ndim - 1)) if value.ndim else value


def predict_x0_eps(scheduler, model_output, t, x):
    """(x_0, eps) from the model output at x_t: linear in both; t a scalar or (B,)."""
    abar = per_sample(scheduler.alphas_cumprod[torch.as_tensor(t).cpu()], x)
    if scheduler.config.prediction_type == "v_prediction":
        return abar.sqrt() * x - (1 - abar).sqrt() * model_output, abar.sqrt() * model_output + (1 - abar).sqrt() * x
    return (x - (1 - abar).sqrt() * model_output) / abar.sqrt(), model_output


def sampler_step(scheduler, model_output, t, x, noise, eta):
    """x_{t-1} = a_t x_t + b_t eps + c_t z (eq. 2), differentiable in x and the model output; t a scalar or one
    timestep per sample (B,). DDIM with eta, and DDPM as DDIM's form with the DDPM posterior variance (both equal
    scheduler.step, row by row). DPM-Solver++ is a two-step recurrence with no one-step (a, b, c): its own step,
    which is linear too (one scalar t)."""
    if type(scheduler).__name__ == "DPMSolverMultistepScheduler":
        return scheduler.step(model_output, t, x).prev_sample
    abar_t, abar_prev = (per_sample(a, x) for a in alphas_at(scheduler, t))
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    if type(scheduler).__name__ == "DDPMScheduler":
        sigma = variance.clamp(min=1e-20).sqrt()
    else:
        sigma = eta * variance.sqrt()
    x0, eps = predict_x0_eps(scheduler, model_output, t, x)
    x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    return x_prev if noise is None else x_prev + sigma * noise


def rollout(unet, scheduler, cond, latents, generator, args, grad_steps=(), stop_index=None, stop_grad_input=True):
    """Sample from x_T = latents. Steps whose index (0 = noisiest) is in grad_steps run the UNet with gradient;
    all others under no_grad, entering the graph only through the linear path of the sampler step.
    stop_grad_input detaches every UNet input (DRTune eq. 3). With stop_index, sampling stops at that step and
    returns the x_0 predicted from x_t and the model output there (early stop); otherwise the final latents."""
    scheduler.set_timesteps(args.num_inference_steps, device=latents.device)  # also resets DPM++ history
    stochastic = args.sampler == "ddpm" or (args.sampler == "ddim" and args.eta > 0)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i in grad_steps):
            model_output = predict_noise(unet, latents.detach() if stop_grad_input else latents, t, cond,
                                         args.guidance_scale)
        if i == stop_index:
            return predict_x0_eps(scheduler, model_output, t, latents)[0]
        noise = randn(latents.shape, generator, latents.device) if stochastic else None
        latents = sampler_step(scheduler, model_output, t, latents, noise, args.eta)
    return latents


def randn(shape, generator, device):
    """Noise from a CPU generator: the same numbers on any device (and as the diffusers pipelines draw them)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def initial_latents(models, args, batch_size, generator, device):
    shape = (batch_size, models.unet.config.in_channels, args.resolution // models.vae_scale_factor,
             args.resolution // models.vae_scale_factor)
    return randn(shape, generator, device)


def decode(vae, latents):
    """Latents -> images (B, 3, H, W) in [0, 1], with gradient (one checkpoint under enable_checkpointing)."""
    if getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "latents_std", None) is not None:
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    # a VAE kept in fp32 (SDXL's overflows in fp16) must not be autocast back to half precision
    fp32 = vae.dtype == torch.float32
    with torch.autocast(latents.device.type, enabled=False) if fp32 else contextlib.nullcontext():
        images = checkpointed(vae, lambda z: vae.decode(z, return_dict=False)[0], latents.to(vae.dtype))
    return (images.float() / 2 + 0.5).clamp(0, 1)


def compute_reward(reward_fn, images, prompts, args):
    if args.reward_resolution is not None and images.shape[-1] != args.reward_resolution:
        images = F.interpolate(images, size=(args.reward_resolution,) * 2, mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
    return reward_fn(images, prompts)


def step_generator(args, process_index, step):
    """This process's generator for one optimizer step: a function of (seed, process, step) alone, so that a
    resumed run draws the same prompts and noise as an uninterrupted one, and processes differ."""
    seed = int(np.random.SeedSequence([args.seed, process_index, step]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


def add_lora(unet, args):
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # frozen weights stay in the mixed-precision dtype; trainable ones in fp32
        p.data = p.data.float()
    return params


def save_lora(unet, is_sdxl, output_dir):
    """pytorch_lora_weights.safetensors in the diffusers format: pipe.load_lora_weights(output_dir) loads it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    pipeline_class = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # the metadata keeps lora_alpha; without it a reload assumes alpha = rank
    pipeline_class.save_lora_weights(output_dir, unet_lora_layers=state_dict,
                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


def load_lora(unet, is_sdxl, path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    pipeline_class = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    state_dict = pipeline_class.lora_state_dict(path)[0]
    state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state_dict), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: unexpected LoRA keys {result.unexpected_keys[:3]}")


def checkpoint_steps(output_dir):
    if not os.path.isdir(output_dir):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", d)))


def save_checkpoint(accelerator, unet, models, args, step):
    """checkpoint-N/: optimizer, LR scheduler, grad scaler and RNG states (accelerate) and the LoRA weights,
    written to a temporary folder and renamed, so a crash never leaves a half-written checkpoint."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        save_lora(unet, models.is_sdxl, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if args.checkpoints_total_limit is not None:
            for old in checkpoint_steps(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(os.path.join(args.output_dir, f"checkpoint-{old}"))
    accelerator.wait_for_everyone()


def resume_step(accelerator, unet, models, args):
    """Load checkpoint-N (or the latest) and return N; 0 without --resume_from_checkpoint."""
    if args.resume_from_checkpoint is None:
        return 0
    if args.resume_from_checkpoint == "latest":
        steps = checkpoint_steps(args.output_dir)
        if not steps:
            accelerator.print(f"no checkpoint in {args.output_dir}; starting from scratch")
            return 0
        path = os.path.join(args.output_dir, f"checkpoint-{steps[-1]}")
    else:
        path = args.resume_from_checkpoint
    accelerator.load_state(path)
    load_lora(unet, models.is_sdxl, path)
    return int(re.search(r"checkpoint-(\d+)", path.rstrip("/")).group(1))


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


class MetricsLog:
    """metrics.jsonl (one JSON object per optimizer step) plus the tracker; main process only."""

    def __init__(self, accelerator, path, resume_step):
        self.accelerator, self.path, self.rows = accelerator, path, []
        if accelerator.is_main_process and os.path.exists(path):
            with open(path) as f:  # on resume, drop the steps after the checkpoint: they are run again
                self.rows = [r for r in map(json.loads, f) if resume_step and r["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def log(self, row):
        if not self.accelerator.is_main_process:
            return
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(scalars, step=row["step"])


@torch.no_grad()
def generate(models, scheduler, unet, prompts, args, seed):
    """Images of the current policy for prompts, from fixed noise; (B, 3, H, W) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    device = models.unet.device
    latents = initial_latents(models, args, len(prompts), generator, device)
    cond = encode_prompts(models, prompts, args.resolution)
    return decode(models.vae, rollout(unet, scheduler, cond, latents, generator, args))


def save_grid(images, path, nrow):
    from PIL import Image
    b, c, h, w = images.shape
    ncol = math.ceil(b / nrow)
    grid = torch.ones(c, nrow * h, ncol * w)
    for i, image in enumerate(images.cpu()):
        r, col = divmod(i, ncol)
        grid[:, r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


@torch.no_grad()
def evaluate(models, scheduler, unet, reward_fn, args, step):
    """Fixed prompts and noise: a grid in samples/ and the mean reward (main process)."""
    images = generate(models, scheduler, unet, args.eval_prompt_list, args, args.seed)
    score = compute_reward(reward_fn, images, args.eval_prompt_list, args)
    save_grid(images, os.path.join(args.output_dir, "samples", f"step-{step:06d}.png"), nrow=1)
    return score.mean().item(), images


def plot_reward_curve(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    train = [r for r in rows if "reward_mean" in r]
    ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="train reward", alpha=0.6)
    evals = [r for r in rows if "eval_reward" in r]
    ax.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], "o-", label="eval reward (fixed noise)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def all_reduce_grads(accelerator, params):
    """Average the LoRA gradients over processes in one flat collective."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def library_versions():
    import accelerate
    import diffusers
    import peft
    import transformers
    return {m.__name__: m.__version__ for m in (torch, diffusers, transformers, peft, accelerate)}


# ---------------------------------------------------------------------------------------------
# Algorithm: Diffusion-DPO (Wallace et al., eq. 14), offline pairs and online self-rewarding rounds
# ---------------------------------------------------------------------------------------------

NEEDS_DIFFERENTIABLE_REWARD = False  # the reward only ranks samples (online) and scores the evaluation grid
PAIR_COLUMNS = ["jpg_0", "jpg_1", "label_0", "caption"]
MAX_EMPTY_ROUNDS = 10  # online: resample a round with no pair above --pair_margin this many times, then stop


# --- data: Pick-a-Pic pairs -----------------------------------------------------------------------------


def open_pairs(args):
    """The pair dataset of --dataset_name (hub id, parquet file or folder), only the Pick-a-Pic columns, image
    columns left undecoded (we decode them ourselves, so that a corrupt image is skipped rather than fatal)."""
    import datasets
    source = args.dataset_name
    try:
        if os.path.isfile(source):
            data = datasets.load_dataset("parquet", data_files=source, split="train", streaming=args.streaming)
        else:
            data = datasets.load_dataset(source, split=args.dataset_split, streaming=args.streaming)
    except Exception as e:  # offline, not cached, no such split, not a dataset
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"--dataset_name: could not load '{source}' ({type(e).__name__}: {message[:200]}); without "
                         f"network pass local parquet files in the Pick-a-Pic schema: --dataset_name /path/to/folder") from e
    features = data.features
    if features is not None:
        missing = [c for c in PAIR_COLUMNS if c not in features]
        if missing:
            raise UsageError(f"--dataset_name {source}: no column {', '.join(missing)}; the Pick-a-Pic schema is "
                             f"{', '.join(PAIR_COLUMNS)} (found {', '.join(features)})")
    data = data.select_columns(PAIR_COLUMNS)
    for column in ("jpg_0", "jpg_1"):
        if features is not None and isinstance(features[column], datasets.Image):
            data = data.cast_column(column, datasets.Image(decode=False))
    if not args.streaming and not any(label in (0, 1) for label in data["label_0"]):
        raise UsageError(f"--dataset_name {source}: no pair with a preference (every label_0 is a tie)")
    return data


def read_image(value):
    """Encoded image bytes (or a datasets Image dict) -> RGB PIL image; raises on anything unreadable."""
    from PIL import Image
    if isinstance(value, dict):
        if value.get("bytes") is None:
            with open(value["path"], "rb") as f:
                value = {"bytes": f.read()}
        value = value["bytes"]
    return Image.open(io.BytesIO(value)).convert("RGB")  # convert() decodes it all: a truncated file raises here


def load_pair(row, resolution, random_crop, random_flip, rng):
    """One Pick-a-Pic row with a preference -> pixels (2, 3, R, R) in [-1, 1], winner first, and SDXL's time ids:
    the winner's original (height, width), the crop's (top, left) in the resized image, the target size."""
    from PIL import Image
    images = [read_image(row["jpg_0"]), read_image(row["jpg_1"])]
    if row["label_0"] == 0:  # label_0 = 1: jpg_0 is preferred
        images.reverse()
    winner, loser = images
    if loser.size != winner.size:  # one resize and crop for both (as diffusers' SDXL DPO example)
        loser = loser.resize(winner.size, Image.BICUBIC)
    scale = resolution / min(winner.size)
    width, height = max(resolution, round(winner.width * scale)), max(resolution, round(winner.height * scale))
    if random_crop:
        top, left = int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))
    else:  # torchvision's CenterCrop
        top, left = int(round((height - resolution) / 2)), int(round((width - resolution) / 2))
    pixels = torch.stack([
        torch.from_numpy(np.array(image.resize((width, height), Image.BILINEAR)
                                  .crop((left, top, left + resolution, top + resolution)), dtype=np.float32))
        for image in (winner, loser)]).permute(0, 3, 1, 2) / 127.5 - 1  # (2, 3, R, R)
    if random_flip and rng.random() < 0.5:
        pixels = pixels.flip(-1)
    return dict(pixels=pixels, caption=row["caption"] or "",
                time_ids=[winner.height, winner.width, top, left, resolution, resolution])


class PickAPicPairs(torch.utils.data.IterableDataset):
    """An endless stream of this process's pairs (each DataLoader worker takes its own shard), reshuffled every
    pass; it ends only if its shard holds no usable pair. Ties and rows with an unreadable image are skipped; each
    example carries how many were skipped since the previous one, so that the totals add up over workers and
    processes."""

    def __init__(self, data, args, process_index, num_processes, seed):
        self.data, self.args, self.seed = data, args, seed
        self.process_index, self.num_processes = process_index, num_processes

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if self.args.streaming:  # datasets itself splits a streamed set among DataLoader workers (by files), after
            shard = split_dataset_by_node(self.data, rank=self.process_index, world_size=self.num_processes)
            key = [self.seed, self.process_index]  # a file order shuffled alike in every worker of the process
        else:
            shard = split_dataset_by_node(self.data, rank=self.process_index * workers + worker,
                                          world_size=self.num_processes * workers)
            key = [self.seed, self.process_index, worker]
        rng = np.random.default_rng([self.seed, self.process_index, worker])  # crops and flips
        ties = corrupt = 0
        for epoch in itertools.count():
            seed = int(np.random.SeedSequence(key + [epoch]).generate_state(1)[0])
            kwargs = (dict(buffer_size=self.args.shuffle_buffer_size) if self.args.streaming
                      else dict(keep_in_memory=True))  # no index file in the cache per pass
            found = False
            for row in shard.shuffle(seed=seed, **kwargs):
                if row["label_0"] not in (0, 1):
                    ties += 1
                    continue
                try:
                    example = load_pair(row, self.args.resolution, self.args.random_crop, self.args.random_flip, rng)
                except Exception:  # noqa: BLE001 - any undecodable image: skip and count, never stop the run
                    corrupt += 1
                    continue
                found = True
                yield dict(example, ties_skipped=ties, corrupt_skipped=corrupt)
                ties = corrupt = 0
            if not found:  # this shard holds no usable pair: end here, other workers' shards go on
                return


def collate_pairs(examples):
    return dict(pixels=torch.stack([e["pixels"] for e in examples]),  # (B, 2, 3, R, R), winner first
                captions=[e["caption"] for e in examples],
                time_ids=torch.tensor([e["time_ids"] for e in examples], dtype=torch.float32),  # (B, 6)
                ties_skipped=sum(e["ties_skipped"] for e in examples),
                corrupt_skipped=sum(e["corrupt_skipped"] for e in examples))


@torch.no_grad()
def encode_images(vae, pixels, generator, batch_size):
    """Images (N, 3, H, W) in [-1, 1] -> latents as the UNet sees them (the inverse of decode())."""
    latents = torch.cat([vae.encode(x.to(vae.dtype)).latent_dist.sample(generator)
                         for x in pixels.split(batch_size)]).float()
    config = vae.config
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1)
        return (latents - mean) * config.scaling_factor / std
    return (latents - (getattr(config, "shift_factor", None) or 0.0)) * config.scaling_factor


# --- the loss --------------------------------------------------------------------------------------------


def prompt_conditioning(models, prompts, resolution, time_ids=None):
    """UNet keyword arguments of the prompts alone, batch B: training uses no guidance, so no negative prompt is
    encoded. For SDXL, per-image time ids (B, 6), or those of a generated image (uncropped, at the resolution)."""
    embeds, pooled = encode_text(models, prompts)
    if not models.is_sdxl:
        return dict(encoder_hidden_states=embeds)
    if time_ids is None:
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution]).repeat(len(prompts), 1)
    return dict(encoder_hidden_states=embeds,
                added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids.to(embeds.device, embeds.dtype)))


def unet_output(unet, noisy, timesteps, cond):
    """The UNet's output without guidance, one checkpoint at --checkpointing_granularity call (see checkpointed)."""
    return checkpointed(unet, lambda x: unet(x, timesteps, **cond, return_dict=False)[0], noisy)


def noised(noise_scheduler, latents, generator, groups):
    """The forward process for `groups` stacked blocks of B latents (2: winners then losers, 1: winners alone):
    every block gets the same noise and the same t, t uniform over the training timesteps.
    Returns (noisy latents, timesteps, regression target)."""
    b = len(latents) // groups
    noise = randn(latents[:b].shape, generator, latents.device).repeat(groups, 1, 1, 1)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.repeat(groups).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noisy, timesteps, noise_scheduler.get_velocity(latents, noise, timesteps)
    return noisy, timesteps, noise


def per_sample_error(model_output, target):
    """Squared error averaged per pixel (over C, h, w): (N,)."""
    return (model_output.float() - target.float()).square().mean(dim=(1, 2, 3))


def dpo_loss(model_error, ref_error, beta):
    """Eq. 14 from the errors (2B,) of the model and the reference, winners then losers:
    -log sigmoid(-beta/2 ((L_w - L_l) - (Lref_w - Lref_l))), averaged over pairs. Also returns the logits (B,)."""
    model_w, model_l = model_error.chunk(2)
    ref_w, ref_l = ref_error.chunk(2)
    logits = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return -F.logsigmoid(logits).mean(), logits


@contextlib.contextmanager
def reference_unet(unet, adapter=None):
    """Inside, `unet` computes the reference: the same module with the policy's LoRA off (adapter None: the
    frozen base) or with the reference adapter active in its place. Under no_grad, so no graph is kept (a backward
    through disabled adapters under gradient checkpointing raises). peft's switches set LoRA requires_grad;
    every flag is put back as it was."""
    flags = [(p, p.requires_grad) for name, p in unet.named_parameters() if "lora_" in name]
    active = unet.active_adapters()
    try:
        with torch.no_grad():
            if adapter is None:
                unet.disable_adapters()
            else:
                unet.set_adapter(adapter)
            yield unet
    finally:
        if adapter is None:
            unet.enable_adapters()
        else:
            unet.set_adapter(active)
        for p, flag in flags:
            p.requires_grad_(flag)


def algorithm_loss(models, noise_scheduler, unet, latents, prompts, time_ids, generator, args, reference=None):
    """Diffusion-DPO on B pairs: latents (2B, C, h, w), winners then losers; prompts and time ids (B, 6) per pair.
    Returns the loss and detached per-batch metrics."""
    cond = prompt_conditioning(models, prompts, args.resolution, time_ids)
    if args.sft:  # the paper's SFT baseline: the diffusion loss on the winners alone
        noisy, timesteps, target = noised(noise_scheduler, latents[: len(prompts)], generator, groups=1)
        error = per_sample_error(unet_output(unet, noisy, timesteps, cond), target)
        return error.mean(), dict(model_error_w=error.mean().detach())
    cond = {k: (torch.cat([v, v]) if torch.is_tensor(v) else {n: torch.cat([x, x]) for n, x in v.items()})
            for k, v in cond.items()}
    noisy, timesteps, target = noised(noise_scheduler, latents, generator, groups=2)  # same noise and t per pair
    model_error = per_sample_error(unet_output(unet, noisy, timesteps, cond), target)
    with reference_unet(unet, None if reference is None else reference.adapter):
        ref_error = per_sample_error(unet_output(unet, noisy, timesteps, cond), target)
    loss, logits = dpo_loss(model_error, ref_error, args.beta_dpo)
    model_w, model_l = model_error.detach().chunk(2)
    ref_w, ref_l = ref_error.chunk(2)
    return loss, dict(implicit_acc=(logits.detach() > 0).float().mean(), model_error_w=model_w.mean(),
                      model_error_l=model_l.mean(), ref_error_w=ref_w.mean(), ref_error_l=ref_l.mean())


# --- online: self-rewarding rounds and the moving reference ------------------------------------------------


class ReferenceLoRA:
    """The online reference: base + a second peft adapter on the same UNet, an exponential moving average of the
    policy's LoRA weights, phi <- phi + rate (theta - phi) at each update(). It starts as a copy of the policy's
    initial LoRA (B = 0: the reference starts as the base). Trainable weights stay the policy's ("default")."""

    adapter = "ref"

    def __init__(self, unet, rate):
        self.rate = rate
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            unet.add_adapter(copy.deepcopy(unet.peft_config["default"]), adapter_name=self.adapter)  # activates it
        unet.set_adapter("default")  # the policy again; peft marks only the active adapter trainable
        params = dict(unet.named_parameters())
        self.pairs = {name: (params[name.replace(".default.", f".{self.adapter}.")], p)
                      for name, p in params.items() if "lora_" in name and ".default." in name}
        with torch.no_grad():
            for ref, policy in self.pairs.values():
                ref.data = policy.detach().float().clone()
                ref.requires_grad_(False)

    @torch.no_grad()
    def update(self):
        for ref, policy in self.pairs.values():
            ref.add_(policy.detach().float() - ref, alpha=self.rate)

    def state_dict(self):  # saved in checkpoint-N/ by accelerate (register_for_checkpointing)
        return {name: ref.detach().cpu().clone() for name, (ref, _) in self.pairs.items()}

    def load_state_dict(self, state):
        for name, (ref, _) in self.pairs.items():
            ref.data.copy_(state[name])


def round_generator(args, process_index, round_index, attempt):
    """The generator of one round's sampling: a function of (seed, process, round, attempt) alone."""
    seed = int(np.random.SeedSequence([args.seed, process_index, round_index, attempt, 1]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def sample_pairs(models, scheduler, unet, reward_fn, prompts, generator, args):
    """Blog pipeline steps 1-2: images_per_prompt samples per prompt from the current policy, scored; per prompt
    the best and the worst as (winner, loser) when their gap exceeds --pair_margin. Returns the pool (final
    latents of winners and losers, prompts, gaps) and the scores (P, k) of all samples."""
    k, latents, scores = args.images_per_prompt, [], []
    for start in range(0, len(prompts), args.train_batch_size):
        repeated = [p for p in prompts[start:start + args.train_batch_size] for _ in range(k)]  # prompt-major
        cond = encode_prompts(models, repeated, args.resolution)
        x0 = rollout(unet, scheduler, cond, initial_latents(models, args, len(repeated), generator, unet.device),
                     generator, args)
        scores.append(compute_reward(reward_fn, decode(models.vae, x0), repeated, args).float())
        latents.append(x0.float())
    latents = torch.cat(latents).unflatten(0, (len(prompts), k))  # (P, k, C, h, w)
    scores = torch.cat(scores).view(len(prompts), k)
    rows = torch.arange(len(prompts), device=scores.device)
    best, worst = scores.argmax(dim=1), scores.argmin(dim=1)
    gaps = scores[rows, best] - scores[rows, worst]
    keep = gaps > args.pair_margin
    pool = dict(winners=latents[rows, best][keep], losers=latents[rows, worst][keep], gaps=gaps[keep],
                prompts=[p for p, kept in zip(prompts, keep.tolist()) if kept])
    return pool, scores


def self_rewarding_round(models, scheduler, unet, reward_fn, args, accelerator, round_index):
    """One round's pair pool on this process, and the round's metrics gathered over processes."""
    for attempt in range(MAX_EMPTY_ROUNDS):
        generator = round_generator(args, accelerator.process_index, round_index, attempt)
        idx = torch.randint(len(args.train_prompt_list), (args.prompts_per_round,), generator=generator)
        prompts = [args.train_prompt_list[i] for i in idx]
        pool, scores = sample_pairs(models, scheduler, unet, reward_fn, prompts, generator, args)
        if pool["prompts"]:
            break
    else:
        raise RuntimeError(f"no pair with a reward gap above --pair_margin {args.pair_margin} in {MAX_EMPTY_ROUNDS} "
                           f"samplings of round {round_index + 1}; lower --pair_margin or raise --images_per_prompt")
    sums = torch.stack([scores.sum(), scores.square().sum(), torch.tensor(float(scores.numel()), device=scores.device),
                        pool["gaps"].sum(), torch.tensor(float(len(pool["gaps"])), device=scores.device)])
    s, s2, n, gap_sum, kept = accelerator.reduce(sums, reduction="sum").tolist()
    mean = s / n
    return pool, dict(round=round_index + 1, reward_mean=mean,
                      reward_std=math.sqrt(max(s2 / n - mean ** 2, 0.0) * n / max(n - 1, 1)),
                      pairs_kept=int(kept), pair_margin=gap_sum / kept, resampled=attempt)


# --- the training loop -------------------------------------------------------------------------------------


def main(args):
    """Train; returns the last metrics row (with the final eval reward) so that tests can call it."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    info = check_arguments(args)  # every bad input fails here, before a large model loads
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available(),
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")))
    device, main_process = accelerator.device, accelerator.is_main_process
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.preset:
            print(f"preset {args.preset}: " + json.dumps(PRESETS[args.preset]))
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            config = {k: v for k, v in vars(args).items() if not k.endswith("_prompt_list")}
            json.dump(dict(config, versions=library_versions(), script=os.path.basename(__file__),
                           num_processes=accelerator.num_processes), f, indent=2)
    data = None
    if not args.online:
        with accelerator.main_process_first():  # a bad dataset fails here too, before the models load
            data = open_pairs(args)

    models = load_models(args, info, device, weight_dtype)
    if args.cache_prompt_embeds:
        size = cache_prompt_embeds(models, args.train_prompt_list + args.eval_prompt_list)
        accelerator.print(f"prompt embeddings cached: {len(models.prompt_cache)} prompts, {size:.1f} MiB; text "
                          f"encoders moved to the CPU")
    scheduler = make_scheduler(args)  # sampling: online rounds and the evaluation grid
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler",
                                                    revision=args.revision)  # training: the forward process
    reward_fn = rewards.build_reward(args.reward, device=device, dtype=weight_dtype, **info["reward_options"])
    set_seed(args.seed)  # the same LoRA init on every process
    unet = models.unet
    params = add_lora(unet, args)
    reference = ReferenceLoRA(unet, args.ref_update_rate) if args.online and args.ref_update_rate > 0 else None
    if args.gradient_checkpointing:
        enable_checkpointing(unet, models.vae, args.checkpointing_granularity)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    # As in drtune.py the UNet is not wrapped in DDP (the reference forward toggles adapters on the bare module);
    # LoRA gradients are all-reduced by hand. accelerate owns the optimizer, scaler and autocast.
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    if reference is not None:
        accelerator.register_for_checkpointing(reference)
    start_step = resume_step(accelerator, unet, models, args)
    metrics = MetricsLog(accelerator, os.path.join(args.output_dir, "metrics.jsonl"), start_step)
    if main_process and args.report_to != "none":
        accelerator.init_trackers(os.path.basename(__file__).removesuffix(".py"),
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    if data is not None:
        stream = PickAPicPairs(data, args, accelerator.process_index, accelerator.num_processes, args.seed + start_step)
        batches = iter(torch.utils.data.DataLoader(stream, batch_size=args.train_batch_size, collate_fn=collate_pairs,
                                                   num_workers=args.dataloader_num_workers))

    total_batch = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    accelerator.print(f"{'SDXL' if models.is_sdxl else 'SD1.5'} | {'online' if args.online else 'offline'} "
                      f"{'SFT' if args.sft else 'DPO'} | {len(params)} LoRA tensors, "
                      f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable | {total_batch} pairs per step "
                      f"({args.train_batch_size} x accumulation {args.gradient_accumulation_steps} x "
                      f"{accelerator.num_processes} processes) | {args.max_train_steps} steps from {start_step}")
    if main_process and start_step == 0:
        with accelerator.autocast():
            eval_reward, _ = evaluate(models, scheduler, unet, reward_fn, args, 0)
        metrics.log(dict(step=0, eval_reward=eval_reward))

    row, nonfinite_in_a_row, pool, skipped_data = {}, 0, None, dict(ties_skipped=0, corrupt_skipped=0)
    progress = tqdm(initial=start_step, total=args.max_train_steps, disable=not main_process, desc="steps")
    for step in range(start_step + 1, args.max_train_steps + 1):
        start = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        round_row, round_end = {}, False
        if args.online:
            round_index, position = divmod(step - 1, args.steps_per_round)
            round_end = position == args.steps_per_round - 1
            if position == 0 or pool is None:  # a new round (or a resume mid-round: a fresh pool)
                with accelerator.autocast():
                    pool, round_row = self_rewarding_round(models, scheduler, unet, reward_fn, args, accelerator,
                                                           round_index)
        generator = step_generator(args, accelerator.process_index, step)
        losses, stats = [], {}
        for _ in range(args.gradient_accumulation_steps):
            if args.online:
                idx = torch.randint(len(pool["prompts"]), (args.train_batch_size,), generator=generator).tolist()
                latents = torch.cat([pool["winners"][idx], pool["losers"][idx]])
                prompts, time_ids = [pool["prompts"][i] for i in idx], None
            else:
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"--dataset_name {args.dataset_name}: no usable pair left for process "
                                       f"{accelerator.process_index} (every row a tie or an unreadable image)")
                pixels = batch["pixels"].to(device)
                latents = encode_images(models.vae, torch.cat([pixels[:, 0], pixels[:, 1]]), generator,
                                        args.vae_encode_batch_size)
                prompts, time_ids = batch["captions"], batch["time_ids"]
                for key in skipped_data:
                    skipped_data[key] += batch[key]
            with accelerator.autocast():
                loss, extra = algorithm_loss(models, noise_scheduler, unet, latents, prompts, time_ids, generator,
                                             args, reference)
            accelerator.backward(loss / args.gradient_accumulation_steps)
            losses.append(loss.detach().reshape(1))
            for key, value in extra.items():
                stats.setdefault(key, []).append(value.reshape(1))
        all_reduce_grads(accelerator, params)
        grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        finite = math.isfinite(grad_norm)
        if finite or accelerator.scaler is not None:  # the fp16 scaler skips non-finite updates itself
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
        if reference is not None and round_end:
            reference.update()  # step 4 of the round: phi <- phi + rate (theta - phi)

        row = dict(step=step, loss=accelerator.gather(torch.cat(losses)).mean().item(), grad_norm=grad_norm,
                   lr=lr_scheduler.get_last_lr()[0], seconds=time.time() - start, peak_memory_mb=peak_memory_mb(device),
                   skipped=not finite, **{k: accelerator.gather(torch.cat(v)).float().mean().item()
                                           for k, v in stats.items()}, **round_row)
        if not args.online:
            row.update({k: int(accelerator.reduce(torch.tensor(v, device=device), reduction="sum"))
                        for k, v in skipped_data.items()})
        if step % args.validation_steps == 0 or step == args.max_train_steps or round_end:
            if main_process:
                with accelerator.autocast():
                    row["eval_reward"], _ = evaluate(models, scheduler, unet, reward_fn, args, step)
            accelerator.wait_for_everyone()
        metrics.log(row)
        progress.update(1)
        progress.set_postfix(loss=f"{row['loss']:.4g}", acc=f"{row.get('implicit_acc', float('nan')):.2f}")
        if step % args.logging_steps == 0 and main_process:
            progress.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if nonfinite_in_a_row >= args.max_nonfinite_steps:
            raise RuntimeError(f"{nonfinite_in_a_row} updates in a row had a NaN/inf loss or gradient; stopped at "
                               f"step {step}. The last checkpoint in {args.output_dir} is intact.")
        if step % args.checkpointing_steps == 0 and finite:
            save_checkpoint(accelerator, unet, models, args, step)
    progress.close()

    accelerator.wait_for_everyone()
    if main_process:
        save_lora(unet, models.is_sdxl, args.output_dir)
        with accelerator.autocast():
            after = generate(models, scheduler, unet, args.eval_prompt_list, args, args.seed)
            with reference_unet(unet):
                before = generate(models, scheduler, unet, args.eval_prompt_list, args, args.seed)
        save_grid(torch.cat([before, after]), os.path.join(args.output_dir, "samples", "before_after.png"), nrow=2)
        plot_reward_curve(metrics.rows, os.path.join(args.output_dir, "reward_curve.png"))
    accelerator.end_training()
    return row


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except (UsageError, rewards.RewardLoadError) as error:
        sys.exit(f"{os.path.basename(__file__)}: error: {error}")
