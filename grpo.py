"""GRPO: group-relative policy optimization of text-to-image diffusion models (DDPO, Flow-GRPO, MixGRPO).

Papers: Black et al., "Training Diffusion Models with Reinforcement Learning" (DDPO, 2023),
https://arxiv.org/abs/2305.13301; Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL" (2025),
https://arxiv.org/abs/2505.05470; Xue et al., "DanceGRPO: Unleashing GRPO on Visual Generation" (2025),
https://arxiv.org/abs/2505.07818; Li et al., "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE
Sampling" (2025), https://arxiv.org/abs/2507.21802. Official code: github.com/kvablack/ddpo-pytorch,
github.com/yifan123/flow_grpo, github.com/XueZeyue/DanceGRPO.

The reward needs no gradient. Sampling is a Markov chain of Gaussian steps x_{i+1} ~ N(mean_theta(x_i), std_i^2):
DDIM with eta > 0 (or DDPM) on SD1.5/SDXL as DDPO does, the SDE form of the flow Euler step on SD3/FLUX as Flow-GRPO
derives it (std_i = a sqrt(sigma / (1 - sigma)) sqrt(-dt), a = --eta). Each prompt gets a group of G images from
different noise; each image's advantage is its reward minus the group's mean over the group's std (or the whole
batch's: Flow-GRPO's global std), clipped to [-A, A]. The sampled batch is then trained on for a few updates with
PPO's clipped objective on every trained transition,

    loss = mean over images and trained steps of max(-A r, -A clip(r, 1 - eps, 1 + eps)) + beta KL,
    r = p_theta(x_{i+1} | x_i) / p_old(x_{i+1} | x_i),   KL = |mean_theta - mean_ref|^2 / (2 std_i^2),

the KL to the reference (the same model with the LoRA off) being that of two Gaussians with the same std, per
dimension (Flow-GRPO; beta 0 is DDPO).

Knobs that matter: --group_size (G), --learning_rate, --clip_range (eps, 1e-4 in all three papers), --beta, --eta,
--timestep_fraction, --sde_window_size (MixGRPO), --updates_per_round, --train_batch_size (prompts per process).

Choices, with the official code as the reference where the papers are silent:
- Log-densities are means over the latent's dimensions, in fp32 (DDPO's and Flow-GRPO's code); the step's mean and
  std are the scaffold's step_mean_std, which tests/test_flow.py and tests/test_grpo.py check against
  scheduler.step and torch.distributions.Normal.
- The ratio's denominator: a public implementation takes the log-density recorded while sampling, so its ratio is 1
  at the first update only when the training forward sees the same batch as the sampling one (batch composition, the
  CFG batch and dtype change the float result; at eps = 1e-4 that noise alone clips). Here the old log-density is
  the training forward's own: on the first update of a round it is that forward's detached value, so r = 1 exactly
  whatever the batch is split into; the transitions of later updates get theirs from a no-grad pass before the first
  update, chunked as training will chunk them. The sampling forward's value is only compared (metric logp_mismatch).
- Advantages: population std plus 1e-4 (Flow-GRPO's tracker; DDPO's adds 1e-6); a group whose rewards are all equal
  gets advantage 0 exactly (no signal, not float noise), and with beta = 0 its images are not trained on (Flow-GRPO
  drops them too). DDPO's per-prompt tracker keeps a history of earlier rewards per prompt; here each group is one
  round's G images of a prompt, as GRPO does.
- Trained steps: per image, int(--timestep_fraction x S) of its S stochastic steps, drawn at random per image
  (DDPO, DanceGRPO; Flow-GRPO takes the first ones, which at 0.99 of 10 steps is all but the last).
  MixGRPO: --sde_window_size W samples only W consecutive steps with the SDE and the rest with the ODE (DDIM eta 0 /
  the Euler step: cheaper, no density) and trains on the window; the window starts at the first step and moves by
  --sde_window_stride every --sde_window_every rounds, l = min(l + s, T - W) (MixGRPO's Algorithm 1).
- CFG in sampling and in training at --guidance_scale (DDPO, Flow-GRPO); FLUX.1-dev uses its guidance embedding.
- One step (--max_train_steps, checkpoints, logging) is one round: each process samples --train_batch_size prompts x
  --gradient_accumulation_steps batches, G images each; then --num_inner_epochs passes over the round's images,
  each cut into --updates_per_round optimizer updates (images shuffled per pass, DDPO's inner loop; Flow-GRPO: 1
  pass, 2 updates). The learning-rate schedule counts updates. --train_micro_batch bounds the transitions per
  training forward (memory only).
- Processes: the round's prompts and every image's noise are functions of (seed, round, image index) alone, the
  advantages are computed on all processes' rewards, and an update's loss is the mean over the transitions of all
  processes: N processes make the same updates as one (tests/test_grpo.py) and a resumed run the same as an
  uninterrupted one.
- Flow models: the SDE of Flow-GRPO for every preset. DanceGRPO's own SDE has a constant noise eta sqrt(-dt) with
  another mean correction and a shifted schedule (shift 3); its preset keeps its a = 0.3 in Flow-GRPO's form
  (sigma_t = 0.3 at sigma = 0.5) and the pipeline's schedule.
- LoRA alpha = rank (the scaffold's); Flow-GRPO's alpha 64 at rank 32 (scale 2) and DanceGRPO's 256 at 128 are
  not reproduced: with Adam a scale-2 LoRA moves about as a scale-1 LoRA at twice the learning rate.

    # DDPO's SD1.5 recipe (aesthetic reward, DDIM eta 1, 50 steps, CFG 5), 8 GPUs
    accelerate launch --num_processes 8 grpo.py --preset sd15-ddpo --output_dir outputs/ddpo-sd15
    # Flow-GRPO on SD3.5-Medium with PickScore (10 SDE steps at a = 0.7, group 24, KL 0.01)
    accelerate launch --num_processes 8 grpo.py --preset sd35-flow-grpo --output_dir outputs/flow-grpo-sd35
    # ... with MixGRPO's window (4 SDE steps sliding over the schedule, ODE elsewhere)
    accelerate launch --num_processes 8 grpo.py --preset sd35-flow-grpo --sde_window_size 4 --sde_window_every 25
    # DanceGRPO on FLUX.1-dev with HPS v2.1 (group 12, 12 steps, a = 0.3, shared initial noise per group)
    accelerate launch --num_processes 8 grpo.py --preset flux-dancegrpo --output_dir outputs/dancegrpo-flux
    # a reward of your own, no gradient needed: a function (images in [0, 1], prompts) -> one score per image
    python grpo.py --preset demo --reward my_rewards.py:ocr_score --train_prompts prompts.txt
    # the CPU demo: the tiny world's pixel checker (a miniature GenEval) on two-shape prompts with position words
    python grpo.py --preset demo
    python grpo.py --preset demo --pretrained_model_name_or_path tiny_models/world-sd3   # Flow-GRPO on the SD3 world
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import resource
import shutil
import sys
import time
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import rewards

HERE = os.path.dirname(os.path.abspath(__file__))
# The trained tiny world (tiny_models/build_world.py): every --preset demo runs on it, on CPU. Its reward models
# stand in for the real ones under the same names (clipscore, hpsv21, pickscore, aesthetic; see the README).
WORLD = os.path.join(HERE, "tiny_models")
WORLD_DEMO = dict(
    pretrained_model_name_or_path=os.path.join(WORLD, "world-sd15"), resolution=32, mixed_precision="no",
    train_prompts=os.path.join(WORLD, "world-train-prompts.txt"), eval_prompts=os.path.join(WORLD, "world-eval-prompts.txt"),
    reward_options=",".join(f"{k}={os.path.join(WORLD, v)}" for k, v in [
        ("clip_model", "world-clip/open_clip_config.json"), ("clip_pretrained", "world-clip/open_clip_model.pt"),
        ("hps_model", "world-clip/open_clip_config.json"), ("hps_checkpoint", "world-clip/open_clip_model.pt"),
        ("pickscore_model", "world-clip"), ("pickscore_processor", "world-clip"), ("aesthetic_clip", "world-clip"),
        ("aesthetic_mlp", "world-aesthetic.safetensors")]),
)
# The SD3-format world (tiny_models/world-sd3, same data, VAE and CLIP): `--preset demo --pretrained_model_name_or_path
# tiny_models/world-sd3` applies the demo preset's "sd3" settings over its others. Its T5 slot was 77 zero tokens. The
# demos train it at lower learning rates than the SD1.5 world (its LoRA also adapts the text stream's projections;
# at 3e-3 DRTune's and DRaFT's eval rewards rose, then fell, and online DPO at 2e-3 lost half the prompts).
WORLD_DEMO_SD3 = dict(sampler="euler", max_sequence_length=77)

# ---------------------------------------------------------------------------------------------
# Algorithm: arguments and presets
# ---------------------------------------------------------------------------------------------


def add_algorithm_arguments(parser):
    # DDPO's stochastic sampler (DDIM eta 1: NEEDS_STOCHASTIC_STEPS makes ddim the SD default; flow models: the SDE
    # of the Euler step at a = 1, Flow-GRPO's presets 0.7), 20 steps; DDPO's and Flow-GRPO's weight decay
    parser.set_defaults(eta=1.0, num_inference_steps=20, reward="pickscore", adam_weight_decay=1e-4, rank=32)
    group = parser.add_argument_group("GRPO")
    group.add_argument("--group_size", type=int, default=8,
                       help="G: images per prompt, each from its own noise (Flow-GRPO 24 on SD3.5, DanceGRPO 12)")
    group.add_argument("--advantage_std", choices=["group", "batch"], default="group",
                       help="advantage = (r - group mean) / std of the group's rewards, or of the whole round's "
                            "(Flow-GRPO's global_std)")
    group.add_argument("--advantage_clip", type=float, default=5.0, help="A: advantages clipped to [-A, A] (all papers 5)")
    group.add_argument("--clip_range", type=float, default=1e-4,
                       help="eps of the clipped ratio, clip(r, 1 - eps, 1 + eps) (DDPO, Flow-GRPO, DanceGRPO: 1e-4)")
    group.add_argument("--beta", type=float, default=0.0,
                       help="weight of the KL to the reference (the LoRA off); Flow-GRPO 0.04 GenEval, 0.01 PickScore")
    group.add_argument("--timestep_fraction", type=float, default=1.0,
                       help="train on int(fraction x S) of each image's S stochastic steps, drawn per image "
                            "(DDPO 1.0, DanceGRPO 0.6)")
    group.add_argument("--num_inner_epochs", type=int, default=1, help="passes over each round's images (DDPO 1)")
    group.add_argument("--updates_per_round", type=int, default=1,
                       help="optimizer updates per pass over a round's images (Flow-GRPO 2)")
    group.add_argument("--train_micro_batch", type=int, default=32,
                       help="transitions per training forward/backward (memory only)")
    group.add_argument("--sde_window_size", type=int, default=0,
                       help="MixGRPO: only this many consecutive steps sample with the SDE and are trained, the others "
                            "take the ODE step; 0 = every step stochastic (DDPO, Flow-GRPO)")
    group.add_argument("--sde_window_stride", type=int, default=1, help="MixGRPO: steps the window moves (s)")
    group.add_argument("--sde_window_every", type=int, default=25, help="MixGRPO: rounds between moves (tau)")
    group.add_argument("--shared_initial_noise", action="store_true",
                       help="the G images of a group start from the same x_T and differ by the SDE's noise only "
                            "(DanceGRPO's init_same_noise)")


def check_algorithm_arguments(args):
    T = args.num_inference_steps
    stochastic = args.sampler == "ddpm" or (args.sampler in ("ddim", "euler") and args.eta > 0)
    if not stochastic:
        raise UsageError(f"GRPO trains on the density of stochastic steps: use --sampler ddim with --eta > 0 (DDPO: "
                         f"eta 1) or ddpm, or on SD3/FLUX --sampler euler with --eta > 0 (its SDE, Flow-GRPO: 0.7), "
                         f"not --sampler {args.sampler} --eta {args.eta}")
    if args.group_size < 2:
        raise UsageError(f"--group_size {args.group_size} must be >= 2: the advantage compares images of one prompt")
    if args.advantage_clip <= 0:
        raise UsageError("--advantage_clip must be > 0")
    if not 0 < args.clip_range < 1:
        raise UsageError(f"--clip_range {args.clip_range} must be in (0, 1)")
    if not (args.beta >= 0 and math.isfinite(args.beta)):
        raise UsageError(f"--beta {args.beta} must be a number >= 0")
    if not 0 < args.timestep_fraction <= 1:
        raise UsageError(f"--timestep_fraction {args.timestep_fraction} must be in (0, 1]")
    for flag in ("num_inner_epochs", "updates_per_round", "train_micro_batch", "sde_window_stride", "sde_window_every"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1")
    if not 0 <= args.sde_window_size <= T:
        raise UsageError(f"--sde_window_size {args.sde_window_size} must be in [0, {T}] (--num_inference_steps)")
    if args.sde_window_size and args.sampler == "ddpm":
        raise UsageError("--sde_window_size needs an ODE step outside the window: use --sampler ddim (eta > 0) or "
                         "euler, not ddpm")
    images = args.train_batch_size * args.gradient_accumulation_steps * args.group_size
    if args.updates_per_round > images:
        raise UsageError(f"--updates_per_round {args.updates_per_round} is more than the {images} images a process "
                         f"samples per round (--train_batch_size x --gradient_accumulation_steps x --group_size)")


# The demo's prompts: two shapes, each with a position word (tiny_models/world.py position_prompts): it trains on
# captions whose words are opposite sides, the layouts the world can draw, and is read on 40 others with any two sides.
POSITION_PROMPTS = dict(train_prompts=os.path.join(WORLD, "world-position-train-prompts.txt"),
                        eval_prompts=os.path.join(WORLD, "world-position-eval-prompts.txt"))
PRESETS = {
    # CPU: the tiny world toward what its pixel checker reads, on two-shape captions with position words where the base
    # model places both shapes right 8-12% of the time (plug-in rewards of tiny_models/world.py: `reward`, the fraction
    # of the caption's fields drawn right, plus `placement`, the fraction of position words obeyed). MixGRPO's window
    # on the first 8 of 20 DDIM steps (eta 1 inside, 0 outside): the layout is decided there, and the later steps'
    # transitions would only add noise to the gradient; groups of 16 from 2 prompts; the KL (0.04, Flow-GRPO's)
    # keeps the drawing: without it, at lr 3e-3, the reward fell by a third to a half within 40-55 rounds.
    # Measured (BENCHMARKS.md, "GRPO on the world's two-shape placement"): it does not reach the issue's goal.
    "demo": dict(
        WORLD_DEMO, **POSITION_PROMPTS, output_dir="outputs/grpo-demo",
        reward=",".join(os.path.join(WORLD, f"world.py:{f}") for f in ("reward", "placement")),
        sampler="ddim", eta=1.0, num_inference_steps=20, guidance_scale=5.0, group_size=16, train_batch_size=2,
        learning_rate=3e-3, beta=0.04, rank=8, max_grad_norm=1.0, sde_window_size=8, sde_window_every=10**6,
        timestep_fraction=1.0, max_train_steps=100, validation_steps=25, checkpointing_steps=50, num_eval_prompts=8,
        sd3=dict(WORLD_DEMO_SD3, guidance_scale=4.0, eta=0.7, group_size=8, sde_window_size=6, learning_rate=2e-3),
    ),
    # DDPO (ddpo-pytorch config/dgx.py aesthetic): SD1.5, 512 px, DDIM eta 1, 50 steps, CFG 5, LoRA (rank 4), lr 3e-4,
    # AdamW weight decay 1e-4, clip 1.0, fp16, clip range 1e-4, advantage clip 5, every step trained, 256 images
    # per epoch on 8 GPUs in 4 updates, LAION aesthetic reward. Its prompts are 45 animal names; here HPS v2's.
    "sd15-ddpo": dict(
        pretrained_model_name_or_path="stable-diffusion-v1-5/stable-diffusion-v1-5", resolution=512,
        sampler="ddim", eta=1.0, num_inference_steps=50, guidance_scale=5.0, reward="aesthetic",
        train_prompts="hpsv2-train", eval_prompts="hpsv2-benchmark", group_size=8, train_batch_size=2,
        gradient_accumulation_steps=2, updates_per_round=4, learning_rate=3e-4, adam_weight_decay=1e-4, rank=4,
        max_grad_norm=1.0, clip_range=1e-4, advantage_clip=5.0, timestep_fraction=1.0, mixed_precision="fp16",
        max_train_steps=200, gradient_checkpointing=True,
    ),
    # Flow-GRPO (config/grpo.py pickscore_sd3): SD3.5-Medium, 512 px, 10 SDE steps at a = 0.7 (40 for evaluation:
    # evaluate.py --num_inference_steps 40), CFG 4.5, group 24, global std, KL beta 0.01, clip range 1e-4,
    # advantage clip 5, lr 3e-4, weight decay 1e-4, LoRA rank 32, timestep fraction 0.99, 2 updates per epoch,
    # PickScore on Pick-a-Pic prompts (its dataset/pickscore). GenEval/OCR: beta 0.04 and a rule-based reward (a
    # plug-in here).
    "sd35-flow-grpo": dict(
        pretrained_model_name_or_path="stabilityai/stable-diffusion-3.5-medium", resolution=512, sampler="euler",
        eta=0.7, num_inference_steps=10, guidance_scale=4.5, reward="pickscore", train_prompts="pickapic-train",
        eval_prompts="pickapic-validation", group_size=24, advantage_std="batch", train_batch_size=1,
        gradient_accumulation_steps=2, updates_per_round=2, beta=0.01, clip_range=1e-4, advantage_clip=5.0,
        learning_rate=3e-4, adam_weight_decay=1e-4, rank=32, timestep_fraction=0.99, max_grad_norm=1.0,
        mixed_precision="bf16", gradient_checkpointing=True, checkpointing_granularity="block", max_train_steps=1000,
        train_micro_batch=8,
    ),
    # DanceGRPO (scripts/finetune/finetune_flux_grpo_8gpus_lora.sh): FLUX.1-dev, 720 px, 12 steps, a = 0.3, no CFG
    # (guidance embedding 3.5), group 12 from one initial noise, timestep fraction 0.6, clip range 1e-4, advantage
    # clip 5, lr 3e-4 (LoRA rank 128), weight decay 1e-4, HPS v2.1.
    "flux-dancegrpo": dict(
        pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev", resolution=720, sampler="euler", eta=0.3,
        num_inference_steps=12, reward="hpsv21", train_prompts="hpsv2-train", eval_prompts="hpsv2-benchmark",
        group_size=12, shared_initial_noise=True, timestep_fraction=0.6, clip_range=1e-4, advantage_clip=5.0,
        learning_rate=3e-4, adam_weight_decay=1e-4, rank=128, max_grad_norm=1.0, train_batch_size=1,
        gradient_accumulation_steps=2, mixed_precision="bf16", gradient_checkpointing=True,
        checkpointing_granularity="block", max_train_steps=300, train_micro_batch=4,
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
# A resume may change how long the run goes and what it logs, evaluates and saves, and the memory and speed switches
# that leave the updates as they are. Every other flag defines the run and must match the checkpoint's, except the
# RESUME_CHANGES flags when --resume_changes names them.
RESUME_MAY_CHANGE = {"max_train_steps", "logging_steps", "validation_steps", "checkpointing_steps",
                     "checkpoints_total_limit", "resume_from_checkpoint", "resume_changes", "report_to",
                     "max_nonfinite_steps", "output_dir", "preset", "eval_prompts", "num_eval_prompts",
                     "gradient_checkpointing", "allow_tf32", "run_id", "validation_lora_scale",
                     "validation_dataset_name", "validation_dataset_split", "num_validation_pairs"}
RESUME_CHANGES = ("learning_rate", "max_grad_norm")
CHECKPOINT_MARKER = "checkpoint.json"  # written last: a checkpoint-N folder without it is incomplete or not ours


class UsageError(ValueError):
    """Bad input, reported as one line before any large model is loaded (exit code 2)."""


class TrainingStopped(RuntimeError):
    """A run that cannot go on (NaN/inf updates in a row, no training data left), reported as one line (exit code 1)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other bad input (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = OneLineParser(prog=os.path.basename(__file__), description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("experiment")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named overrides of the defaults (printed and saved); explicit flags win")
    g.add_argument("--output_dir", default="outputs/run")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                   help="hub id or local diffusers folder of an SD1.5, SDXL, SD3/SD3.5 or FLUX pipeline (the family is "
                        "read from its model_index.json)")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="another VAE, e.g. an fp16-safe SDXL VAE (otherwise SDXL's VAE is kept in fp32)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g = parser.add_argument_group("sampling")
    g.add_argument("--resolution", type=int, default=512)
    g.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp", "euler"], default=None,
                   help="SD1.5/SDXL: DDPM, DDIM (with --eta) or DPM-Solver++ 2M; SD3/FLUX: euler, the flow Euler step "
                        "of their pipelines (with --eta > 0: Flow-GRPO's SDE form); built from the pipeline's "
                        "scheduler config (default: ddpm, or euler for flow models)")
    g.add_argument("--eta", type=float, default=0.0,
                   help="step stochasticity: DDIM's eta (0: deterministic, 1: DDPM-like); on flow models the SDE's "
                        "noise level a, sigma_t = a sqrt(sigma / (1 - sigma)) (0: the ODE step; Flow-GRPO: 0.7)")
    g.add_argument("--num_inference_steps", type=int, default=50, help="T")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="classifier-free guidance; <= 1 disables it (default: the family's pipeline, SD1.5 7.5, SDXL "
                        "5, SD3 7; FLUX: none, it is guidance-distilled: see --true_cfg)")
    g.add_argument("--true_cfg", action="store_true",
                   help="FLUX: classifier-free guidance at --guidance_scale with the empty negative prompt (FluxPipeline's "
                        "true_cfg_scale), besides the distilled --guidance_embedding")
    g.add_argument("--guidance_embedding", type=float, default=None,
                   help="FLUX.1-dev's distilled guidance, fed to its guidance embedding (FluxPipeline's guidance_scale; "
                        "default 3.5); only for checkpoints that have one")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="SD3/FLUX: T5 tokens (default: the pipeline's, SD3 256, FLUX 512; the SD3 world was trained "
                        "with 77); without a T5 encoder, SD3's T5 slot holds this many zero tokens")
    g = parser.add_argument_group("reward")
    g.add_argument("--reward", default="hpsv21",
                   help="rewards.py name or weighted sum, e.g. symmetry:1,clipscore:0.1; your own function as "
                        "path/to/file.py:function or package.module:function: (images in [0, 1], prompts) -> one "
                        "score per image (README: Your own reward)")
    g.add_argument("--reward_options", default="", help="rewards.py options, e.g. hps_checkpoint=/path/file.pt")
    g.add_argument("--reward_resolution", type=int, default=None,
                   help="down-sample images to this size before the reward (the paper: 224 for SD1.5)")
    g.add_argument("--train_prompts", default=None,
                   help="hpsv2-train or hpsv2-benchmark (HPS v2's prompts, from the hub dataset zhwang/HPDv2), "
                        "pickapic-train or pickapic-validation (Pick-a-Pic v1's, from the hub dataset "
                        "yuvalkirstain/pickapic_v1_no_images; NAME:/folder for a local copy), a .txt file (one prompt "
                        "per line), a .json list of prompts or of records (or a folder of them), a .csv/.jsonl/"
                        ".parquet file, or a dataset id / folder, with a 'prompt', 'caption' or 'text' column")
    g.add_argument("--eval_prompts", default=None, help="as --train_prompts; the fixed evaluation grid")
    g.add_argument("--prompt_template", default=None,
                   help="put each training and evaluation prompt in place of {}, e.g. '{}, and books.' (the DRTune "
                        "paper's objectness prompts)")
    g.add_argument("--num_eval_prompts", type=int, default=8)
    g = parser.add_argument_group("optimization")
    g.add_argument("--train_batch_size", type=int, default=1, help="per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", default="constant",
                   help="diffusers.optimization.get_scheduler name: linear, cosine, cosine_with_restarts, polynomial, "
                        "constant, constant_with_warmup")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--finetune", choices=["lora", "full"], default="lora",
                   help="lora: a LoRA on the denoiser (the default); full: every weight of the denoiser in fp32 "
                        "(compute in --mixed_precision), sharded with FSDP2 over several processes; --rank, "
                        "--lora_target_modules and --validation_lora_scale are then not used")
    g.add_argument("--rank", type=int, default=128, help="LoRA rank (alpha = rank)")
    g.add_argument("--lora_target_modules", default=None,
                   help="comma-separated module names the LoRA adapts (default: the attention projections, "
                        "to_q,to_k,to_v,to_out.0, and on SD3/FLUX also the text stream's add_q_proj,add_k_proj,"
                        "add_v_proj,to_add_out, as diffusers' SD3 and FLUX LoRA examples train)")
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
    g.add_argument("--validation_lora_scale", type=float, default=1.0,
                   help="LoRA scale of the evaluation grids and before_after.png (FDXL: 0.7); training uses 1")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint-N folder or 'latest'; the run's flags must match the checkpoint's, except those "
                        "of how long it runs and what it logs, evaluates and saves (README: Resuming and checkpoints)")
    g.add_argument("--resume_changes", default="",
                   help=f"on resume, let these flags differ from the checkpoint's and apply them from there on "
                        f"(comma-separated, of: {', '.join(RESUME_CHANGES)})")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    add_algorithm_arguments(parser)
    args = parser.parse_args(argv)
    if args.preset is not None:  # presets replace defaults, so flags given explicitly still win
        preset = dict(PRESETS[args.preset])
        per_family = {f: preset.pop(f) for f in FAMILIES if f in preset}
        defaults = {dest: parser.get_default(dest) for dest in vars(args)}
        parser.set_defaults(**preset)
        args = parser.parse_args(argv)
        if per_family:  # a preset's settings for one family (the SD3 world's demo) go over its others
            from diffusers import DiffusionPipeline
            family = detect_family(load_config_or_fail(DiffusionPipeline, args.pretrained_model_name_or_path, "model",
                                                       "--pretrained_model_name_or_path", revision=args.revision))
            preset.update(per_family.get(family, {}))
            parser.set_defaults(**per_family.get(family, {}))
            args = parser.parse_args(argv)
        yield_to_modes_switched_off(args, preset, defaults, typed_flags(argv))
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


PROMPT_FILE_TYPES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PROMPT_FIELDS = ("prompt", "caption", "text")
# The HPS v2 prompts (Wu et al. 2023), in the hub dataset HPSV2_DATASET or a local copy of its JSON files: the
# benchmark, benchmark/{style}.json (a list of 800 prompts per style; the layout the hpsv2 package downloads), and the
# training annotations train.json at the top (one record per image pair, with a 'prompt' field; the place the HPS v2
# README gives, not checked against the hub here).
HPSV2_DATASET = "zhwang/HPDv2"
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
# Pick-a-Pic v1's prompts (Kirstain et al. 2023), in the hub dataset PICKAPIC_DATASET (its comparisons without the
# images) or a local copy of its files data/{split}-*.parquet: one row per comparison, the prompt in 'caption'.
PICKAPIC_DATASET = "yuvalkirstain/pickapic_v1_no_images"
PICKAPIC_SPLITS = {"pickapic-train": "train", "pickapic-validation": "validation_unique"}
PROMPT_SETS = {
    "hpsv2-benchmark": "the DRTune paper's 400 evaluation prompts: 100 of each HPS v2 benchmark style",
    "hpsv2-train": "the HPS v2 training prompts (train.json), each once",
    "pickapic-train": "the prompts of Pick-a-Pic v1's train split, each once (SPO's 4k training prompts come from it)",
    "pickapic-validation": "Pick-a-Pic v1's validation_unique split: 500 prompts (the SPO paper's evaluation prompts)",
}


def prompts_of_json(path, flag):
    """The prompts of a JSON file that holds a list of strings (HPS v2's benchmark/{style}.json) or of records with a
    'prompt', 'caption' or 'text' field (HPS v2's train.json: one record per image pair, so each distinct prompt is kept
    once, where first seen). None for any other JSON (JSON Lines, an object): datasets reads those."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError:
        return None
    if not isinstance(data, list):
        return None
    if all(isinstance(item, str) for item in data):
        return [item.strip() for item in data]
    if not all(isinstance(item, dict) for item in data):
        raise UsageError(f"{flag} {path}: a JSON prompt file holds a list of strings or of records with a 'prompt', "
                         f"'caption' or 'text' field")
    field = next((k for k in PROMPT_FIELDS if any(k in item for item in data)), None)
    if field is None:
        raise UsageError(f"{flag} {path}: no 'prompt', 'caption' or 'text' field in its records")
    return list(dict.fromkeys(str(item[field]).strip() for item in data if item.get(field) is not None))


def hpsv2_file(source, name, flag):
    """The file `name` (benchmark/anime.json, train.json) of the HPS v2 prompts: under the local folder `source`, or
    downloaded from the hub dataset `source`."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise UsageError(f"{flag}: {source} has no {name}; a copy of {HPSV2_DATASET} holds benchmark/"
                             f"{{{','.join(HPSV2_STYLES)}}}.json and train.json")
        return path
    if not is_hub_id(source):
        raise UsageError(f"{flag}: no such folder {source}")
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(source, name, repo_type="dataset")
    except Exception as e:  # offline, not cached, no such file
        raise UsageError(f"{flag}: could not fetch {name} from the hub dataset {source} ({type(e).__name__}); without "
                         f"network copy its JSON files (benchmark/{{style}}.json, train.json) into a folder and pass "
                         f"{flag} NAME:/path/to/folder, e.g. hpsv2-benchmark:/data/HPDv2") from e


def hpsv2_prompts(name, source, flag):
    """(prompts, styles) of a named set, from a local folder or hub dataset `source`.
    hpsv2-benchmark: from each style's file the 100 prompts whose index i has the smallest
    sha256('hpsv2-benchmark/{style}/{i}'): a draw fixed once for all (no RNG whose algorithm could change), 400 in
    all. Order: round robin over the styles (anime, concept-art, paintings, photo, anime, ...), by index within a
    style, so that any prefix of the set (a training script's --num_eval_prompts grid) covers the styles evenly.
    hpsv2-train: the prompts of train.json, each once, in first-seen order (no styles)."""
    if name == "hpsv2-train":
        path = hpsv2_file(source, "train.json", flag)
        return prompts_of_json(path, flag) or [], None
    drawn = []
    for style in HPSV2_STYLES:
        path = hpsv2_file(source, f"benchmark/{style}.json", flag)
        prompts = prompts_of_json(path, flag) or []
        if len(prompts) < 100:
            raise UsageError(f"{flag}: {path} holds {len(prompts)} prompts; the benchmark draws 100 per style")
        rank = sorted(range(len(prompts)), key=lambda i: hashlib.sha256(f"{name}/{style}/{i}".encode()).hexdigest())
        drawn.append([(prompts[i], style) for i in sorted(rank[:100])])
    ordered = [pair for group in zip(*drawn) for pair in group]
    return [prompt for prompt, _ in ordered], [style for _, style in ordered]


def pickapic_prompts(name, source, flag):
    """The prompts of the Pick-a-Pic split PICKAPIC_SPLITS[name], each once, in first-seen order: from the hub
    dataset `source` (only that split's files, data/{split}-*.parquet, are downloaded) or a local folder laid out
    like it."""
    import datasets
    split = PICKAPIC_SPLITS[name]
    if not os.path.isdir(source) and not is_hub_id(source):
        raise UsageError(f"{flag}: no such folder {source}")
    try:
        data = datasets.load_dataset(source, data_files={split: f"data/{split}-*.parquet"}, split=split)
    except Exception as e:  # offline, not cached, no such files
        raise UsageError(f"{flag}: could not read data/{split}-*.parquet of {source} ({type(e).__name__}); without "
                         f"network copy those files of the hub dataset {PICKAPIC_DATASET} into a folder (as "
                         f"data/{split}-*.parquet) and pass {flag} {name}:/path/to/folder") from e
    if "caption" not in data.column_names:
        raise UsageError(f"{flag}: {source} data/{split}-*.parquet has no 'caption' column ({data.column_names})")
    return list(dict.fromkeys(str(c).strip() for c in data["caption"] if c is not None))


def read_prompt_set(source, flag="--train_prompts"):
    """(prompts, styles) of `source`; styles names each prompt's style (HPS v2 benchmark) or JSON file (a folder of
    them), else None. Sources:
    - hpsv2-benchmark, hpsv2-train (PROMPT_SETS) from the hub dataset zhwang/HPDv2, pickapic-train and
      pickapic-validation from yuvalkirstain/pickapic_v1_no_images; NAME:FOLDER reads a local copy of its files,
      NAME:OWNER/DATASET a mirror;
    - a .txt file, one prompt per line;
    - a .json file holding a list of prompts or of records with a 'prompt', 'caption' or 'text' field (HPS v2's
      benchmark and training annotations; see prompts_of_json), or a folder of such .json files (HPS v2's
      benchmark/: all of them, in file-name order);
    - a .csv/.jsonl/.parquet file (or .json of another shape), or a dataset folder or hub id, through datasets, with
      a 'prompt', 'caption' or 'text' column."""
    name, _, where = source.partition(":")
    suffix = os.path.splitext(source)[1].lower()
    styles = None
    if name in PICKAPIC_SPLITS:
        prompts = pickapic_prompts(name, where or PICKAPIC_DATASET, flag)
    elif name in PROMPT_SETS:
        prompts, styles = hpsv2_prompts(name, where or HPSV2_DATASET, flag)
    elif os.path.isdir(source) and not os.listdir(source):
        raise UsageError(f"{flag} {source} is an empty folder")
    elif os.path.isfile(source) and suffix not in (".txt", *PROMPT_FILE_TYPES):
        raise UsageError(f"{flag} {source}: give a .txt file (one prompt per line), a "
                         f"{'/'.join(PROMPT_FILE_TYPES)} file, a dataset folder or one of {', '.join(PROMPT_SETS)}")
    elif not os.path.exists(source) and (suffix in (".txt", *PROMPT_FILE_TYPES) or not is_hub_id(source)):
        raise UsageError(f"{flag} {source}: no such file or folder")
    elif suffix == ".txt":
        with open(source, encoding="utf-8") as f:
            prompts = [line.strip() for line in f]
    else:
        if os.path.isdir(source):
            files = sorted(n for n in os.listdir(source) if n.endswith(".json"))
            lists = [prompts_of_json(os.path.join(source, n), flag) for n in files]
        else:
            files, lists = [source], [prompts_of_json(source, flag) if suffix == ".json" else None]
        if lists and all(p is not None for p in lists):
            prompts = [p for ps in lists for p in ps]
            if os.path.isdir(source):
                styles = [n.removesuffix(".json") for n, ps in zip(files, lists) for _ in ps]
        else:
            prompts = prompts_from_dataset(source, suffix, flag)
    keep = [i for i, p in enumerate(prompts) if p]
    if not keep:
        raise UsageError(f"{flag} {source} holds no prompts")
    return [prompts[i] for i in keep], None if styles is None else [styles[i] for i in keep]


def prompts_from_dataset(source, suffix, flag):
    """The 'prompt', 'caption' or 'text' column of a .csv/.json/.jsonl/.parquet file, dataset folder or hub id."""
    import datasets
    try:
        if suffix in PROMPT_FILE_TYPES:
            data = datasets.load_dataset(PROMPT_FILE_TYPES[suffix], data_files=source, split="train")
        else:
            data = datasets.load_dataset(source, split="train")
    except Exception as e:  # offline, not cached, unreadable, no train split
        message = (str(e).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{flag} {source}: could not read prompts ({type(e).__name__}: {message}); without "
                         f"network give a local .txt file, one prompt per line") from e
    column = next((c for c in PROMPT_FIELDS if c in data.column_names), None)
    if column is None:
        raise UsageError(f"{flag} {source}: no 'prompt', 'caption' or 'text' column in {data.column_names}")
    return [str(p).strip() for p in data[column] if p is not None]


def read_prompts(source, default, flag="--train_prompts"):
    """The prompts of `source` (see read_prompt_set); `default` without a source."""
    return list(default) if source is None else read_prompt_set(source, flag)[0]


def apply_template(prompts, template):
    """--prompt_template: each prompt put in place of {} in the template (the DRTune paper's objectness prompts
    "[concept], and books." from "{}, and books."); the prompts as they are without one."""
    return list(prompts) if template is None else [template.replace("{}", prompt) for prompt in prompts]


def check_numbers(args):
    """Every number in range, before anything is loaded: nan, 0 or a negative value would fail late or train wrong."""
    for name, value in vars(args).items():  # nan and inf pass every comparison below: refuse them first
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name} must be a finite number, got {value}")
    for flag in ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                 "num_inference_steps", "rank", "validation_steps", "checkpointing_steps", "logging_steps",
                 "num_eval_prompts", "max_nonfinite_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("reward_resolution", "checkpoints_total_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1 (or left out), got {getattr(args, flag)}")
    if not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.lr_warmup_steps < 0:
        raise UsageError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    for flag in ("learning_rate", "max_grad_norm", "adam_epsilon"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag} must be > 0, got {getattr(args, flag)}")
    if args.adam_weight_decay < 0:
        raise UsageError(f"--adam_weight_decay must be >= 0, got {args.adam_weight_decay}")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be in [0, 1), got {getattr(args, flag)}")
    if not 0 <= args.eta <= 1:
        raise UsageError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {args.eta}")
    if args.validation_lora_scale < 0:
        raise UsageError(f"--validation_lora_scale must be >= 0, got {args.validation_lora_scale}")
    if args.prompt_template is not None and "{}" not in args.prompt_template:
        raise UsageError(f"--prompt_template {args.prompt_template!r} has no {{}} for the prompt, e.g. "
                         f"'{{}}, and books.'")
    from diffusers.optimization import SchedulerType
    schedulers = [s.value for s in SchedulerType if s.value != "piecewise_constant"]  # that one needs step rules
    if args.lr_scheduler not in schedulers:
        raise UsageError(f"--lr_scheduler {args.lr_scheduler} is not one of {', '.join(schedulers)}")
    changes = resume_changes(args)
    if any(c not in RESUME_CHANGES for c in changes):
        raise UsageError(f"--resume_changes {args.resume_changes}: only {', '.join(RESUME_CHANGES)} may change on "
                         f"resume")


def check_output_dir(args):
    """--output_dir: a folder (or one we can create) that we can write to, holding no earlier run's checkpoint unless
    we resume (a fresh run there would mix its checkpoints with the old ones)."""
    path = os.path.abspath(args.output_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output_dir {args.output_dir}: {existing} is a file, not a folder; choose another "
                         f"--output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {args.output_dir}: {existing} is not writable; choose another --output_dir")
    found = complete_checkpoints(path)
    if found and args.resume_from_checkpoint is None:
        raise UsageError(f"--output_dir {args.output_dir} already holds checkpoint-{max(found)} of an earlier run: "
                         f"continue it with --resume_from_checkpoint latest, or choose a new --output_dir")


def check_arguments(args):
    """Every bad input we can see without loading a large model, each as one line."""
    import diffusers
    from diffusers import AutoencoderKL, DiffusionPipeline
    if args.mixed_precision is None:
        args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a GPU (no fp16 autocast on CPU); use bf16 or no")
    if args.mixed_precision == "fp16" and args.finetune == "full" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--mixed_precision fp16 with --finetune full over several processes: the fp16 grad scaler "
                         "would check each process's shard of the gradients alone, so processes could skip different "
                         "steps; use --mixed_precision bf16, or run on one process")
    check_numbers(args)
    check_output_dir(args)
    kwargs = dict(revision=args.revision)
    model_index = load_config_or_fail(DiffusionPipeline, args.pretrained_model_name_or_path, "model",
                                      "--pretrained_model_name_or_path", **kwargs)
    family_name = detect_family(model_index)
    family = FAMILIES[family_name]
    denoiser_class = getattr(diffusers, family["denoiser_class"])
    denoiser_config = load_config_or_fail(denoiser_class, args.pretrained_model_name_or_path, "model",
                                          "--pretrained_model_name_or_path", subfolder=family["denoiser"], **kwargs)
    vae_path = args.pretrained_vae_model_name_or_path or args.pretrained_model_name_or_path
    vae_kwargs = dict(subfolder="vae", **kwargs) if args.pretrained_vae_model_name_or_path is None else {}
    vae_config = load_config_or_fail(AutoencoderKL, vae_path, "VAE", "--pretrained_vae_model_name_or_path",
                                     **vae_kwargs)
    check_model_files(args, model_index, family)
    check_family_arguments(args, family, denoiser_class, denoiser_config)
    vae_factor, patch = 2 ** (len(vae_config["block_out_channels"]) - 1), family_patch_size(family, denoiser_config)
    if args.resolution % (vae_factor * patch):  # the latents must also split into the transformer's patches
        detail = f" x the {family['label']} patch size {patch}" if patch > 1 else ""
        raise UsageError(f"--resolution {args.resolution} is not divisible by the VAE factor {vae_factor}{detail}")
    factor = vae_factor * patch
    max_patches = denoiser_config.get("pos_embed_max_size")  # SD3's position embedding is cropped from this grid
    if max_patches and args.resolution // factor > max_patches:
        raise UsageError(f"--resolution {args.resolution} is too large for this SD3 transformer: its position "
                         f"embedding covers {max_patches * factor} px")
    args.train_prompt_list = apply_template(read_prompts(args.train_prompts, DEFAULT_PROMPTS, "--train_prompts"),
                                            args.prompt_template)
    args.eval_prompt_list = apply_template(read_prompts(args.eval_prompts, DEFAULT_PROMPTS, "--eval_prompts"),
                                           args.prompt_template)[: args.num_eval_prompts]
    try:  # --reward None: no reward model (offline dpo.py without --reward); a plug-in is called once on the prompts
        reward_options = rewards.parse_options(args.reward_options)
        reward_parts = rewards.parse_spec(args.reward) if args.reward is not None else []
        if args.reward is not None:
            rewards.check_options(args.reward, reward_options, prompts=args.train_prompt_list[:2],
                                  image_size=args.reward_resolution or args.resolution)
    except (ValueError, rewards.RewardLoadError) as e:
        raise UsageError(f"--reward {args.reward}: {e}") from e
    if NEEDS_DIFFERENTIABLE_REWARD and not rewards.is_differentiable(args.reward):
        names = [n for n, _ in reward_parts if not rewards.reward_info(n).differentiable]
        raise UsageError(f"--reward: {', '.join(names)} is not differentiable, and this method backpropagates "
                         f"through the reward (grpo.py, dpo.py and spo.py need no gradient; a plug-in reward that "
                         f"has one says so with `function.differentiable = True`)")
    check_algorithm_arguments(args)
    path, marker = resume_checkpoint(args)
    if marker is not None:
        check_resume(args, path, marker)
    # Which checkpoints are this run's (kept through resumes; the same on every process): pruning touches no other.
    fresh = hashlib.sha256(json.dumps(run_fingerprint(args), sort_keys=True).encode()).hexdigest()[:16]
    args.run_id = marker["run_id"] if marker is not None else fresh
    return dict(family=family_name, model_index=model_index, reward_options=reward_options)


# --- model families: everything that differs between SD1.5, SDXL, SD3/SD3.5 and FLUX ---------------------------
# Read from the pipeline's model_index.json (its denoiser's class), never from the model's name. The algorithms see
# latents (B, C, h, w), a conditioning dict of tensors and "the model output at this step" (noise or v for the UNets,
# the velocity for the flow transformers); every family-specific line is in this section. The denoiser is called
# `unet` everywhere, in diffusers' vocabulary, whichever it is.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_ATTENTION = ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # + the text stream's (MMDiT)
FAMILIES = {
    "sd15": dict(label="SD1.5", denoiser="unet", denoiser_class="UNet2DConditionModel",
                 encoders=(("", "CLIPTextModel"),), pipeline="StableDiffusionPipeline",
                 samplers=("ddpm", "ddim", "dpmpp"), stochastic_sampler="ddim", guidance_scale=7.5,
                 lora_targets=ATTENTION),
    "sdxl": dict(label="SDXL", denoiser="unet", denoiser_class="UNet2DConditionModel",
                 encoders=(("", "CLIPTextModel"), ("_2", "CLIPTextModelWithProjection")),
                 pipeline="StableDiffusionXLPipeline", samplers=("ddpm", "ddim", "dpmpp"), stochastic_sampler="ddim",
                 guidance_scale=5.0, lora_targets=ATTENTION),
    # CLIP-L, CLIP-G and T5 (the T5 slot may be empty: zeros, as SD3 allows); MMDiT (SD3.5-M: MMDiT-X)
    "sd3": dict(label="SD3", denoiser="transformer", denoiser_class="SD3Transformer2DModel",
                encoders=(("", "CLIPTextModelWithProjection"), ("_2", "CLIPTextModelWithProjection"),
                          ("_3", "T5EncoderModel")),
                pipeline="StableDiffusion3Pipeline", samplers=("euler",), stochastic_sampler="euler", guidance_scale=7.0,
                max_sequence_length=256, lora_targets=JOINT_ATTENTION),
    # CLIP-L (pooled only) and T5; guidance-distilled (FLUX.1-dev: a guidance embedding, no CFG by default)
    "flux": dict(label="FLUX", denoiser="transformer", denoiser_class="FluxTransformer2DModel",
                 encoders=(("", "CLIPTextModel"), ("_2", "T5EncoderModel")), pipeline="FluxPipeline",
                 samplers=("euler",), stochastic_sampler="euler", guidance_scale=1.0, max_sequence_length=512,
                 lora_targets=JOINT_ATTENTION),
}
FLUX_GUIDANCE_EMBEDDING = 3.5  # FluxPipeline's default guidance_scale


def detect_family(model_index):
    """sd15, sdxl, sd3 or flux from a pipeline's model_index.json: the class of its denoiser."""
    denoiser = model_index.get("transformer") or model_index.get("unet") or [None, None]
    name = denoiser[1] if isinstance(denoiser, (list, tuple)) and len(denoiser) == 2 else None
    if name == "UNet2DConditionModel":
        return "sdxl" if (model_index.get("text_encoder_2") or [None])[0] else "sd15"
    found = [f for f, spec in FAMILIES.items() if spec["denoiser_class"] == name]
    if not found:
        raise UsageError(f"--pretrained_model_name_or_path: a {model_index.get('_class_name')} with a {name} is not "
                         f"an SD1.5, SDXL, SD3/SD3.5 or FLUX text-to-image pipeline")
    return found[0]


def family_patch_size(family, denoiser_config):
    """Latent pixels per side of one transformer token: FLUX's 2x2 packing, SD3's patch size, 1 for the UNets."""
    if family["denoiser_class"] == "FluxTransformer2DModel":
        return 2
    return denoiser_config.get("patch_size", 1) if family["denoiser"] == "transformer" else 1


def default_sampler(family):
    """The family's first sampler (ddpm; euler for flow models), or its stochastic one (ddim, the flow SDE) where the
    method trains on step densities."""
    return family["stochastic_sampler"] if NEEDS_STOCHASTIC_STEPS else family["samplers"][0]


def check_family_arguments(args, family, denoiser_class, denoiser_config):
    """The family's defaults for --sampler (a stochastic one where the method needs step densities), --guidance_scale,
    --max_sequence_length and --lora_target_modules, and the settings it cannot take, each as one line."""
    label, flux = family["label"], family["denoiser_class"] == "FluxTransformer2DModel"
    args.sampler = args.sampler or default_sampler(family)
    if args.sampler not in family["samplers"]:
        raise UsageError(f"--sampler {args.sampler} does not exist for {label} models: use "
                         f"{' or '.join(family['samplers'])}")
    if args.true_cfg and not flux:
        raise UsageError(f"--true_cfg is FLUX's; {label} applies classifier-free guidance with --guidance_scale")
    if flux and args.guidance_scale is not None and args.guidance_scale > 1 and not args.true_cfg:
        raise UsageError(f"--guidance_scale {args.guidance_scale}: FLUX is guidance-distilled and runs without "
                         f"classifier-free guidance; set its distilled guidance with --guidance_embedding, or add "
                         f"--true_cfg for classifier-free guidance with the empty negative prompt")
    if args.true_cfg and (args.guidance_scale is None or args.guidance_scale <= 1):
        raise UsageError("--true_cfg needs a --guidance_scale above 1 (FluxPipeline's true_cfg_scale, e.g. 4)")
    if args.guidance_scale is None:
        args.guidance_scale = family["guidance_scale"]
    has_embedding = bool(denoiser_config.get("guidance_embeds"))
    if args.guidance_embedding is not None and not has_embedding:
        raise UsageError(f"--guidance_embedding: this {label} transformer has no guidance embedding (FLUX.1-dev has "
                         f"one; FLUX.1-schnell does not); leave it out{', or use --true_cfg' if flux else ''}")
    if has_embedding and args.guidance_embedding is None:
        args.guidance_embedding = FLUX_GUIDANCE_EMBEDDING
    if "max_sequence_length" in family:
        args.max_sequence_length = args.max_sequence_length or family["max_sequence_length"]
        if args.max_sequence_length < 1:
            raise UsageError(f"--max_sequence_length must be >= 1, got {args.max_sequence_length}")
    if args.lora_target_modules is None:
        args.lora_target_modules = ",".join(family["lora_targets"])
    else:  # the module names of the architecture, from its config alone (no weights: the meta device)
        from accelerate import init_empty_weights
        with init_empty_weights():
            names = [n for n, _ in denoiser_class.from_config(denoiser_config).named_modules()]
        targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing or not targets:
            raise UsageError(f"--lora_target_modules: no module named {', '.join(missing) or '(none given)'} in this "
                             f"{label} {family['denoiser']} (default: {','.join(family['lora_targets'])})")


def encode_sd(models, prompts):
    """SD1.5: the last hidden states (B, 77, D). SDXL: both encoders' penultimate states side by side and the pooled
    text_embeds of encoder 2 (the SDXL pipeline's encode_prompt)."""
    device, sdxl, states = first_param(models.text_encoders[0]).device, models.family == "sdxl", []
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=sdxl)
        states.append(out.hidden_states[-2] if sdxl else out[0])
    text = dict(encoder_hidden_states=torch.cat(states, dim=-1))
    return dict(text, text_embeds=out[0]) if sdxl else text


def encode_sd3(models, prompts):
    """StableDiffusion3Pipeline.encode_prompt: CLIP-L and CLIP-G penultimate states side by side, zero-padded to the
    T5 width, then the T5 states (or max_sequence_length zero tokens without T5) on the sequence axis: (B, 77 + L, D);
    pooled = both CLIPs' projections side by side."""
    device = first_param(models.text_encoders[0]).device
    clip = [encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
            for tokenizer, encoder in zip(models.tokenizers[:2], models.text_encoders[:2])]
    states = torch.cat([out.hidden_states[-2] for out in clip], dim=-1)
    if models.text_encoders[2] is None:
        t5 = states.new_zeros(len(prompts), models.max_sequence_length, models.unet.config.joint_attention_dim)
    else:
        t5 = models.text_encoders[2](tokenize(models.tokenizers[2], prompts, device, models.max_sequence_length))[0]
    states = F.pad(states, (0, t5.shape[-1] - states.shape[-1]))
    return dict(encoder_hidden_states=torch.cat([states, t5.to(states.dtype)], dim=1),
                pooled_projections=torch.cat([out[0] for out in clip], dim=-1))


def encode_flux(models, prompts):
    """FluxPipeline.encode_prompt: the T5 states (B, L, D) and CLIP's pooled output (B, D2)."""
    device = first_param(models.text_encoders[0]).device
    pooled = models.text_encoders[0](tokenize(models.tokenizers[0], prompts, device)).pooler_output
    t5 = models.text_encoders[1](tokenize(models.tokenizers[1], prompts, device, models.max_sequence_length))[0]
    return dict(encoder_hidden_states=t5, pooled_projections=pooled)


def call_denoiser(unet, latents, t, cond):
    """One denoiser call without guidance: latents (N, C, h, w), t a scalar or (N,), cond of batch N -> (N, C, h, w).
    FLUX: 2x2 latent patches packed into tokens with (0, row, column) position ids, text ids zero, timestep / 1000,
    the distilled guidance in cond (the FLUX pipeline's _pack_latents / _unpack_latents); SD3: timestep as is."""
    kind = type(unet).__name__.removeprefix("FSDP")  # fully_shard's subclass of a sharded denoiser
    if kind == "UNet2DConditionModel":
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        return unet(latents, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added or None,
                    return_dict=False)[0]
    t = t.expand(len(latents)) if t.ndim == 0 else t
    if kind == "SD3Transformer2DModel":
        return unet(latents, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                    pooled_projections=cond["pooled_projections"], return_dict=False)[0]
    b, c, h, w = latents.shape
    packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(latents.device, latents.dtype)
    text_ids = latents.new_zeros(cond["encoder_hidden_states"].shape[1], 3)
    out = unet(packed, timestep=t.to(latents.dtype) / 1000, guidance=cond.get("guidance"),
               pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
               txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


ENCODERS = dict(sd15=encode_sd, sdxl=encode_sd, sd3=encode_sd3, flux=encode_flux)


def is_flow(scheduler):
    return type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def load_models(args, info, device, weight_dtype):
    """Tokenizers, text encoders, VAE and denoiser (`unet`), frozen, in the order of the diffusers examples; the
    family's text-encoder slots that model_index.json leaves empty (SD3 without T5) are None."""
    import diffusers
    import transformers
    from transformers import AutoTokenizer
    family = FAMILIES[info["family"]]
    path, kw = args.pretrained_model_name_or_path, dict(revision=args.revision)
    present = [(n, cls) if (info["model_index"].get(f"text_encoder{n}") or [None])[0] else (None, None)
               for n, cls in family["encoders"]]
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{n}", **kw) if n is not None else None
                  for n, _ in present]
    kw.update(variant=args.variant, torch_dtype=weight_dtype)
    text_encoders = [getattr(transformers, cls).from_pretrained(path, subfolder=f"text_encoder{n}", **kw)
                     if n is not None else None for n, cls in present]
    unet = getattr(diffusers, family["denoiser_class"]).from_pretrained(  # --finetune full: fp32 master weights
        path, subfolder=family["denoiser"], **dict(kw, torch_dtype=torch.float32) if args.finetune == "full" else kw)
    # SDXL's own VAE overflows in fp16; keep it in fp32 unless an fp16-safe VAE was given.
    if args.pretrained_vae_model_name_or_path:
        vae = diffusers.AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, torch_dtype=weight_dtype)
    else:
        upcast = info["family"] == "sdxl" and weight_dtype == torch.float16
        vae = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae",
                                                      **dict(kw, torch_dtype=torch.float32) if upcast else kw)
    for model in [vae, unet, *text_encoders]:
        if model is not None:
            model.requires_grad_(False).eval().to(device)
    force_zeros = info["model_index"].get("force_zeros_for_empty_prompt", info["family"] == "sdxl")
    return argparse.Namespace(tokenizers=tokenizers, text_encoders=text_encoders, vae=vae, unet=unet,
                              family=info["family"], force_zeros_for_empty_prompt=force_zeros,
                              max_sequence_length=args.max_sequence_length,
                              guidance_embedding=args.guidance_embedding,
                              vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1), prompt_cache={})


def make_scheduler(args):
    """DDPM / DDIM / DPM-Solver++ from the pipeline's scheduler config, with the traps made explicit; for flow models
    its FlowMatchEulerDiscreteScheduler, whose set_timesteps(n) gives the sigmas the family's pipeline samples with
    (SD3: the config's shift; FLUX: sigmas linspace(1, 1/n, n) shifted by the resolution-dependent mu)."""
    from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                           FlowMatchEulerDiscreteScheduler)
    path = args.pretrained_model_name_or_path
    family = detect_family(DiffusionPipeline.load_config(path, revision=args.revision))
    sampler = args.sampler or default_sampler(FAMILIES[family])  # check_arguments sets it; callers may not have run it
    if sampler == "euler":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=args.revision)
        flux = family == "flux"
        mu = None
        if scheduler.config.use_dynamic_shifting:  # image tokens: (latent side / patch)^2, as the pipelines count
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.load_config(path, subfolder="vae", revision=args.revision)
            denoiser = DiffusionPipeline.load_config(path, subfolder="transformer", revision=args.revision)
            patch = 2 if flux else denoiser.get("patch_size", 1)
            tokens = (args.resolution // 2 ** (len(vae["block_out_channels"]) - 1) // patch) ** 2
            config = scheduler.config
            mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15 if flux else 1.16))
        set_timesteps = scheduler.set_timesteps
        scheduler.set_timesteps = lambda n, device=None: set_timesteps(
            n, device=device, sigmas=np.linspace(1.0, 1 / n, n) if flux else None, mu=mu)
        return scheduler
    config = DDPMScheduler.load_config(path, subfolder="scheduler", revision=args.revision)
    # from_config drops default-valued keys; SD1.5 and SDXL use "leading" spacing, which DDIM's step assumes.
    spacing = config.get("timestep_spacing", "leading")
    if sampler == "ddpm":
        return DDPMScheduler.from_config(config, clip_sample=False, variance_type="fixed_small",
                                         timestep_spacing=spacing)
    if sampler == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, timestep_spacing=spacing)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                   timestep_spacing=spacing)


def first_param(module):
    """A diffusers model's first parameter, whose device and dtype are the model's here: diffusers' .device and
    .dtype walk every submodule for offloading and casting hooks at each access (0.9 ms each on the tiny UNet, so
    several ms per training step); these models carry none."""
    return next(module.parameters())


def tokenize(tokenizer, prompts, device, max_length=None):
    return tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_text(models, prompts, cache=False):
    """The family's conditioning tensors of the prompts alone, in the denoiser's dtype and on its device: a dict of
    (B, ...) tensors named as the denoiser takes them (encoder_hidden_states, and SDXL's text_embeds or SD3/FLUX's
    pooled_projections). Each distinct prompt runs through the text encoders once, in one batch; prompts in
    models.prompt_cache not at all. cache=True keeps the new ones there."""
    new, missing = {}, [p for p in dict.fromkeys(prompts) if p not in models.prompt_cache]
    if missing:
        weight = first_param(models.unet)
        parts = {k: v.to(weight.device, weight.dtype) for k, v in ENCODERS[models.family](models, missing).items()}
        new = {p: {k: v[i] for k, v in parts.items()} for i, p in enumerate(missing)}
        if cache:
            models.prompt_cache.update(new)
    rows = [new[p] if p in new else models.prompt_cache[p] for p in prompts]
    return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


def encode_prompts(models, prompts, resolution, negative=True, time_ids=None):
    """The denoiser's conditioning as the diffusers pipelines build it: a dict of tensors of batch 2B, [negative;
    prompt] for classifier-free guidance (the empty prompt, encoded once per run; SDXL's zeros), or of batch B with
    negative=False. SDXL: add_time_ids (original size, crop top-left, target size: generated uncropped at the
    resolution), or time_ids (B, 6) given per image; FLUX.1-dev: its distilled guidance per sample."""
    n = len(prompts)
    cond = encode_text(models, prompts)
    if negative:
        if models.family == "sdxl" and models.force_zeros_for_empty_prompt:
            uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
        else:
            uncond = {k: v.expand(n, *v.shape[1:]) for k, v in encode_text(models, [""], cache=True).items()}
        cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    rows, like = len(cond["encoder_hidden_states"]), cond["encoder_hidden_states"]
    if models.family == "sdxl":
        if time_ids is None:
            time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution]).repeat(n, 1)
        cond["time_ids"] = time_ids.repeat(rows // n, 1).to(like.device, like.dtype)
    if models.guidance_embedding is not None:
        cond["guidance"] = torch.full((rows,), models.guidance_embedding, device=like.device, dtype=torch.float32)
    return cond


def cache_prompt_embeds(models, prompts, batch_size=32):
    """--cache_prompt_embeds: encode each distinct prompt once for the whole run, then move the text encoders off
    the accelerator (SDXL's two are 0.8 B parameters that training never runs). Returns the cache's MiB."""
    distinct = list(dict.fromkeys(["", *prompts]))
    for start in range(0, len(distinct), batch_size):
        encode_text(models, distinct[start:start + batch_size], cache=True)
    for encoder in models.text_encoders:
        if encoder is not None:
            encoder.to("cpu")
    tensors = [x for row in models.prompt_cache.values() for x in row.values()]
    return sum(x.numel() * x.element_size() for x in tensors) / 2 ** 20


def predict_noise(unet, latents, t, cond, guidance_scale):
    """Model output with classifier-free guidance; latents (B, C, h, w), t a scalar or one timestep per sample (B,),
    cond of batch 2B (encode_prompts). One activation checkpoint when enable_checkpointing marked the denoiser (see
    checkpointed)."""
    t = torch.as_tensor(t, device=latents.device)
    if guidance_scale <= 1:  # no guidance: the prompt half only
        half = {k: v[len(latents):] for k, v in cond.items()}
        return checkpointed(unet, lambda x: call_denoiser(unet, x, t, half), latents)
    t2 = t.repeat(2) if t.ndim else t  # the two halves of the batch share each sample's timestep
    noise_uncond, noise_text = checkpointed(
        unet, lambda x: call_denoiser(unet, torch.cat([x] * 2), t2, cond), latents).chunk(2)
    return noise_uncond + guidance_scale * (noise_text - noise_uncond)


_LORA_PARTS = weakref.WeakKeyDictionary()


def lora_parts(module):
    """(peft's LoRA layers in `module`, their weights), found once per set of adapters: a walk over every module
    at each switch to the reference cost half a tiny UNet call (benchmarks/peers.py)."""
    adapters = tuple(getattr(module, "peft_config", None) or ())
    found = _LORA_PARTS.get(module)
    if found is None or found[0] != adapters:
        from peft.tuners.lora import LoraLayer
        found = _LORA_PARTS[module] = (adapters, [m for m in module.modules() if isinstance(m, LoraLayer)],
                                       [p for name, p in module.named_parameters() if "lora_" in name])
    return found[1], found[2]


@contextlib.contextmanager
def reference_unet(unet, adapter=None):
    """Inside, under no_grad, `unet` computes the reference: the same module with the policy's LoRA off (adapter None:
    the base model) or with the adapter named `adapter` active in its place. Switched layer by layer (what diffusers'
    disable_adapters and set_adapter do after a walk over every module); peft's switches set LoRA requires_grad, and
    every flag is put back as it was. No backward through it: one through disabled adapters under gradient
    checkpointing raises (TRAPS). --finetune full: the frozen copy keep_base_copy made. Compute with the module it
    yields."""
    if getattr(unet, "full_finetune", False):  # --finetune full: the frozen base copy of keep_base_copy
        if unet not in _BASE_COPY:
            raise RuntimeError("--finetune full: this script keeps no reference copy of the base model")
        with torch.no_grad():
            yield _BASE_COPY[unet]
        return
    layers, weights = lora_parts(unet)
    flags = [p.requires_grad for p in weights]
    active = layers[0].active_adapters if layers else None
    try:
        with torch.no_grad():
            for layer in layers:
                if adapter is None:
                    layer.enable_adapters(False)
                else:
                    layer.set_adapter(adapter)
            yield unet
    finally:
        for layer in layers:
            if adapter is None:
                layer.enable_adapters(True)
            else:
                layer.set_adapter(active)
        for p, flag in zip(weights, flags):
            p.requires_grad_(flag)


def checkpointed(module, fn, *inputs):
    """fn(*inputs), a call of `module`, as one activation checkpoint when enable_checkpointing marked the module
    and gradient is on: the forward runs under no_grad and keeps only the inputs, the backward recomputes the call
    with the RNG state of the forward. Reentrant: no autograd graph is kept between the two (benchmarks/peers.py
    compares it with TRL's AlignProp); a scalar that requires grad puts the call in the graph when
    its inputs are detached (stop-gradient), so the LoRA weights still get their gradients. A reentrant
    recomputation cannot check that the module is as it was, so a call with the LoRA adapters disabled (no LoRA
    weight requires grad) is refused: run those under no_grad, as every reference forward here is. Gradients reach
    the LoRA weights through backward(), not torch.autograd.grad."""
    if getattr(module, "checkpoint_calls", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint
        lora = lora_parts(module)[1]
        if lora and not any(p.requires_grad for p in lora):
            raise RuntimeError("a checkpointed call with the LoRA adapters disabled: run it under torch.no_grad()")
        anchor = torch.ones((), device=inputs[0].device, requires_grad=True)
        return checkpoint(lambda _, *x: fn(*x), anchor, *inputs, use_reentrant=True)
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


def flow_sigmas(scheduler, t):
    """sigma_i and sigma_{i+1} of a flow schedule at its timestep(s) t (a scalar or (B,)), from scheduler.sigmas."""
    schedule = scheduler.timesteps.cpu()
    t = torch.as_tensor(t).cpu().to(schedule.dtype)
    found = schedule == t.reshape(-1, 1)  # (B, T)
    if not found.any(1).all():
        raise ValueError(f"timestep {t.tolist()} is not in the schedule {schedule.tolist()}")
    index = found.int().argmax(1).reshape(t.shape)
    sigmas = scheduler.sigmas.cpu()
    return sigmas[index], sigmas[index + 1]


def predict_x0_eps(scheduler, model_output, t, x):
    """(x_0, eps) from the model output at x_t: linear in both; t a scalar or (B,). Flow models: x_sigma =
    (1 - sigma) x_0 + sigma eps and v = eps - x_0, so x_0 = x - sigma v and eps = x + (1 - sigma) v."""
    if is_flow(scheduler):
        sigma = per_sample(flow_sigmas(scheduler, t)[0], x)
        return x - sigma * model_output, x + (1 - sigma) * model_output
    abar = per_sample(scheduler.alphas_cumprod[torch.as_tensor(t).cpu()], x)
    if scheduler.config.prediction_type == "v_prediction":
        return abar.sqrt() * x - (1 - abar).sqrt() * model_output, abar.sqrt() * model_output + (1 - abar).sqrt() * x
    return (x - (1 - abar).sqrt() * model_output) / abar.sqrt(), model_output


def sampler_step(scheduler, model_output, t, x, noise, eta):
    """x_{t-1} = a_t x_t + b_t eps + c_t z (eq. 2), differentiable in x and the model output; t a scalar or one
    timestep per sample (B,); noise None gives the mean. See step_mean_std."""
    mean, std = step_mean_std(scheduler, model_output, t, x, eta)
    return mean if noise is None else mean + per_sample(std, x) * noise


def step_std(scheduler, t, eta):
    """c_t, the standard deviation of the step's Gaussian transition at timestep(s) t (a scalar or (B,)), see
    step_mean_std; 0 for a deterministic step."""
    if is_flow(scheduler):
        sigma, sigma_next = flow_sigmas(scheduler, t)
        return flow_noise_level(scheduler, sigma, eta) * (sigma - sigma_next).sqrt()
    return ddim_std(scheduler, *alphas_at(scheduler, t), eta)


def flow_noise_level(scheduler, sigma, eta):
    """Flow-GRPO's sigma_t = a sqrt(sigma / (1 - sigma)), a = eta; at sigma = 1 the denominator takes the next sigma
    of the schedule, as Flow-GRPO's code does."""
    below_one = torch.where(sigma == 1, scheduler.sigmas[1].to(sigma.device), sigma)
    return eta * (sigma / (1 - below_one)).sqrt()


def ddim_std(scheduler, abar_t, abar_prev, eta):
    """DDIM's sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)); DDPM's posterior std."""
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    if type(scheduler).__name__ == "DDPMScheduler":
        return variance.clamp(min=1e-20).sqrt()
    return eta * variance.sqrt()


def step_mean_std(scheduler, model_output, t, x, eta):
    """The step as a Gaussian transition x_{t-1} ~ N(mean, std^2): mean = a_t x_t + b_t eps (eq. 2), std = c_t.
    DDIM with eta, and DDPM as DDIM's form with the DDPM posterior variance (both equal scheduler.step, row by row).
    Flow models: the Euler step x + (sigma_{i+1} - sigma_i) v of FlowMatchEulerDiscreteScheduler (std 0); with
    eta = a > 0 Flow-GRPO's SDE, sigma_t = a sqrt(sigma / (1 - sigma)), mean = x (1 + sigma_t^2 dt / (2 sigma)) +
    v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt, std = sigma_t sqrt(-dt) (dt < 0). DPM-Solver++ is a two-step
    recurrence with no one-step (a, b, c): its own step, which is linear too (one scalar t, std 0). std comes back
    as a scalar or (B,), not broadcast."""
    if type(scheduler).__name__ == "DPMSolverMultistepScheduler":
        return scheduler.step(model_output, t, x).prev_sample, torch.tensor(0.0)
    if is_flow(scheduler):
        sigma, sigma_next = flow_sigmas(scheduler, t)
        sigma_t = flow_noise_level(scheduler, sigma, eta)
        std = sigma_t * (sigma - sigma_next).sqrt()
        sigma, dt, sigma_t = (per_sample(v, x) for v in (sigma, sigma_next - sigma, sigma_t))
        if eta == 0:
            return x + dt * model_output, std
        mean = (x * (1 + sigma_t ** 2 / (2 * sigma) * dt)
                + model_output * (1 + sigma_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
        return mean, std
    abar_t, abar_prev = alphas_at(scheduler, t)
    std = ddim_std(scheduler, abar_t, abar_prev, eta)
    x0, eps = predict_x0_eps(scheduler, model_output, t, x)
    abar_prev = per_sample(abar_prev, x)
    return abar_prev.sqrt() * x0 + (1 - abar_prev - per_sample(std, x) ** 2).clamp(min=0).sqrt() * eps, std


def rollout(unet, scheduler, cond, latents, generator, args, grad_steps=(), stop_index=None, stop_grad_input=True,
            rows=None, total=None):
    """Sample from x_T = latents. Steps whose index (0 = noisiest) is in grad_steps run the UNet with gradient;
    all others under no_grad, entering the graph only through the linear path of the sampler step.
    stop_grad_input detaches every UNet input (DRTune eq. 3). With stop_index, sampling stops at that step and
    returns the x_0 predicted from x_t and the model output there (early stop); otherwise the final latents.
    rows: latents are these rows of a batch of `total` (generate's share of a sharded evaluation): each step's noise
    is drawn for the whole batch and these rows taken, so every row gets the noise it gets in the whole batch."""
    scheduler.set_timesteps(args.num_inference_steps, device=latents.device)  # also resets DPM++ history
    stochastic = args.sampler == "ddpm" or (args.sampler in ("ddim", "euler") and args.eta > 0)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(torch.is_grad_enabled() and i in grad_steps):
            model_output = predict_noise(unet, latents.detach() if stop_grad_input else latents, t, cond,
                                         args.guidance_scale)
        if i == stop_index:
            return predict_x0_eps(scheduler, model_output, t, latents)[0]
        noise = None
        if stochastic:
            noise = (randn(latents.shape, generator, latents.device) if rows is None else
                     randn((total, *latents.shape[1:]), generator, latents.device)[rows.to(latents.device)])
        latents = sampler_step(scheduler, model_output, t, latents, noise, args.eta)
    return latents


def randn(shape, generator, device):
    """Noise from a CPU generator: the same numbers on any device (and as the diffusers pipelines draw them)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def initial_latents(models, args, batch_size, generator, device):
    shape = (batch_size, models.vae.config.latent_channels, args.resolution // models.vae_scale_factor,
             args.resolution // models.vae_scale_factor)
    return randn(shape, generator, device)


def decode(vae, latents, clamp=True):
    """Latents -> images (B, 3, H, W) in [0, 1], with gradient (one checkpoint under enable_checkpointing).
    clamp=False: the decoder's output mapped to [0, 1] but not clamped (SPO's preference model resizes first)."""
    if getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "latents_std", None) is not None:
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    # a VAE kept in fp32 (SDXL's overflows in fp16) must not be autocast back to half precision
    dtype = first_param(vae).dtype
    with torch.autocast(latents.device.type, enabled=False) if dtype == torch.float32 else contextlib.nullcontext():
        images = checkpointed(vae, lambda z: vae.decode(z, return_dict=False)[0], latents.to(dtype))
    images = images.float() / 2 + 0.5
    return images.clamp(0, 1) if clamp else images


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
    """The trainable parameters: a peft LoRA on --lora_target_modules (frozen weights stay in the mixed-precision dtype,
    trainable ones in fp32), or with --finetune full every denoiser weight (train_full)."""
    if args.finetune == "full":
        return train_full(unet, args)
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=args.lora_target_modules.split(",")))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # frozen weights stay in the mixed-precision dtype; trainable ones in fp32
        p.data = p.data.float()
    return params


def make_optimizer(params, args, device):
    """AdamW on the LoRA weights, fused (one kernel over every tensor) on CUDA and CPU: the same update to float
    rounding, 5x faster than torch's per-tensor loop for a tiny LoRA on CPU and 2.7x for an SD1.5 rank-64 one."""
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                             fused=device.type in ("cuda", "cpu"))


def save_lora(unet, family, output_dir):
    """pytorch_lora_weights.safetensors in the diffusers format of the family's pipeline:
    pipe.load_lora_weights(output_dir) loads it (UNets: diffusers' key names, as its SD examples save them;
    transformers: peft's, as its SD3 and FLUX examples save them)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    denoiser = FAMILIES[family]["denoiser"]
    state_dict = get_peft_model_state_dict(unet)
    if denoiser == "unet":
        state_dict = convert_state_dict_to_diffusers(state_dict)
    # the metadata keeps lora_alpha; without it a reload assumes alpha = rank
    getattr(diffusers, FAMILIES[family]["pipeline"]).save_lora_weights(
        output_dir, **{f"{denoiser}_lora_layers": state_dict,
                       f"{denoiser}_lora_adapter_metadata": unet.peft_config["default"].to_dict()})


def load_lora(unet, family, path):
    """The LoRA weights save_lora wrote in folder `path`, read with safetensors (never pickle)."""
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    denoiser = FAMILIES[family]["denoiser"]
    state_dict = load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))
    if denoiser == "unet":
        state_dict = getattr(diffusers, FAMILIES[family]["pipeline"]).lora_state_dict(state_dict)[0]
    state_dict = {k.removeprefix(f"{denoiser}."): v for k, v in state_dict.items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state_dict), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: unexpected LoRA keys {result.unexpected_keys[:3]}")


# --- checkpoints: safetensors and JSON only, a marker written last, renamed into place ------------------------


def read_marker(path):
    """The marker of a complete checkpoint folder (checkpoint.json, written last), or None."""
    try:
        with open(os.path.join(path, CHECKPOINT_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != 1:
        return None
    if not all(os.path.isfile(os.path.join(path, name)) for name in marker.get("files", [])):
        return None
    return marker


def complete_checkpoints(output_dir):
    """{step: (folder, marker)} of the complete checkpoints in output_dir, oldest first. checkpoint-N.old (an older
    checkpoint-N moved aside while being replaced) stands in for checkpoint-N when the replacement was cut short."""
    found = {}
    if not os.path.isdir(output_dir):
        return found
    for name in sorted(os.listdir(output_dir), key=lambda n: n.endswith(".old")):  # checkpoint-N before its .old
        match = re.fullmatch(r"checkpoint-(\d+)(\.old)?", name)
        if match and int(match.group(1)) not in found:
            marker = read_marker(os.path.join(output_dir, name))
            if marker is not None and marker.get("step") == int(match.group(1)):
                found[int(match.group(1))] = (os.path.join(output_dir, name), marker)
    return dict(sorted(found.items()))


def resume_changes(args):
    return [c.strip().removeprefix("--") for c in args.resume_changes.split(",") if c.strip()]


def run_fingerprint(args):
    """What defines a run, which a checkpoint and the run resuming it must share: every flag but RESUME_MAY_CHANGE,
    the training prompts themselves and the number of processes."""
    flags = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE and not k.endswith("_prompt_list")}
    prompts = hashlib.sha256("\n".join(args.train_prompt_list).encode()).hexdigest()[:16]
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun and accelerate launch
    return json.loads(json.dumps(dict(flags, train_prompts_content=prompts, num_processes=processes)))


def resume_checkpoint(args):
    """(folder, marker) of the checkpoint --resume_from_checkpoint names ('latest': the newest complete one in
    --output_dir), or (None, None) to start from scratch."""
    if args.resume_from_checkpoint is None:
        return None, None
    if args.resume_from_checkpoint == "latest":
        found = complete_checkpoints(args.output_dir)
        return found[max(found)] if found else (None, None)
    path = args.resume_from_checkpoint.rstrip("/\\") or "/"
    if not os.path.isdir(path):
        raise UsageError(f"--resume_from_checkpoint {path}: no such folder; give a checkpoint-N folder or 'latest'")
    marker = read_marker(path)
    if marker is None:
        raise UsageError(f"--resume_from_checkpoint {path}: not a complete checkpoint of these scripts (no valid "
                         f"{CHECKPOINT_MARKER}, or a file it lists is missing); give a checkpoint-N folder or 'latest'")
    return path, marker


def check_resume(args, path, marker):
    """Refuse a resume that would mix two runs: another script, or any run-defining flag that differs."""
    script = os.path.basename(__file__)
    if marker.get("script") != script:
        raise UsageError(f"--resume_from_checkpoint {path}: a checkpoint of {marker.get('script')}, not of {script}")
    ours, theirs, changes = run_fingerprint(args), marker.get("run", {}), resume_changes(args)
    differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k) and k not in changes]
    if differ:
        described = ", ".join(f"{'--' if k in vars(args) else ''}{k} {ours.get(k)} (checkpoint: {theirs.get(k)})"
                              for k in differ)
        allowed = [k for k in differ if k in RESUME_CHANGES]
        hint = (f"; or apply the new value from here with --resume_changes {','.join(allowed)}"
                if allowed == differ else "")
        raise UsageError(f"--resume_from_checkpoint {path}: this run differs from the checkpoint's in {described}; "
                         f"resume with the checkpoint's values (its {CHECKPOINT_MARKER} lists them) or choose a new "
                         f"--output_dir{hint}")


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint_state(path, name):
    """The tensors save_checkpoint wrote as `state[name]` (name.safetensors in the folder), or None."""
    from safetensors.torch import load_file
    file = os.path.join(path, f"{name}.safetensors")
    return load_file(file) if os.path.isfile(file) else None


def save_checkpoint(accelerator, unet, models, optimizer, lr_scheduler, args, step, guard, state=None):
    """checkpoint-N/: the LoRA weights (diffusers format), the optimizer's tensors, each process's RNG state and the
    `state` tensors (name -> tensors; each process writes the names it is given) in safetensors; the step, the run's
    flags and the optimizer, LR scheduler and grad scaler settings in checkpoint.json, written last. Nothing is
    pickled. Written to checkpoint-N.tmp, flushed to disk and renamed into place; an existing checkpoint-N is moved to
    checkpoint-N.old first and deleted last, so that a crash at any point leaves a complete checkpoint-N (or its .old).
    Skipped after a non-finite update or with a non-finite LoRA weight.
    --finetune full: denoiser.safetensors holds every weight of the denoiser (fp32) and the optimizer's tensors are
    keyed by parameter name, both gathered whole on the main process (full_state_dicts; every process calls this) and
    written there as one file each, with the same atomic protocol. Gathered rather than one file per shard: the
    checkpoint is then the same for any number of processes, readable without torch.distributed, and the rename of one
    folder by one process stays the single commit point; the cost is the main process's CPU memory for one full copy
    of the weights and AdamW state while it writes (about 16 bytes per parameter: 14 GB for SD1.5, 41 GB for SDXL)."""
    from safetensors.torch import save_file
    full = args.finetune == "full"
    lora = list(unet.parameters()) if full else [p for name, p in unet.named_parameters() if "lora_" in name]
    if not guard.last_finite or not all(bool(torch.isfinite(p).all()) for p in lora):
        accelerator.print(f"step {step}: no checkpoint, the update or a LoRA weight is not finite")
        return
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp, old = final + ".tmp", final + ".old"
    if accelerator.is_main_process:
        finish_replacements(args.output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}  # the global RNG: only rewards' random_shift draws from it
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    files = dict(state or {}, **{f"rng_state_{accelerator.process_index}": rng})
    if full:  # gathered on the main process: the weights are not in optimizer_state (no LoRA file either)
        model_state, optimizer_state = full_state_dicts(unet, optimizer)
        if accelerator.is_main_process:
            files["denoiser"] = model_state
    else:
        optimizer_state = optimizer.state_dict()
    if accelerator.is_main_process:
        files["optimizer"] = {f"{i}.{k}": v for i, values in optimizer_state["state"].items()
                              for k, v in values.items() if torch.is_tensor(v)}
    for name, tensors in files.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  os.path.join(tmp, f"{name}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not full:
            save_lora(unet, models.family, tmp)
        scalars = {f"{i}.{k}": v for i, values in optimizer_state["state"].items()
                   for k, v in values.items() if not torch.is_tensor(v)}
        marker = dict(format=1, script=os.path.basename(__file__), step=step, run_id=args.run_id,
                      clean=guard.since_checkpoint == 0, run=run_fingerprint(args), files=sorted(os.listdir(tmp)),
                      optimizer=dict(param_groups=optimizer_state["param_groups"], scalars=scalars),
                      lr_scheduler=lr_scheduler.state_dict(),
                      grad_scaler=accelerator.scaler.state_dict() if accelerator.scaler is not None else None)
        with open(os.path.join(tmp, CHECKPOINT_MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
        for name in os.listdir(tmp):
            fsync_path(os.path.join(tmp, name))
        fsync_path(tmp)
        if os.path.isdir(final):
            if read_marker(final) is None:  # not ours: set aside, never deleted
                os.replace(final, f"{final}.unknown-{int(time.time())}")
            else:
                shutil.rmtree(old, ignore_errors=True)  # a checkpoint-N exists, so an .old is a stale copy
                os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(args.output_dir)
        shutil.rmtree(old, ignore_errors=True)
        prune_checkpoints(args)
    guard.since_checkpoint = 0
    accelerator.wait_for_everyone()


def finish_replacements(output_dir):
    """Finish the replacements of a checkpoint-N that a crash cut short: its .old copy goes back in place if
    checkpoint-N is missing; .old and .tmp copies (ours by their names) are deleted, even half deleted already, once
    a complete checkpoint-N is there."""
    for name in sorted(os.listdir(output_dir), key=lambda n: n.endswith(".tmp")):  # every .old first
        match = re.fullmatch(r"(checkpoint-\d+)\.(old|tmp)", name)
        if match:
            path, final = os.path.join(output_dir, name), os.path.join(output_dir, match.group(1))
            if match.group(2) == "old" and not os.path.exists(final) and read_marker(path) is not None:
                os.replace(path, final)
            elif read_marker(final) is not None:
                shutil.rmtree(path)


def prune_checkpoints(args):
    """Keep this run's newest --checkpoints_total_limit checkpoints and its newest clean one (no skipped update since
    the one before); never touch a folder without our marker or of another run."""
    if args.checkpoints_total_limit is None:
        return
    ours = {step: found for step, found in complete_checkpoints(args.output_dir).items()
            if found[1].get("run_id") == args.run_id}
    clean = [step for step, (_, marker) in ours.items() if marker.get("clean")]
    keep = set(sorted(ours)[-args.checkpoints_total_limit:]) | set(clean[-1:])
    for step, (path, _) in ours.items():
        if step not in keep:
            shutil.rmtree(path)


def resume_step(accelerator, unet, models, optimizer, lr_scheduler, args):
    """Restore checkpoint-N (or the latest) and return N; 0 without --resume_from_checkpoint. check_arguments has
    already refused a checkpoint of another run."""
    from safetensors.torch import load_file
    path, marker = resume_checkpoint(args)
    if path is None:
        if args.resume_from_checkpoint is not None:
            accelerator.print(f"no checkpoint in {args.output_dir}; starting from scratch")
        return 0
    saved = dict(marker["optimizer"]["scalars"], **load_file(os.path.join(path, "optimizer.safetensors")))
    optimizer_state = {}
    if args.finetune == "full":  # keyed by parameter name, whole: every process takes its shard
        for key, value in saved.items():
            name, field = key.rsplit(".", 1)
            optimizer_state.setdefault(name, {})[field] = value
        load_full_state(unet, optimizer, load_file(os.path.join(path, "denoiser.safetensors")),
                        dict(state=optimizer_state, param_groups=marker["optimizer"]["param_groups"]))
    else:
        load_lora(unet, models.family, path)
        for key, value in saved.items():
            index, name = key.split(".", 1)
            optimizer_state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict(dict(state=optimizer_state, param_groups=marker["optimizer"]["param_groups"]))
    lr_scheduler.load_state_dict(marker["lr_scheduler"])
    if "learning_rate" in resume_changes(args):  # LambdaLR: lr = base lr x its factor at the current step
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds the scheduler
        scheduler.base_lrs = [args.learning_rate] * len(scheduler.base_lrs)
        scheduler._last_lr = [base * factor(scheduler.last_epoch)
                              for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(optimizer.param_groups, scheduler._last_lr):
            group["lr"], group["initial_lr"] = lr, args.learning_rate
    if accelerator.scaler is not None and marker["grad_scaler"] is not None:
        accelerator.scaler.load_state_dict(marker["grad_scaler"])
    rng = read_checkpoint_state(path, f"rng_state_{accelerator.process_index}")
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and "cuda_0" in rng:
            torch.cuda.set_rng_state_all([rng[f"cuda_{i}"] for i in range(torch.cuda.device_count())])
    accelerator.print(f"resuming from {path} at step {marker['step']}")
    return marker["step"]


class NonfiniteGuard:
    """Updates skipped for a NaN/inf loss, reward or gradient. A checkpoint is written only after a finite update with
    finite LoRA weights; it is clean if no update was skipped since the checkpoint before. --max_nonfinite_steps
    skipped in a row stop the run, naming the newest clean checkpoint written before them."""

    def __init__(self, args):
        self.args, self.in_a_row, self.since_checkpoint = args, 0, 0

    @property
    def last_finite(self):
        return self.in_a_row == 0

    def update(self, step, finite):
        """Count this step's update; raise TrainingStopped after --max_nonfinite_steps skipped in a row."""
        self.in_a_row = 0 if finite else self.in_a_row + 1
        self.since_checkpoint += not finite
        if self.in_a_row < self.args.max_nonfinite_steps:
            return
        first = step - self.in_a_row + 1
        clean = [found for s, found in complete_checkpoints(self.args.output_dir).items()
                 if s < first and found[1].get("run_id") == self.args.run_id and found[1].get("clean")]
        if clean:
            where = (f"resume from {clean[-1][0]}, the newest checkpoint written before them after finite updates "
                     f"only, with a lower learning rate: --resume_from_checkpoint {clean[-1][0]} --learning_rate LR "
                     f"--resume_changes learning_rate")
        else:
            where = "no checkpoint was written before them: start again with a lower --learning_rate"
        raise TrainingStopped(f"stopped at step {step}: {self.in_a_row} updates in a row (from step {first}) had a "
                              f"NaN/inf loss, reward or gradient and were skipped; {where}")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


class MetricsLog:
    """metrics.jsonl (one JSON object per optimizer step) plus the tracker; main process only. A run resumed from
    step N keeps exactly one row per step up to N (the rows after N are run again; a line cut short by a crash is
    dropped); a fresh run starts an empty file. The file is rewritten atomically."""

    def __init__(self, accelerator, path, resume_step):
        self.accelerator, self.path, self.rows = accelerator, path, []
        if not accelerator.is_main_process:
            return
        if resume_step and os.path.exists(path):
            rows = {}
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:  # cut short by a crash
                        continue
                    if isinstance(row, dict) and isinstance(row.get("step"), int) and 0 <= row["step"] <= resume_step:
                        rows[row["step"]] = row
            self.rows = [rows[step] for step in sorted(rows)]
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        os.replace(path + ".tmp", path)

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
    """Images of the current policy for prompts, from fixed noise, its LoRA at --validation_lora_scale; (B, 3, H, W)
    in [0, 1]. Sharded (shard_denoiser), every process calls it: each draws its share of the images (eval_rows), with
    the noise they get in one batch, and every process gets them all."""
    generator = torch.Generator().manual_seed(seed)
    device = models.unet.device
    latents = initial_latents(models, args, len(prompts), generator, device)
    rows = eval_rows(len(prompts), args)
    share = prompts if rows is None else [prompts[i] for i in rows.tolist()]
    cond = encode_prompts(models, share, args.resolution)
    with lora_scale(unet, args.validation_lora_scale):
        latents = rollout(unet, scheduler, cond, latents if rows is None else latents[rows.to(device)], generator,
                          args, rows=rows, total=len(prompts))
    images = decode(models.vae, latents)
    if rows is not None:
        from accelerate.utils import gather
        images = gather(images)[: len(prompts)]  # the shares in process order
    return images


def eval_rows(total, args):
    """This process's rows of an evaluation batch of `total` when the denoiser is sharded (shard_denoiser), None
    otherwise: ceil(total / N) consecutive rows, the last row repeated where the batch runs out, so that every
    process makes the same calls."""
    if not sharding(args):
        return None
    from accelerate import PartialState
    state = PartialState()
    size = math.ceil(total / state.num_processes)
    return torch.arange(state.process_index * size, (state.process_index + 1) * size).clamp(max=total - 1)


@contextlib.contextmanager
def lora_scale(unet, scale):
    """Inside, the policy's LoRA ("default") adds scale x its weight change (peft's set_scale, what diffusers'
    set_adapters(weights=scale) and fuse_lora(lora_scale=scale) apply; exact, unlike a per-call
    cross_attention_kwargs scale). Active adapters and requires_grad flags are left as they are."""
    layers = lora_parts(unet)[0] if scale != 1 else []
    for layer in layers:
        layer.set_scale("default", scale)
    try:
        yield
    finally:
        for layer in layers:
            layer.set_scale("default", 1.0)


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
    """Fixed prompts and noise: a grid in samples/ (written by the main process) and the mean reward (None without a
    reward). The main process calls it, or every process when the denoiser is sharded (shard_denoiser)."""
    from accelerate import PartialState
    images = generate(models, scheduler, unet, args.eval_prompt_list, args, args.seed)
    if PartialState().is_main_process:
        save_grid(images, os.path.join(args.output_dir, "samples", f"step-{step:06d}.png"), nrow=1)
    if reward_fn is None:
        return None, images
    return compute_reward(reward_fn, images, args.eval_prompt_list, args).mean().item(), images


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
    """Average the LoRA gradients over processes in one flat collective. A sharded denoiser (shard_denoiser): nothing
    to do, FSDP averaged each backward's gradients into the shards."""
    from torch.distributed.tensor import DTensor
    if accelerator.num_processes == 1 or (params and isinstance(params[0], DTensor)):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def cli(argv=None):
    """The command line: bad input (UsageError, RewardLoadError) is one line on stderr and exit code 2, a run that
    stops (TrainingStopped) one line and exit code 1; returns the exit code."""
    try:
        main(parse_args(argv))
    except (UsageError, rewards.RewardLoadError) as error:
        print(f"{os.path.basename(__file__)}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except TrainingStopped as error:
        for bar in list(getattr(tqdm, "_instances", ())):  # the progress bar ends above the message, not below
            bar.close()
        print(f"{os.path.basename(__file__)}: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


def library_versions():
    import accelerate
    import diffusers
    import peft
    import transformers
    return {m.__name__: m.__version__ for m in (torch, diffusers, transformers, peft, accelerate)}


def typed_flags(argv=None):
    """The destinations of the flags given on the command line (argv, else sys.argv's): a parser of the same
    flags without any default parses it, so only what was typed lands in its namespace."""
    probe = build_parser()
    add_algorithm_arguments(probe)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    probe._defaults.clear()
    return set(vars(probe.parse_args(argv)))


def yield_to_modes_switched_off(args, preset, defaults, typed):
    """A preset's values for the flags of a mode that the command line switched off go back to their defaults
    instead of being refused (dpo.py --preset demo --offline: the online preset's --ref_update_rate is left out).
    The algorithm region's PRESET_MODES lists the modes: (switch, value, name, flags), the flags being used only while
    args.switch == value. Only a switch typed on the command line turns a mode off this way, and a flag typed there
    is kept (and checked) whatever its mode. Said in one line (by the first process)."""
    for switch, value, name, flags in globals().get("PRESET_MODES", ()):
        if switch not in typed or getattr(args, switch) == value:
            continue
        left_out = [f for f in flags if f in preset and f not in typed and preset[f] != defaults.get(f)]
        for flag in left_out:
            setattr(args, flag, defaults.get(flag))
        if left_out and os.environ.get("RANK", "0") == "0":
            print(f"--preset {args.preset}: {', '.join(f'--{f} {preset[f]}' for f in left_out)} left out: "
                  f"{'they are' if len(left_out) > 1 else 'it is'} for {name}, which the command line switched off")


KOHYA_LORA_NAME = "lora_kohya.safetensors"


KOHYA_LAYOUTS = {
    "sd15": ("unet", "ComfyUI (models/loras) and Automatic1111/Forge (models/Lora, `<lora:NAME:1>` in the prompt)"),
    "sdxl": ("unet", "ComfyUI (models/loras) and Automatic1111/Forge (models/Lora, `<lora:NAME:1>` in the prompt)"),
    "sd3": ("lora_transformer", "ComfyUI (models/loras)"),
    "flux": ("lora_transformer", "ComfyUI (models/loras)"),
}


def save_lora_kohya(unet, family, output_dir):
    """lora_kohya.safetensors: save_lora's weights in the kohya layout that ComfyUI and Automatic1111/Forge load
    (`<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`), converted from peft's state dict by diffusers'
    convert_state_dict_to_kohya. The module names are diffusers' after the family's prefix (KOHYA_LAYOUTS): lora_unet_
    for the UNets (the names kohya's sd-scripts give SD1.5's), lora_transformer_ for SD3 and FLUX (OneTrainer's
    layout). alpha is the layer's LoRA scale x rank (peft's scaling), so alpha / rank reproduces lora_alpha / r."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    prefix, state_dict, kohya = KOHYA_LAYOUTS[family][0], get_peft_model_state_dict(unet), {}
    for name, layer in unet.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            pair = convert_state_dict_to_kohya({f"{prefix}.{name}.{w}": state_dict[f"{name}.{w}"]
                                                for w in ("lora_A.weight", "lora_B.weight")})
            (alpha,) = [k for k in pair if k.endswith(".alpha")]  # the converter's alpha is the rank
            pair[alpha] = torch.tensor(float(layer.scaling["default"] * layer.r["default"]))
            kohya.update(pair)
    save_file({k: v.detach().contiguous() for k, v in kohya.items()}, os.path.join(output_dir, KOHYA_LORA_NAME),
              metadata={"format": "pt"})


def save_model_card(args, family, rows):
    """README.md in --output_dir, the run's model card (main process, end of training): base model, method and paper
    (this script's docstring), reward, the command and config.json, before_after.png and reward_curve.png, the eval
    rewards of `rows` (metrics.jsonl's), how to load the LoRA in diffusers and, from lora_kohya.safetensors, in the
    tools of KOHYA_LAYOUTS, and the base model's license where its own card gives one (a local folder's README.md, or
    the README.md of a hub id already in the local hub cache); unset otherwise. The card data goes through diffusers'
    populate_model_card as its training examples do; not through load_or_create_model_card, which first asks the hub
    for the output's README.md (a network call, and an error for a local folder): the card is written offline."""
    import shlex

    import diffusers
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache
    base, spec, script = args.pretrained_model_name_or_path, FAMILIES[family], os.path.basename(__file__)
    readme = os.path.join(base, "README.md") if os.path.isdir(base) else (
        try_to_load_from_cache(base, "README.md", revision=args.revision) if is_hub_id(base) else None)
    base_card = ModelCard.load(readme, ignore_metadata_errors=True).data if isinstance(readme, str) and \
        os.path.isfile(readme) else ModelCardData()
    data = {k: base_card.get(k) for k in ("license", "license_name", "license_link") if base_card.get(k)}
    data = ModelCardData(**data, base_model=base if is_hub_id(base) else None, pipeline_tag="text-to-image")
    with open(os.path.join(args.output_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    index = os.path.join(base, "model_index.json") if os.path.isdir(base) else None
    with open(index) if index and os.path.isfile(index) else contextlib.nullcontext() as f:
        empty = [k for k, v in (json.load(f) if f else {}).items() if v == [None, None]]  # slots left empty
    empty = [k for k in empty if k not in getattr(diffusers, spec["pipeline"])._optional_components]
    load = "".join(f", {k}=None" for k in empty)
    call = "".join(f", {k}={v}" for k, v in (("max_sequence_length", args.max_sequence_length),) if v is not None)
    paragraphs = [" ".join(p.split()) for p in (__doc__ or script).strip().split("\n\n")]  # the module's docstring
    method = paragraphs[0].split(":")[0] if ":" in paragraphs[0] else script
    paper = next((p for p in paragraphs if p.startswith(("Paper:", "Papers:"))), "")
    processes = config.get("num_processes", 1)
    launcher = f"accelerate launch --num_processes {processes}" if processes > 1 else "python"
    command = (f"{launcher} {shlex.join([script] + sys.argv[1:])}" if os.path.basename(sys.argv[0]) == script else
               f"# {script}'s main() was called from Python; its arguments are config.json's")
    evals = [r for r in rows if r.get("eval_reward") is not None]
    results = "No reward was evaluated." if not evals else (
        f"Eval reward (`{args.reward}` on the first {len(args.eval_prompt_list)} evaluation prompts, fixed noise): "
        f"{evals[0]['eval_reward']:.4g} at step {evals[0]['step']}{' (the base model)' * (evals[0]['step'] == 0)}"
        f", **{evals[-1]['eval_reward']:.4g}** at step {evals[-1]['step']} (final).")
    scale = (f"\npipe.fuse_lora(lora_scale={args.validation_lora_scale})  # the LoRA scale of the grids"
             if args.validation_lora_scale != 1 else "")
    full, denoiser = args.finetune == "full", spec["denoiser"]
    kind = "fine-tune" if full else "LoRA"
    usage = full_usage(args, spec, base, load, call) if full else f"""\
diffusers (`pytorch_lora_weights.safetensors`, diffusers' format):

```python
from diffusers import {spec['pipeline']}

pipe = {spec['pipeline']}.from_pretrained({json.dumps(base)}{load})
pipe.load_lora_weights({json.dumps(args.output_dir)}){scale}
image = pipe({json.dumps(args.eval_prompt_list[0])}, num_inference_steps={args.num_inference_steps}, \
height={args.resolution}, width={args.resolution}{call}).images[0]
```

`{KOHYA_LORA_NAME}` holds the same weights in the kohya layout, for {KOHYA_LAYOUTS[family][1]}: copy it \
there under a name of your choice. It changes the {spec['denoiser']} only (ComfyUI: a LoraLoaderModelOnly node). To \
score it as the papers do: `python evaluate.py --pretrained_model_name_or_path {shlex.quote(base)} --lora \
{shlex.quote(args.output_dir)} --rewards ...`.
"""
    body = f"""# {method} {kind} for {os.path.basename(base.rstrip("/"))}

{"A full fine-tune (every weight of the " + denoiser + ")" if full else "A LoRA"} of {spec['label']} `{base}`, \
trained with `{script}` toward the reward `{args.reward}`.

{paragraphs[0]}

{paper}

## Results

{results} Sampled with {args.sampler}, {args.num_inference_steps} steps, guidance {args.guidance_scale}, \
{args.resolution} px (config.json).

![Before (top row: the base model) and after (bottom row: this {"model" if full else "LoRA"}), same prompts, \
noise](samples/before_after.png)

![Reward during training](reward_curve.png)

## How to use

{usage}
## Training

```bash
{command}
```

<details><summary>config.json: every argument after presets, library versions</summary>

```json
{json.dumps(config, indent=2)}
```

</details>
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    card = populate_model_card(card, tags=["text-to-image", "full-fine-tune" if full else "lora", "diffusers-training",
                                           "reward-fine-tuning", script.removesuffix(".py"), family])
    card.save(os.path.join(args.output_dir, "README.md"))


WEIGHT_FILES = {"diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                              "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
                "transformers": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                 "pytorch_model.bin.index.json")}


def with_variant(name, variant):
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def check_weights(path, subfolder, library, variant, flag, revision=None):
    """One line unless the model at path/subfolder has the config and the weights its from_pretrained reads (with
    --variant: that variant's files; sharded: every shard its index names), before any model loads. A local folder is
    read; a hub id from what the hub cache holds, and online, where the cache lacks a file, from_pretrained will fetch
    it: then the hub must answer (check_hub)."""
    from huggingface_hub import constants
    if os.path.isdir(path) or constants.HF_HUB_OFFLINE:
        return check_files(path, subfolder, library, variant, flag, revision)
    try:
        check_files(path, subfolder, library, variant, flag, revision)
    except UsageError:
        check_hub(path, revision, flag)


def check_model_files(args, model_index, family):
    """check_weights for each model the script loads: the denoiser, the text encoders model_index.json names and the
    VAE (the pipeline's, or --pretrained_vae_model_name_or_path's, which is loaded without --variant)."""
    path = args.pretrained_model_name_or_path
    components = [family["denoiser"], *[f"text_encoder{n}" for n, _ in family["encoders"]]]
    components += [] if args.pretrained_vae_model_name_or_path else ["vae"]
    for name in components:
        entry = model_index.get(name) or [None, None]
        if entry[0] is not None:
            check_weights(path, name, "transformers" if name.startswith("text_encoder") else "diffusers",
                          args.variant, "--pretrained_model_name_or_path", args.revision)
    if args.pretrained_vae_model_name_or_path:
        check_weights(args.pretrained_vae_model_name_or_path, None, "diffusers", None,
                      "--pretrained_vae_model_name_or_path")


_BASE_COPY = weakref.WeakKeyDictionary()  # --finetune full: the trained denoiser -> its frozen base copy


FINETUNE_LABEL = {"lora": "LoRA", "full": "denoiser"}


def train_full(unet, args):
    """--finetune full: every weight of the denoiser trainable, in fp32 (load_models loads it in fp32; forwards run in
    --mixed_precision under autocast, as diffusers' full fine-tuning examples do). One process: the plain module. With
    several, shard_denoiser shards it. Returns the parameters the optimizer holds."""
    unet.requires_grad_(True)
    unet.full_finetune = True  # reference_unet: no adapter to switch off
    if sharding(args):
        shard_denoiser(unet, args)
    return list(unet.parameters())


def sharding(args):
    """True when --finetune full runs over several processes: the denoiser is sharded (FSDP2) and every process must
    make the same denoiser calls in the same order (shard_denoiser)."""
    import torch.distributed as dist
    return args.finetune == "full" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard_denoiser(unet, args):
    """FSDP2 (torch.distributed.fsdp.fully_shard) on each block of the denoiser, then on the root (shard_blocks).
    Each process holds 1/N of every weight (the fp32 master weights, which the optimizer holds as DTensors), of its
    gradient and of AdamW's two moments: 16 / N bytes per parameter. A block's weights are all-gathered, cast to the --mixed_precision dtype, just before each of its calls
    (forward, and again for the backward) and freed after it; gradients are reduce-scattered in fp32 and averaged
    over processes after each backward. So a block's all-gather is a collective inside every denoiser call, and every
    process makes the same calls in the same order: the algorithms draw what decides the calls (DRTune's early stop,
    ReFL's stop step, AlignProp's truncation) from shared_generator, the same on every process, pad a process's
    share of trained rows to the largest with rows whose loss counts 0 (spo.py's pairs, grpo.py's transitions),
    sample an online DPO round again on every process when one drew no pair, and every process takes part in
    drawing the evaluation grids (each its share, eval_rows; the main process writes them). Prompts, noise and batch
    sizes may differ between processes."""
    shard_blocks(unet, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision))


def shard_blocks(module, dtype=None):
    """fully_shard on each block of a denoiser, innermost first, then on its root (module): every element of a
    ModuleList named *blocks at any depth (a UNet's down and up blocks and, inside their attentions, each transformer
    block; an MMDiT's or FLUX's transformer blocks) and the mid block. A unit gathers the weights its inner units do
    not hold, so SDXL's ten-layer attentions are ten units, not one block of 1.2 B parameters. dtype: the weights'
    dtype in the calls (MixedPrecisionPolicy's param_dtype; gradients are reduced in fp32), None to keep theirs."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    units = [m for name, m in module.named_modules() if re.search(r"(^|\.)(\w*blocks\.\d+|mid_block)$", name)]
    for unit in reversed(units):  # named_modules lists a module before the modules inside it
        fully_shard(unit, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def fsdp_parts(unet):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in unet.modules() if isinstance(m, FSDPModule)]


def keep_base_copy(unet, args):
    """--finetune full in a script with a reference model (dpo.py, spo.py, grpo.py's KL): a frozen copy of the base
    denoiser in the weight dtype (the frozen weights' dtype under --mixed_precision), no gradient, that reference_unet
    computes with. With LoRA the reference is the same module with the adapter off and costs nothing; here it is one
    more model's weights, sharded as the trained one is over several processes (2 / N bytes per parameter in
    fp16/bf16; its calls gather a block at a time, see shard_denoiser). Call before add_lora. drtune.py, refl.py,
    draft.py and alignprop.py keep none (before_after.png reads the step-0 grid back)."""
    import copy
    if args.finetune == "full":
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        _BASE_COPY[unet] = copy.deepcopy(unet).to(dtype).requires_grad_(False).eval()
        if sharding(args):
            shard_blocks(_BASE_COPY[unet])


def full_state_dicts(unet, optimizer=None):
    """The denoiser's full state dict and, with `optimizer`, the optimizer's (keyed by parameter name), gathered on the
    CPU of the main process (torch.distributed.checkpoint.state_dict, full_state_dict and cpu_offload: other processes
    get empty dicts). A collective when sharded: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(unet, options=options)
    optim = None if optimizer is None else get_optimizer_state_dict(
        unet, getattr(optimizer, "optimizer", optimizer), options=options)
    return model, optim


def load_full_state(unet, optimizer, model, optim):
    """Put full state dicts (full_state_dicts' layout, read from a checkpoint by every process) into the denoiser and
    the optimizer; each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(unet, model, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(unet, getattr(optimizer, "optimizer", optimizer), optim, options=options)


def save_denoiser(accelerator, unet, family, output_dir):
    """--finetune full, end of training: the trained denoiser as a diffusers model folder, output_dir/unet or
    output_dir/transformer (config.json, diffusion_pytorch_model.safetensors in fp32), written by save_pretrained:
    `UNet2DConditionModel.from_pretrained(output_dir, subfolder="unet")`, or the pipeline with `unet=` /
    `transformer=`. Sharded, the full weights are gathered on the main process first (every process calls this)."""
    folder = os.path.join(output_dir, FAMILIES[family]["denoiser"])
    if not fsdp_parts(unet):
        if accelerator.is_main_process:
            unet.save_pretrained(folder)
        return
    from torch.distributed.fsdp import FSDPModule
    state, _ = full_state_dicts(unet)
    if accelerator.is_main_process:  # the unwrapped class (fully_shard made the module an FSDP subclass of it)
        cls = next(c for c in type(unet).__mro__ if not issubclass(c, FSDPModule))
        with torch.device("meta"):
            model = cls.from_config(unet.config)
        model.load_state_dict(state, assign=True)
        model.save_pretrained(folder)


def base_images(models, scheduler, unet, args):
    """The base model's images of before_after.png, drawn as generate draws the policy's: the LoRA switched off, or the
    frozen base copy of a --finetune full run that keeps one; otherwise (full, drtune.py, refl.py, draft.py,
    alignprop.py: no second model) the step-0 grid samples/step-000000.png read back, or None if it is missing or of
    other prompts."""
    if args.finetune == "lora" or unet in _BASE_COPY:
        with reference_unet(unet) as base:
            return generate(models, scheduler, base, args.eval_prompt_list, args, args.seed)
    from PIL import Image
    path = os.path.join(args.output_dir, "samples", "step-000000.png")
    if not os.path.isfile(path):
        return None
    grid = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    size = grid.shape[1]
    if grid.shape[2] != size * len(args.eval_prompt_list):
        return None
    return torch.stack(grid.split(size, dim=2))


def full_usage(args, spec, base, load, call):
    """The model card's 'How to use' of a --finetune full run: the trained denoiser folder (save_denoiser) in the base
    model's pipeline."""
    denoiser, cls = spec["denoiser"], spec["denoiser_class"]
    return f"""diffusers (`{denoiser}/`, a diffusers model folder of the trained {denoiser}; the other components are the \
base model's):

```python
from diffusers import {spec['pipeline']}, {cls}

{denoiser} = {cls}.from_pretrained({json.dumps(args.output_dir)}, subfolder="{denoiser}")
pipe = {spec['pipeline']}.from_pretrained({json.dumps(base)}{load}, {denoiser}={denoiser})
image = pipe({json.dumps(args.eval_prompt_list[0])}, num_inference_steps={args.num_inference_steps}, \
height={args.resolution}, width={args.resolution}{call}).images[0]
```

No LoRA file is written for a full fine-tune.
"""


def check_hub(path, revision, flag):
    """Online, a hub id whose files the cache lacks: one request for its model info (metadata only, seconds), so that
    a network that is down, or a repository that does not exist, is one line before any model loads."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    try:
        HfApi().model_info(path, revision=revision, timeout=20)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise UsageError(f"{flag} {path}: the hub has no such model{f' at --revision {revision}' if revision else ''} "
                         f"(or it is private: log in with hf auth login); check the id") from e
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a timeout: the download would fail the same way
        raise UsageError(f"{flag} {path}: the hub cache lacks some of its files and the hub did not answer "
                         f"({type(e).__name__}); connect to the network, or download it where there is one (hf "
                         f"download {path}) and set HF_HUB_OFFLINE=1, or give a local diffusers folder with {flag}"
                         ) from e


def check_files(path, subfolder, library, variant, flag, revision=None):
    """check_weights' reading of a local folder, or of the hub cache for a hub id."""
    from huggingface_hub import try_to_load_from_cache
    hub = not os.path.isdir(path)
    where = f"{subfolder}/" if subfolder else ""

    def find(name):  # the file's local path, or None
        if not hub:
            local = os.path.join(path, subfolder or "", name)
            return local if os.path.isfile(local) else None
        found = try_to_load_from_cache(path, where + name, revision=revision)
        return found if isinstance(found, str) else None

    fix = (f"download it with network first (hf download {path}), or give a local diffusers folder with {flag}"
           if hub else f"the folder is incomplete: download the model again, or give a complete diffusers folder "
                       f"with {flag}")
    held = "the hub cache (HF_HUB_OFFLINE is set) holds" if hub else "it has"
    if find("config.json") is None:
        raise UsageError(f"{flag} {path}: {where}config.json is "
                         f"{'not in the hub cache (HF_HUB_OFFLINE is set)' if hub else 'missing'}; {fix}")
    names = [with_variant(name, variant) for name in WEIGHT_FILES[library]]
    present = [name for name in names if find(name)]
    if not present:
        plain = [name for name in WEIGHT_FILES[library] if find(name)]
        if variant is not None and plain:
            raise UsageError(f"--variant {variant}: {flag} {path}: {where}{names[0]} is missing (nor "
                             f"{', '.join(names[1:])}), only {plain[0]}; leave out --variant, or give a folder that "
                             f"has the {variant} files")
        raise UsageError(f"{flag} {path}: {subfolder or 'the folder'} has no weights file ({held} none of "
                         f"{', '.join(names)}); {fix}")
    # the file it loads: diffusers takes an index before a whole file, transformers the first in WEIGHT_FILES' order
    chosen = next((n for n in present if n.endswith(".json")), present[0]) if library == "diffusers" else present[0]
    if chosen.endswith(".json"):  # sharded: every shard the index names
        try:
            with open(find(chosen), encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            if not all(isinstance(shard, str) for shard in shards):
                raise TypeError("a shard name that is not a string")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{flag} {path}: {where}{chosen} is not a shard index (JSON with a weight_map; "
                             f"{type(e).__name__}); {fix}") from e
        missing = [shard for shard in shards if not find(shard)]
        if missing:
            raise UsageError(f"{flag} {path}: {where}{chosen} names {len(shards)} shards, {len(missing)} missing "
                             f"({missing[0]}{', ...' if len(missing) > 1 else ''}); {fix}")


# ---------------------------------------------------------------------------------------------
# Algorithm: GRPO (DDPO, Flow-GRPO, MixGRPO)
# ---------------------------------------------------------------------------------------------

NEEDS_DIFFERENTIABLE_REWARD = False
NEEDS_STOCHASTIC_STEPS = True  # the method trains on step densities: the default sampler is stochastic
ADVANTAGE_EPS = 1e-4  # Flow-GRPO's tracker: (r - mean) / (std + 1e-4)


def gaussian_log_density(x, mean, std):
    """log N(x; mean, std^2 I) averaged over all but the batch dimension (DDPO's and Flow-GRPO's per-step log-prob),
    in fp32; x, mean (B, C, h, w), std a scalar or (B,)."""
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    log_pdf = -(x.float() - mean.float()) ** 2 / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)
    return log_pdf.flatten(1).mean(1)


def seeded(*key):
    """A CPU generator that is a function of key alone (the same on every process and after a resume)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def sde_window(args, step):
    """The step indices sampled with the SDE (and trained) in round `step`: all of them, or MixGRPO's window of
    --sde_window_size steps starting at l = min(s floor((step - 1) / tau), T - W)."""
    T, W = args.num_inference_steps, args.sde_window_size
    if not W:
        return range(T)
    start = min(args.sde_window_stride * ((step - 1) // args.sde_window_every), T - W)
    return range(start, start + W)


def round_prompts(args, step, num_processes):
    """Every process's prompts of one round, in process order: N x accumulation x B draws (with replacement) from a
    generator of (seed, round) alone."""
    n = num_processes * args.gradient_accumulation_steps * args.train_batch_size
    idx = torch.randint(len(args.train_prompt_list), (n,), generator=seeded(args.seed, step, 0))
    return [args.train_prompt_list[i] for i in idx]


@torch.no_grad()
def sample_group(models, scheduler, unet, prompts, first_image, step, args):
    """G images for each of the B prompts (image k of prompt b at row b G + k; global index first_image + row) and
    every stochastic transition. Each image's noise (x_T, the steps' z, its trained steps) comes from a generator of
    (seed, round, global index). Returns dict: latents, next_latents (n, S, C, h, w) the S stochastic transitions,
    timesteps (n, S), log_probs (n, S) of the sampled transitions under the sampling forward, trained (n, K) indices
    into S of the steps to train, images (n, 3, H, W), prompts (n)."""
    G, device = args.group_size, first_param(unet).device
    prompts = [p for p in prompts for _ in range(G)]
    n = len(prompts)
    generators = [seeded(args.seed, step, 1, first_image + row) for row in range(n)]
    side = args.resolution // models.vae_scale_factor
    shape = (models.vae.config.latent_channels, side, side)
    starts = [randn((1, *shape), g, device) for g in generators]
    if args.shared_initial_noise:  # DanceGRPO: a group starts from its first image's x_T
        starts = [starts[row - row % G] for row in range(n)]
    latents = torch.cat(starts)
    cond = encode_prompts(models, prompts, args.resolution)
    scheduler.set_timesteps(args.num_inference_steps, device=device)
    window = set(sde_window(args, step))
    record = dict(latents=[], next_latents=[], timesteps=[], log_probs=[])
    for i, t in enumerate(scheduler.timesteps):
        model_output = predict_noise(unet, latents, t, cond, args.guidance_scale)
        if i not in window:  # MixGRPO: the ODE step outside the window
            latents = sampler_step(scheduler, model_output, t, latents, None, 0.0)
            continue
        mean, std = step_mean_std(scheduler, model_output.float(), t, latents.float(), args.eta)
        if not float(std) > 0:  # a deterministic step (DDIM's last with set_alpha_to_one): no density to train
            latents = mean.to(latents.dtype)
            continue
        noise = torch.cat([randn((1, *shape), g, device) for g in generators])
        next_latents = mean + std * noise
        record["latents"].append(latents.float())
        record["next_latents"].append(next_latents)
        record["timesteps"].append(t.expand(n))
        record["log_probs"].append(gaussian_log_density(next_latents, mean, std))
        latents = next_latents.to(latents.dtype)
    images = decode(models.vae, latents)
    out = {k: torch.stack(v, 1) for k, v in record.items()}
    S = out["timesteps"].shape[1]
    K = max(1, int(args.timestep_fraction * S))
    out["trained"] = torch.stack([torch.randperm(S, generator=g)[:K] for g in generators]).to(device)
    return dict(out, images=images, prompts=prompts)


def group_advantages(rewards_all, G, std_of="group", clip=5.0):
    """rewards (M,) of M / G groups of G consecutive images -> advantages (M,): (r - group mean) / (std + 1e-4),
    std the group's or the batch's (population), clipped to [-clip, clip]; exactly 0 for a group whose rewards are
    all equal. Also returns the fraction of such groups."""
    r = rewards_all.double().view(-1, G)
    std = r.std(1, unbiased=False, keepdim=True) if std_of == "group" else r.std(unbiased=False)
    adv = (r - r.mean(1, keepdim=True)) / (std + ADVANTAGE_EPS)
    flat = (r == r[:, :1]).all(1, keepdim=True)
    adv = torch.where(flat, torch.zeros_like(adv), adv).clamp(-clip, clip)
    return adv.flatten().float(), flat.float().mean().item()


def clipped_loss(log_prob, old_log_prob, advantages, clip_range):
    """PPO's clipped objective per transition (DDPO, Flow-GRPO): max(-A r, -A clip(r, 1 - eps, 1 + eps)),
    r = exp(log_prob - old_log_prob); returns (loss (R,), ratio (R,) detached)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio.detach()


def transition_terms(models, scheduler, unet, rows, args):
    """The policy's log-density of each row's sampled transition, and the mean of its step (R,), (R, C, h, w),
    recomputed at the row's x_i and timestep with CFG as in sampling; rows: dict of latents, next_latents,
    timesteps (R,), prompts (R)."""
    cond = encode_prompts(models, rows["prompts"], args.resolution)
    model_output = predict_noise(unet, rows["latents"], rows["timesteps"], cond, args.guidance_scale)
    mean, std = step_mean_std(scheduler, model_output.float(), rows["timesteps"], rows["latents"], args.eta)
    return gaussian_log_density(rows["next_latents"], mean, std), mean, std


def kl_to_reference(models, scheduler, unet, rows, mean, std, args):
    """KL(policy step || reference step) per row: two Gaussians with the same std, |mean - mean_ref|^2 / (2 std^2),
    averaged over dimensions (Flow-GRPO); the reference is the model with the LoRA off."""
    with torch.no_grad(), reference_unet(unet) as reference:
        _, mean_ref, _ = transition_terms(models, scheduler, reference, rows, args)
    std = per_sample(torch.as_tensor(std, dtype=torch.float32), mean)
    return ((mean - mean_ref) ** 2 / (2 * std ** 2)).flatten(1).mean(1)


def transitions(batch, advantages):
    """One row per trained transition of the process's images: the image's index, its x_i, x_{i+1}, timestep,
    sampled log-density, advantage and prompt; rows of one image are consecutive."""
    n, K = batch["trained"].shape
    image = torch.arange(n, device=batch["trained"].device).repeat_interleave(K)
    step = batch["trained"].flatten()
    rows = {key: batch[key][image, step] for key in ("latents", "next_latents", "timesteps", "log_probs")}
    return dict(rows, image=image, advantages=advantages[image], prompts=[batch["prompts"][i] for i in image.tolist()])


def select(rows, index):
    return {k: [v[i] for i in index.tolist()] if k == "prompts" else v[index] for k, v in rows.items()}


def update_plan(args, step, epoch, keep_global, offset, n_local):
    """The round's updates of one pass: the global images kept for training (keep_global (M,) bool), shuffled by
    a generator of (seed, round, pass) (DDPO's per-epoch shuffle), cut into --updates_per_round parts; returns, per
    update, (this process's image indices, the number of images of the update over all processes)."""
    kept = keep_global.nonzero().flatten().cpu()
    order = kept[torch.randperm(len(kept), generator=seeded(args.seed, step, 2, epoch))]
    plan = []
    for part in order.tensor_split(args.updates_per_round):
        local = part[(part >= offset) & (part < offset + n_local)] - offset
        plan.append((local.sort().values, len(part)))
    return plan


def rows_of(rows, images, K):
    """Row indices of the given local images (K consecutive rows each)."""
    return (images.repeat_interleave(K) * K + torch.arange(K).repeat(len(images))).to(rows["image"].device)


def chunks(index, size):
    return [index[i:i + size] for i in range(0, len(index), size)]


def lockstep(accelerator, args, parts, pad):
    """(part, weight 1) for each of this process's micro-batches; when the denoiser is sharded (shard_denoiser) the
    list is filled up to the longest of any process with (pad, weight 0), a micro-batch whose loss counts 0, so that
    every process makes the same denoiser calls."""
    weighted = [(part, 1.0) for part in parts]
    if not sharding(args):
        return weighted
    longest = int(accelerator.gather(torch.tensor([len(parts)], device=accelerator.device)).max())
    return weighted + [(pad, 0.0)] * (longest - len(parts))


def main(args):
    """Train; returns the last metrics row (with the final eval reward) so that tests can call it."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
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

    models = load_models(args, info, device, weight_dtype)
    if args.cache_prompt_embeds:
        size = cache_prompt_embeds(models, args.train_prompt_list + args.eval_prompt_list)
        accelerator.print(f"prompt embeddings cached: {len(models.prompt_cache)} prompts, {size:.1f} MiB; text "
                          f"encoders moved to the CPU")
    scheduler = make_scheduler(args)
    reward_fn = rewards.build_reward(args.reward, device=device, dtype=weight_dtype, **info["reward_options"])
    set_seed(args.seed)  # the same LoRA init on every process
    unet = models.unet
    if args.beta > 0:  # --finetune full: the KL's reference (the LoRA's is the same model with the adapter off)
        keep_base_copy(unet, args)
    params = add_lora(unet, args)
    if args.finetune == "full":
        accelerator.print("--finetune full: every denoiser weight is trained; --rank, --lora_target_modules and "
                          "--validation_lora_scale are not used")
    if args.gradient_checkpointing:
        enable_checkpointing(unet, models.vae, args.checkpointing_granularity)
    optimizer = make_optimizer(params, args, device)
    updates = args.num_inner_epochs * args.updates_per_round  # optimizer updates per round
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * updates,
                                 num_training_steps=args.max_train_steps * updates)
    # The UNet is not wrapped in DDP (it also runs with adapters disabled for the reference, and the number of
    # transitions per update differs per process); LoRA gradients are all-reduced by hand below.
    optimizer = accelerator.prepare(optimizer)
    start_step = resume_step(accelerator, unet, models, optimizer, lr_scheduler, args)
    metrics = MetricsLog(accelerator, os.path.join(args.output_dir, "metrics.jsonl"), start_step)
    if main_process and args.report_to != "none":
        accelerator.init_trackers(os.path.basename(__file__).removesuffix(".py"),
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    N, rank = accelerator.num_processes, accelerator.process_index
    per_process = args.gradient_accumulation_steps * args.train_batch_size  # prompts
    accelerator.print(f"{FAMILIES[models.family]['label']} | {len(params)} {FINETUNE_LABEL[args.finetune]} "
                      f"tensors, "
                      f"{sum(p.numel() for p in params) / 1e6:.2f} M trainable | {per_process} prompts x "
                      f"{N} processes x G = {args.group_size} = {per_process * N * args.group_size} images per round, "
                      f"{updates} updates | {args.max_train_steps} rounds from {start_step}")
    samples = main_process or sharding(args)  # who draws the evaluation grids (every process when sharded)
    if samples and start_step == 0:
        with accelerator.autocast():
            eval_reward, _ = evaluate(models, scheduler, unet, reward_fn, args, 0)
        metrics.log(dict(step=0, eval_reward=eval_reward))

    row, guard = {}, NonfiniteGuard(args)
    progress = tqdm(initial=start_step, total=args.max_train_steps, disable=not main_process, desc="rounds")
    for step in range(start_step + 1, args.max_train_steps + 1):
        start = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # ---- sampling: this process's prompts of the round, G images each, in batches of B prompts
        prompts = round_prompts(args, step, N)[rank * per_process:(rank + 1) * per_process]
        offset = rank * per_process * args.group_size  # global index of this process's first image
        # the round's prompts through the text encoders once: sampling and every training forward reuse them
        fresh = [p for p in dict.fromkeys(prompts) if p not in models.prompt_cache]
        if fresh:  # none with --cache_prompt_embeds
            encode_text(models, fresh, cache=True)
        batches, raw = [], {}
        for b in range(0, per_process, args.train_batch_size):
            with accelerator.autocast():
                batch = sample_group(models, scheduler, unet, prompts[b:b + args.train_batch_size],
                                     offset + b * args.group_size, step, args)
                batch["rewards"] = compute_reward(reward_fn, batch.pop("images"), batch["prompts"], args).float()
            for name, value in reward_fn.last_raw.items():
                raw.setdefault(name, []).append(value)
            batches.append(batch)
        batch = {k: sum((b[k] for b in batches), []) if k == "prompts" else torch.cat([b[k] for b in batches])
                 for k in batches[0]}
        n, K = batch["trained"].shape
        # ---- advantages over every process's groups
        all_rewards = accelerator.gather(batch["rewards"])
        advantages, flat_groups = group_advantages(all_rewards, args.group_size, args.advantage_std,
                                                   args.advantage_clip)
        keep = advantages != 0 if args.beta == 0 else torch.ones_like(advantages, dtype=torch.bool)
        rows = transitions(batch, advantages[offset:offset + n].to(device))
        # ---- the old log-densities: each update's rows get theirs from the training forward at the sampled policy
        plans = [update_plan(args, step, e, keep, offset, n) for e in range(args.num_inner_epochs)]
        old = torch.full((n * K,), math.nan, device=device)
        pad = torch.zeros(1, dtype=torch.long, device=device)  # a micro-batch of weight 0 (lockstep): row 0
        with torch.no_grad(), accelerator.autocast():
            for images, _ in plans[0][1:]:
                parts = chunks(rows_of(rows, images, K), args.train_micro_batch)
                for index, weight in lockstep(accelerator, args, parts, pad):
                    log_prob = transition_terms(models, scheduler, unet, select(rows, index), args)[0]
                    if weight:
                        old[index] = log_prob
        # ---- updates
        stats = torch.zeros(6, device=device)  # sums over rows: loss, kl, clipped, ratio, approx kl; rows trained
        finite, grad_norm, padded = True, float("nan"), 0
        for epoch, plan in enumerate(plans):
            for u, (images, total) in enumerate(plan):
                total_rows = total * K
                parts = chunks(rows_of(rows, images, K), args.train_micro_batch)
                for index, weight in lockstep(accelerator, args, parts, pad):
                    part = select(rows, index)
                    with accelerator.autocast():
                        log_prob, mean, std = transition_terms(models, scheduler, unet, part, args)
                        if epoch == 0 and u == 0 and weight:  # the policy that sampled: its own value, r = 1 exactly
                            old[index] = log_prob.detach()
                        old_part = old[index] if weight else log_prob.detach()  # a pad: ratio 1, weight 0
                        loss, ratio = clipped_loss(log_prob, old_part, part["advantages"], args.clip_range)
                        kl = (kl_to_reference(models, scheduler, unet, part, mean, std, args) if args.beta > 0
                              else torch.zeros_like(loss))
                        loss = loss + args.beta * kl
                    # all_reduce_grads averages over processes: this scale makes the update the mean over all rows
                    accelerator.backward(loss.sum() * (weight * N / total_rows))
                    padded += not weight
                    stats += weight * torch.stack([loss.detach().sum(), kl.detach().sum(),
                                                   ((ratio - 1).abs() > args.clip_range).float().sum(), ratio.sum(),
                                                   0.5 * ((log_prob.detach() - old_part) ** 2).sum(),
                                                   torch.tensor(float(len(index)), device=device)])
                all_reduce_grads(accelerator, params)
                norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                grad_norm = float(norm) if norm is not None else float("nan")
                ok = math.isfinite(grad_norm) and bool(torch.isfinite(stats).all())
                if ok or accelerator.scaler is not None:  # the fp16 scaler skips inf grads itself
                    optimizer.step()
                finite = finite and ok
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        for p in fresh:
            models.prompt_cache.pop(p)
        known = ~old.isnan()  # |sampling forward's log-prob - the training forward's at the sampled policy|
        mismatch = (rows["log_probs"][known] - old[known]).abs().max() if known.any() else torch.zeros((), device=device)
        totals = accelerator.reduce(stats, reduction="sum")
        mismatch = accelerator.gather(mismatch.view(1)).max()
        rows_done = max(totals[5].item(), 1.0)
        finite = finite and bool(torch.isfinite(all_rewards).all())
        row = dict(step=step, loss=totals[0].item() / rows_done, reward_mean=all_rewards.mean().item(),
                   reward_std=all_rewards.std().item(), grad_norm=grad_norm, lr=lr_scheduler.get_last_lr()[0],
                   seconds=time.time() - start, peak_memory_mb=peak_memory_mb(device), skipped=not finite,
                   **{f"raw_{k}": accelerator.gather(torch.cat(v)).float().mean().item() for k, v in raw.items()},
                   kl=totals[1].item() / rows_done, clipped_fraction=totals[2].item() / rows_done,
                   ratio_mean=totals[3].item() / rows_done, approx_kl=totals[4].item() / rows_done,
                   logp_mismatch=mismatch.item(), advantage_abs_mean=advantages.abs().mean().item(),
                   flat_groups=flat_groups, trained_images=int(keep.sum()), transitions=int(totals[5].item()),
                   sde_window_start=sde_window(args, step)[0])
        if sharding(args):  # micro-batches of weight 0 that kept the processes' denoiser calls in step (lockstep)
            row["padded_micro_batches"] = int(accelerator.reduce(torch.tensor(padded, device=device), "sum"))
        if step % args.validation_steps == 0 or step == args.max_train_steps:
            if samples:
                with accelerator.autocast():
                    row["eval_reward"], _ = evaluate(models, scheduler, unet, reward_fn, args, step)
            accelerator.wait_for_everyone()
        metrics.log(row)
        progress.update(1)
        progress.set_postfix(reward=f"{row['reward_mean']:.4g}", clipped=f"{row['clipped_fraction']:.2f}")
        if step % args.logging_steps == 0 and main_process:
            progress.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        guard.update(step, finite)  # --max_nonfinite_steps skipped in a row: TrainingStopped
        if step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, unet, models, optimizer, lr_scheduler, args, step, guard)
    progress.close()

    accelerator.wait_for_everyone()
    if args.finetune == "full":
        save_denoiser(accelerator, unet, models.family, args.output_dir)
    if samples:
        with accelerator.autocast():
            after = generate(models, scheduler, unet, args.eval_prompt_list, args, args.seed)
            before = base_images(models, scheduler, unet, args)
    if main_process:
        if args.finetune == "lora":
            save_lora(unet, models.family, args.output_dir)
            save_lora_kohya(unet, models.family, args.output_dir)
        save_grid(after if before is None else torch.cat([before.to(after.device), after]),
                  os.path.join(args.output_dir, "samples", "before_after.png"), nrow=1 if before is None else 2)
        plot_reward_curve(metrics.rows, os.path.join(args.output_dir, "reward_curve.png"))
        save_model_card(args, models.family, metrics.rows)
    accelerator.end_training()
    return row


if __name__ == "__main__":
    sys.exit(cli())
