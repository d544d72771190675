"""Benchmark: seconds per iteration and peak memory of DRTune against T and K, next to full backprop; the other
modes (--fig7, --table1, --dpo, --spo) are listed below.

One iteration is what the training loop of drtune.py does per optimizer step for a batch of B prompts:
`algorithm_loss`, backward, gradient clipping and the AdamW step on the LoRA weights. Each configuration runs
in a fresh process (forked from a server that has already imported the libraries): `--warmup` iterations, then
the median of `--iters` timed ones (on CPU with one torch thread, the default, the process's CPU time, which
other processes sharing the cores do not inflate; otherwise wall-clock time). Peak memory: on CUDA,
`torch.cuda.max_memory_allocated` (reset after loading); on CPU (Linux), the process's peak resident set (VmHWM,
reset after loading, freed heap pages first given back with glibc's malloc_trim) minus its resident set after the
models, LoRA and optimizer are loaded.

- DRTune rows run with t_min = 1 (`--early_stop_max 1`): all T steps run, T - K under no_grad, K with gradient.
  "early stop" rows draw t_min in [1, m], m = 0.4 T, as training does, from the seeded per-step generator
  (`step_generator`), so every run draws the same t_min.
- Full backprop (DRaFT-T, the naive baseline) is the scaffold's `rollout` with every step under gradient,
  through the UNet inputs, no early stop; then the same decode, reward and backward.
- Parts, each timed alone in one process: a UNet pass under no_grad (with CFG, as `rollout` calls it), a UNet
  forward+backward with the input detached, one with the gradient to the input, the decode and the reward
  (forward+backward), and prompt encoding + optimizer step. Every iteration counts its own UNet, decode and
  reward calls (hooks), so "parts" = sum of count x part time and ratio = iteration / parts: near 1 means no
  hidden overhead (what is left is the sampler arithmetic, noise draws and Python).

A method is one line of METHODS: (label, script module, extra flags). Scripts that do not exist are left out;
a configuration that a script refuses (its flags or its argument checks) is reported as skipped, with the reason.

    python bench.py                                # tiny SD1.5 on CPU, a few minutes: BENCHMARKS.md, bench_drtune.png
    python bench.py --quick --output_dir /tmp/b    # seconds; what tests/test_bench.py runs
    python bench.py --full_size sdxl               # GPU: random-weight SDXL at 1024, the paper's DRTune settings
    python bench.py --full_size sd15 --allow_cpu   # CPU smoke of the full-size path (64 px, T=1, K=1; prints only)
    python bench.py --fig7                         # the paper's Fig. 7 on the tiny model: LoRA grad norm vs K
    python bench.py --table1                       # a miniature Table 1: every method's main() at one CPU budget
    python bench.py --dpo                          # offline Diffusion-DPO: s/step and memory at batch 1..8
    python bench.py --spo                          # SPO: s/trajectory, s/training step and memory, batch 1..4
    python bench.py --dpo --full_size sdxl         # GPU: the same at 1024 px on a random-weight SDXL
    python bench.py --fig7 --quick --output_dir /tmp/b; python bench.py --table1 --quick --output_dir /tmp/b
    python bench.py --gradient_checkpointing       # the sweep with --gradient_checkpointing (its own section)
    python bench.py --checkpointing                # MiB per trained step and time of each checkpointing granularity
    # side by side with TRL 0.23.1's AlignPropTrainer and diffusers' train_diffusion_dpo.py (see PEER_VERSIONS),
    # installed in another interpreter (a venv that also sees this repo's requirements):
    python bench.py --peers --peer_python /tmp/peers/bin/python --peer_dpo_script /tmp/peers/train_diffusion_dpo.py

The GPU sections, all in one go on one GPU (each replaces its placeholder in BENCHMARKS.md):

    for m in sd15 sdxl; do for mode in "" --dpo --spo; do python bench.py --full_size $m $mode || break 2; done; done
"""

import argparse
import collections
import concurrent.futures
import contextlib
import ctypes
import datetime
import functools
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# One line per method: (label, script module, extra flags). "{K}" makes the entry sweep K (K <= T); "{m}" is 0.4 T,
# the paper's early-stop bound m. Flags are the scripts' own.
METHODS = [
    ("DRTune", "drtune", ["--num_trained_steps", "{K}", "--early_stop_max", "1"]),
    ("DRTune, early stop", "drtune", ["--num_trained_steps", "{K}", "--early_stop_max", "{m}"]),
    ("DRaFT-K", "draft", ["--draft_variant", "k", "--draft_k", "{K}"]),
    ("DRaFT-LV", "draft", ["--draft_variant", "lv"]),
    ("ReFL, stop in the last 0.4 T", "refl", ["--stop_range", "{m}"]),
    ("AlignProp", "alignprop", []),
]
# The naive baseline, with drtune.py's scaffold (identical in every script; draft.py --draft_variant t is the same
# computation). Its K and m flags only pass drtune.py's argument checks: full_backprop_loss does not read them.
FULL_BACKPROP = ("full backprop", "drtune", ["--num_trained_steps", "1", "--early_stop_max", "1"])

# ---------------------------------------------------------------------------------------------
# Full-size models: published architectures with random weights (no download)
# ---------------------------------------------------------------------------------------------

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


def write_full_size(name, folder, device):
    """A diffusers folder with random full-size weights (bf16 on disk), loadable by the scripts' load_models.
    Runs in a worker process of its own (it changes the default dtype)."""
    from transformers import AutoTokenizer
    tiny = os.path.join(HERE, "tiny_models", name)
    shutil.copy(os.path.join(tiny, "model_index.json"), folder)
    for sub in ("scheduler", "tokenizer", "tokenizer_2"):
        if os.path.isdir(os.path.join(tiny, sub)):
            shutil.copytree(os.path.join(tiny, sub), os.path.join(folder, sub))
    tokenizer = AutoTokenizer.from_pretrained(tiny, subfolder="tokenizer")  # EOS must be its largest id (pooling)
    torch.set_default_dtype(torch.bfloat16)  # this is a throw-away process: half the memory and disk, no casts
    with torch.device(device):
        models = full_size_models(name, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    components = [("unet", models["unet"]), ("vae", models["vae"]),
                  *zip(["text_encoder", "text_encoder_2"], models["text_encoders"])]
    for sub, model in components:
        model.save_pretrained(os.path.join(folder, sub))
    return {sub: sum(p.numel() for p in model.parameters()) for sub, model in components}


# ---------------------------------------------------------------------------------------------
# Arguments and the list of configurations
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.path.join(HERE, "tiny_models", "sd15"), help="pipeline of the T/K sweep")
    parser.add_argument("--resolution", type=int, default=64, help="px (full size: the paper's)")
    parser.add_argument("--train_batch_size", type=int, default=2, help="B")
    parser.add_argument("--T", type=int, nargs="+", default=[10, 25, 50],
                        help="sampling steps (full size: the paper's)")
    parser.add_argument("--K", type=int, nargs="+", default=[1, 5, 10],
                        help="trained steps; rows with K > T are left out (full size: the paper's)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddpm", help="(full size: the paper's)")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="CFG (full size: the paper's)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the sweep (full size: the paper's 128)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: no, and bf16 for --full_size on a GPU")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="in the sweep (full size: always, as the paper)")
    parser.add_argument("--checkpointing_granularity", choices=["call", "block", "both"], default="call",
                        help="the scripts' --checkpointing_granularity, with --gradient_checkpointing")
    parser.add_argument("--checkpointing", action="store_true",
                        help="its own section: memory per trained step (next to the floor, one step's input) and "
                             "time of every checkpointing granularity and none, full backprop against T and one "
                             "trained call, tiny SD1.5 at 128 px")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=None,
                        help="CPU: glibc's M_MMAP_THRESHOLD (bytes) for the measured processes, so that freed large "
                             "tensors go back to the system and the resident set follows live memory instead of heap "
                             "fragmentation (costs a page fault per large allocation); default: glibc's own, and "
                             "65536 for --checkpointing")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed iterations per configuration; the median is reported (default 3; --dpo 10, "
                             "--spo 5 on the tiny models)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--part_repeats", type=int, default=5, help="timed calls per part; the median is reported")
    parser.add_argument("--num_threads", type=int, default=None,
                        help="torch CPU threads (default on CPU: 1, which keeps ratios stable when other processes "
                             "share the cores; several OpenMP threads on busy cores slow down by up to 10x)")
    parser.add_argument("--full_size", choices=sorted(FULL_SIZE), default=None,
                        help="random-weight full-size model at the paper's DRTune settings (needs a GPU)")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="with --full_size on CPU: a smoke at 64 px, one iteration of DRTune and full backprop "
                             "with T=1, K=1 (prints, writes nothing)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these labels of METHODS / FULL_BACKPROP, e.g. DRTune 'full backprop' (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="32 px, T in (2, 4), K in (1, 2), 2 iterations, no warm-up: a seconds-long smoke")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md and bench_drtune.png (default: this repo; --quick and the CPU "
                             "smoke write files only when it is given)")
    mode = parser.add_argument_group("--fig7 and --table1 (each writes its own section of BENCHMARKS.md)")
    mode.add_argument("--fig7", action="store_true",
                      help="Fig. 7: norm of the LoRA gradient of the first backward at the base model against K, "
                           "DRaFT-K with and without --stop_grad_unet_input (symmetry reward, demo settings)")
    mode.add_argument("--fig7_T", type=int, default=20, help="sampling steps T of --fig7")
    mode.add_argument("--fig7_K", type=int, nargs="+", default=[1, 2, 5, 10, 15, 20], help="K of --fig7 (<= T)")
    mode.add_argument("--fig7_batches", type=int, default=4,
                      help="batches (seeded prompt and noise draws) per K; the median norm is reported")
    mode.add_argument("--fig7_batch_size", type=int, default=2, help="B of --fig7")
    mode.add_argument("--table1", action="store_true",
                      help="miniature Table 1: each method's main() (--preset demo) in a fresh one-thread process "
                           "for the same CPU-time budget, final reward on held-out prompts")
    mode.add_argument("--budget", type=float, default=20.0,
                      help="CPU seconds of training per --table1 run (max_train_steps = budget / probed s per step)")
    mode.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of --table1")
    mode.add_argument("--rewards", nargs="+", default=["symmetry", "compressibility"], help="rewards of --table1")
    mode.add_argument("--jobs", type=int, default=2, help="--fig7 / --table1 processes run in parallel")
    pref = parser.add_argument_group("--dpo and --spo (each writes its own section; with --full_size, a section of its "
                                     "own per model)")
    pref.add_argument("--dpo", action="store_true",
                      help="offline Diffusion-DPO (dpo.py): seconds per step and peak memory against the batch of "
                           "pairs, tiny SD1.5 and SDXL")
    pref.add_argument("--spo", action="store_true",
                      help="SPO (spo.py): seconds per trajectory and per training step, peak memory of sampling and "
                           "of training, against the batch of prompts, tiny SD1.5 (k=4) and SDXL (k=2, 3 inner steps)")
    pref.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                      help="B of --dpo / --spo (default: DPO 1 2 4 8, SPO 1 2 4; --quick 1 2)")
    peers = parser.add_argument_group("--peers (its own section): side by side with TRL's AlignPropTrainer and "
                                      "diffusers' train_diffusion_dpo.py")
    peers.add_argument("--peers", action="store_true",
                       help="time and peak memory per update of alignprop.py and dpo.py next to the peers, each "
                            "side with its own training loop, alternating repetitions, ratios from one run")
    peers.add_argument("--peer_python", default=sys.executable,
                       help="the interpreter with the peers installed (trl==0.23.1; wandb and torchvision for the "
                            "DPO script) and this repo's requirements; both sides run on it")
    peers.add_argument("--peer_dpo_script", default=None,
                       help="path of diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py "
                            "(outside this repo); without it the DPO comparison is skipped")
    peers.add_argument("--peer_settings", nargs="+", default=None, choices=[s[0] for s in PEER_SETTINGS],
                       help="only these settings (default: all)")
    peers.add_argument("--repeats", type=int, default=7, help="--peers: repetitions of each side, alternating")
    peers.add_argument("--peer_iters", type=int, default=None,
                       help="--peers: timed updates per run (default: AlignProp 3, DPO 20)")
    args = parser.parse_args(argv)
    if sum([args.fig7, args.table1, args.dpo, args.spo, args.peers, args.checkpointing]) > 1:
        parser.error("--fig7, --table1, --dpo, --spo, --peers and --checkpointing are separate runs: pass one of them")
    if args.checkpointing and args.full_size:
        parser.error("--checkpointing runs on the tiny model; on a GPU, --full_size with --checkpointing_granularity")
    if (args.fig7 or args.table1) and args.full_size:
        parser.error("--fig7 and --table1 run on the tiny model only: drop --full_size")
    args.method = "dpo" if args.dpo else "spo" if args.spo else None
    args.command = " ".join(["python bench.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.smoke = args.full_size is not None and args.device == "cpu"
    if args.iters is None:  # a tiny DPO step takes a tenth of a second: more of them for a steady median
        args.iters = {"dpo": 10, "spo": 5}.get(args.method, 3) if args.full_size is None else 3
    if args.quick and args.fig7:
        args.resolution, args.fig7_T, args.fig7_K, args.fig7_batches = 32, 4, [1, 2, 4], 1
    elif args.quick and args.table1:
        args.resolution, args.budget, args.seeds, args.rewards = 32, 0.5, [0], ["symmetry"]
    elif args.quick and args.checkpointing:
        args.resolution, args.T, args.iters, args.warmup = 32, [2, 4], 1, 0
    elif args.checkpointing and "--resolution" not in (sys.argv if argv is None else argv):
        args.resolution, args.T = 128, [5, 10, 20]
    elif args.quick:
        args.resolution, args.T, args.K, args.iters, args.warmup, args.part_repeats = 32, [2, 4], [1, 2], 2, 0, 1
    if args.smoke:  # one iteration of one step: the point is building, saving and loading the full-size model
        args.T, args.K, args.iters, args.warmup, args.part_repeats = [1], [1], 1, 0, 1
        args.methods = args.methods or ["DRTune", "full backprop"]
    elif args.full_size:
        args.T, args.K = [FULL_SIZE[args.full_size]["T"]], [FULL_SIZE[args.full_size]["K"]]
    if args.num_threads is None and args.device == "cpu":
        args.num_threads = 1
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.full_size and not args.smoke else "no"
    if args.malloc_mmap_threshold is None and args.checkpointing and args.device == "cpu":
        args.malloc_mmap_threshold = 65536
    if args.output_dir is None and not (args.quick or args.smoke):
        args.output_dir = HERE
    return args


def base_argv(args, T, model_folder):
    """Flags every configuration shares: the sweep's, or the paper's settings with a local random-weight model."""
    common = ["--num_inference_steps", str(T), "--mixed_precision", args.mixed_precision, "--reward", "symmetry",
              "--report_to", "none", "--seed", "0"]
    if args.full_size is None:
        return common + ["--pretrained_model_name_or_path", args.model, "--resolution", str(args.resolution),
                         "--train_batch_size", str(args.train_batch_size), "--sampler", args.sampler,
                         "--guidance_scale", str(args.guidance_scale), "--rank", str(args.rank)] + \
            (["--gradient_checkpointing", "--checkpointing_granularity", args.checkpointing_granularity]
             if args.gradient_checkpointing else [])
    batch = 1 if args.smoke else FULL_SIZE[args.full_size]["batch"]
    argv = common + ["--pretrained_model_name_or_path", model_folder, "--train_batch_size", str(batch), "--rank", "128",
                     "--gradient_checkpointing", "--checkpointing_granularity", args.checkpointing_granularity] + \
        FULL_SIZE[args.full_size]["flags"]
    if args.full_size == "sdxl":  # the paper's fp16-safe SDXL VAE has the same architecture: ours, in the weight dtype
        argv += ["--pretrained_vae_model_name_or_path", os.path.join(model_folder, "vae")]
    if args.smoke:
        argv += ["--resolution", "64"]
    return argv


def plan(args, model_folder):
    """Every configuration: (label, module, T, K, argv, loss) for each available method, T and K (K <= T)."""
    jobs = []
    entries = [(i, *entry) for i, entry in enumerate(METHODS) if importlib.util.find_spec(entry[1]) is not None]
    wanted = None if args.methods is None else {m.lower() for m in args.methods}
    for index, label, module, flags in entries + [(-1, *FULL_BACKPROP)]:
        if wanted is not None and label.lower() not in wanted:
            continue
        sweeps_k = any("{K}" in flag for flag in flags)
        for T in args.T:
            for K in (args.K if sweeps_k else [None]):
                if K is not None and K > T:
                    continue
                m = max(1, min(round(0.4 * T), T - (K or 1) + 1))
                argv = base_argv(args, T, model_folder) + [flag.format(T=T, K=K, m=m) for flag in flags]
                jobs.append(dict(entry=index, label=label, module=module, T=T, K=K, argv=argv,
                                 loss="full_backprop" if index == -1 else "algorithm"))
    return jobs


# ---------------------------------------------------------------------------------------------
# Worker: one configuration in a fresh process
# ---------------------------------------------------------------------------------------------


class Skip(Exception):
    """The script refuses this configuration (its flags or its argument checks)."""


def full_backprop_loss(script, models, scheduler, unet, reward_fn, prompts, generator, args):
    """DRaFT-T / naive backprop: every step under gradient, through the UNet inputs, no early stop."""
    cond = script.encode_prompts(models, prompts, args.resolution)
    latents = script.initial_latents(models, args, len(prompts), generator, unet.device)
    x0 = script.rollout(unet, scheduler, cond, latents, generator, args,
                        grad_steps=set(range(args.num_inference_steps)), stop_grad_input=False)
    reward = script.compute_reward(reward_fn, script.decode(models.vae, x0), prompts, args)
    return -reward.mean(), reward, {}


class CountCalls:
    """reward_fn, counting its calls."""

    def __init__(self, fn, counts):
        self.fn, self.counts = fn, counts

    def __call__(self, *args, **kwargs):
        self.counts["reward"] += 1
        return self.fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)


def memory_mb(device, peak=False):
    """CUDA: allocated memory (or its peak since the reset). CPU: resident set VmRSS (or its peak VmHWM)."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2 ** 20
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["VmHWM" if peak else "VmRSS"].split()[0]) / 1024  # kB


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError, AttributeError):  # glibc: give freed heap pages back, so that the resident
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # set (and so the peak after the reset) counts live memory only
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current resident set
        f.write("5")


def worker(job):
    """Run one job in this (fresh) process; returns a dict and never raises."""
    try:
        return dict(status="ok", **measure(job))
    except Skip as e:
        return dict(status="skipped", reason=str(e))
    except torch.OutOfMemoryError:
        return dict(status="oom", reason="out of memory")
    except Exception as e:  # reported in the table; the run goes on with the next configuration
        return dict(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0][:200],
                    traceback=traceback.format_exc())


def prepare(job):
    """What main() of a script does before its loop: its flags parsed and checked (Skip if it refuses them),
    accelerate, the models, LoRA (gradient checkpointing if asked, at the script's granularity), AdamW; and this
    process's clock."""
    from accelerate import Accelerator
    script = importlib.import_module(job["module"])
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = script.parse_args(job["argv"])
        info = script.check_arguments(args)
    except SystemExit:
        message = (stderr.getvalue().strip().splitlines() or ["(no message)"])[-1]
        raise Skip(f"{job['module']}.py rejected the flags: {message}") from None
    except script.UsageError as e:
        raise Skip(f"{job['module']}.py: {e}") from None
    device = torch.device(job["device"])
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    models = script.load_models(args, info, device, weight_dtype)
    params = script.add_lora(models.unet, args)
    if args.gradient_checkpointing:
        script.enable_checkpointing(models.unet, models.vae, args.checkpointing_granularity)
    optimizer = accelerator.prepare(torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon))
    # With one torch thread on CPU, the process's CPU time: other processes on the cores do not inflate it as they do
    # wall-clock time (several times, on a busy 2-core machine). Otherwise wall-clock time, after a CUDA synchronize.
    cpu_time = device.type == "cpu" and torch.get_num_threads() == 1

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.process_time() if cpu_time else time.perf_counter()

    return types.SimpleNamespace(
        script=script, args=args, info=info, device=device, accelerator=accelerator, weight_dtype=weight_dtype,
        models=models, params=params, optimizer=optimizer, clock=clock,
        clock_name="CPU time of the process (one torch thread)" if cpu_time else "wall-clock time")


def measure(job):
    """Build the full-size folder, or time the parts, or time the iterations of one configuration."""
    if job.get("num_threads"):
        torch.set_num_threads(job["num_threads"])
    if job["kind"] == "build":
        return dict(params=write_full_size(job["name"], job["folder"], job["device"]))
    if job["kind"] == "fig7":
        return fig7_grad_norms(job)
    if job["kind"] == "train":
        return train_run(job)
    if job["kind"] in ("dpo", "spo"):
        return (dpo_iterations if job["kind"] == "dpo" else spo_iterations)(job)
    import rewards
    s = prepare(job)
    script, args, device, accelerator, models, params, optimizer, clock = (
        s.script, s.args, s.device, s.accelerator, s.models, s.params, s.optimizer, s.clock)
    counts = collections.Counter()
    reward_fn = CountCalls(rewards.build_reward(args.reward, device=device, dtype=s.weight_dtype,
                                                **s.info["reward_options"]), counts)
    scheduler = script.make_scheduler(args)
    unet, vae = models.unet, models.vae

    in_backward = [False]  # a call checkpoint reruns its call in the backward: part of the grad pass, not counted

    def count_unet(module, inputs):  # inputs[0]: the latents (2B with CFG)
        grad = torch.is_grad_enabled()
        if not in_backward[0]:
            counts["unet_grad_input" if grad and inputs[0].requires_grad else "unet_grad" if grad else "unet_nograd"] += 1

    def count_decode(module, inputs):
        if not in_backward[0]:
            counts["decode_grad" if torch.is_grad_enabled() else "decode_nograd"] += 1

    unet.register_forward_pre_hook(count_unet)
    vae.decoder.register_forward_pre_hook(count_decode)

    if job["kind"] == "parts":
        return dict(clock=s.clock_name, parts=measure_parts(script, args, models, scheduler, unet, reward_fn, params,
                                                            optimizer, accelerator, clock, job["repeats"]))

    # --- iterations: the body of the training loop, one optimizer step each ---
    loss_fn = functools.partial(full_backprop_loss, script) if job["loss"] == "full_backprop" else script.algorithm_loss

    def iteration(step):
        generator = script.step_generator(args, 0, step)
        idx = torch.randint(len(args.train_prompt_list), (args.train_batch_size,), generator=generator)
        prompts = [args.train_prompt_list[i] for i in idx]
        with accelerator.autocast():
            loss, reward, extra = loss_fn(models, scheduler, unet, reward_fn, prompts, generator, args)
        in_backward[0] = True
        accelerator.backward(loss)
        in_backward[0] = False
        accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    base = memory_mb(device)
    seconds, per_iteration_counts = [], []
    for step in range(1, job["warmup"] + job["iters"] + 1):
        counts.clear()
        start = clock()
        iteration(step)
        if step > job["warmup"]:
            seconds.append(clock() - start)
            per_iteration_counts.append(dict(counts))
    peak = memory_mb(device, peak=True)
    return dict(seconds=seconds, counts=per_iteration_counts, memory_base_mb=base, memory_peak_mb=peak,
                clock=s.clock_name)


PARTS = {  # name: what is timed (ms per call in the tables)
    "unet_nograd": "UNet pass under no_grad (with CFG: batch 2B)",
    "unet_grad": "UNet forward+backward, input detached",
    "unet_grad_input": "UNet forward+backward, gradient to the input too",
    "decode_grad": "VAE decode forward+backward",
    "decode_nograd": "VAE decode under no_grad",
    "reward": "reward forward+backward",
    "other": "prompt encoding + grad clipping + AdamW step (once per iteration)",
    "prompts": "prompt encoding alone (B prompts through the text encoders; the negative encoded once per run)",
    "prompts_cached": "prompt encoding from the --cache_prompt_embeds cache (no text encoder)",
}


def measure_parts(script, args, models, scheduler, unet, reward_fn, params, optimizer, accelerator, clock, repeats):
    """Median seconds of each part, timed alone, on the tensors an iteration would see."""
    generator = torch.Generator().manual_seed(0)
    prompts = args.train_prompt_list[: args.train_batch_size]
    cond = script.encode_prompts(models, prompts, args.resolution)
    latents = script.initial_latents(models, args, len(prompts), generator, unet.device)  # (B, C, h, w)
    scheduler.set_timesteps(args.num_inference_steps, device=latents.device)
    t = scheduler.timesteps[len(scheduler.timesteps) // 2]

    def timed(fn, before=None):
        seconds = []
        for _ in range(repeats + (repeats > 1)):  # with several calls, the first one warms up
            if before is not None:
                before()
            start = clock()
            fn()
            seconds.append(clock() - start)
        return statistics.median(seconds[-repeats:])

    def unet_pass(grad, through_input=False):
        x = latents.clone().requires_grad_(through_input)
        with torch.set_grad_enabled(grad), accelerator.autocast():
            model_output = script.predict_noise(unet, x, t, cond, args.guidance_scale)
        if grad:
            accelerator.backward(model_output.float().mean())

    def decode(grad):
        x = latents.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), accelerator.autocast():
            images = script.decode(models.vae, x)
        if grad:
            accelerator.backward(images.mean())

    def reward():
        images = torch.rand(len(prompts), 3, args.resolution, args.resolution, device=latents.device,
                            requires_grad=True)
        with accelerator.autocast():
            score = script.compute_reward(reward_fn, images, prompts, args)
        accelerator.backward(-score.mean())

    def other():  # needs gradients to clip and apply: the passes above left some, `before` makes new ones
        script.encode_prompts(models, prompts, args.resolution)
        accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out = dict(unet_nograd=timed(lambda: unet_pass(False)), unet_grad=timed(lambda: unet_pass(True)),
               unet_grad_input=timed(lambda: unet_pass(True, through_input=True)),
               decode_grad=timed(lambda: decode(True)), decode_nograd=timed(lambda: decode(False)),
               reward=timed(reward), other=timed(other, before=lambda: params[0].grad is None and unet_pass(True)),
               prompts=timed(lambda: script.encode_prompts(models, prompts, args.resolution)))
    # last, as it moves the text encoders off the accelerator: what --cache_prompt_embeds saves per iteration, and
    # the accelerator memory it frees (on CPU the encoders stay where they are: 0)
    before = memory_mb(unet.device)
    script.cache_prompt_embeds(models, args.train_prompt_list)
    out.update(prompts_cached=timed(lambda: script.encode_prompts(models, prompts, args.resolution)),
               text_encoders_freed_mb=before - memory_mb(unet.device) if unet.device.type == "cuda" else 0.0)
    return out


def fig7_grad_norms(job):
    """--fig7 worker: the LoRA gradient norm (before clipping) of DRaFT-K's first backward at the base model, for
    each K and batch; the batch b draws its prompts and noise from step_generator(step b + 1), the same for every K."""
    import rewards
    script = importlib.import_module("draft")
    args = script.parse_args(job["argv"])
    info = script.check_arguments(args)
    device = torch.device("cpu")
    models = script.load_models(args, info, device, torch.float32)
    scheduler = script.make_scheduler(args)
    reward_fn = rewards.build_reward(args.reward, device=device, dtype=torch.float32, **info["reward_options"])
    torch.manual_seed(args.seed)  # the same LoRA initialization in every process
    params = script.add_lora(models.unet, args)
    out = []
    for K in job["K"]:
        args.draft_k, args.stop_grad_unet_input = K, job["stop_grad"]
        for b in range(job["batches"]):
            start = time.process_time()
            generator = script.step_generator(args, 0, b + 1)
            idx = torch.randint(len(args.train_prompt_list), (args.train_batch_size,), generator=generator)
            prompts = [args.train_prompt_list[i] for i in idx]
            loss, reward, _ = script.algorithm_loss(models, scheduler, models.unet, reward_fn, prompts, generator, args)
            loss.backward()
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            for p in params:
                p.grad = None
            out.append(dict(K=K, batch=b, grad_norm=float(norm), reward=float(reward.detach().mean()),
                            seconds=time.process_time() - start))
    return dict(norms=out)


def train_run(job):
    """--table1 worker: the script's own main() with job["argv"]; returns its metrics and the CPU time it took.
    The training steps' CPU time is measured between consecutive algorithm_loss calls (evaluation runs only before
    the first and after the last step, since validation_steps = max_train_steps)."""
    script = importlib.import_module(job["module"])
    args = script.parse_args(job["argv"])
    calls, original = [], script.algorithm_loss

    def timed_loss(*a, **k):  # main() looks algorithm_loss up in the module at each call
        calls.append(time.process_time())
        return original(*a, **k)

    script.algorithm_loss = timed_loss
    start = time.process_time()
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "log.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        script.main(args)
    total = time.process_time() - start
    with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    per_step = (calls[-1] - calls[0]) / (len(calls) - 1) if len(calls) > 1 else None
    evals = [r for r in rows if "eval_reward" in r]
    return dict(steps=len(calls), cpu_total=total, cpu_per_step=per_step,
                base_reward=evals[0]["eval_reward"], final_reward=evals[-1]["eval_reward"],
                train_reward_first=rows[1]["reward_mean"] if len(rows) > 1 else None,
                train_reward_last=rows[-1].get("reward_mean"))


def build_full_size(context, args, folder):
    """Write the random-weight full-size pipeline of --full_size into folder; returns its parameter counts."""
    print(f"building random-weight full-size {args.full_size} in {folder} ...", flush=True)
    built = run_in_fresh_process(context, dict(kind="build", name=args.full_size, folder=folder, device=args.device,
                                               num_threads=args.num_threads))
    if built["status"] != "ok":
        sys.exit(f"bench.py: error: building the full-size model failed: {built['reason']}\n"
                 f"{built.get('traceback', '')}")
    extra = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in built["params"].items())
    print(f"parameters: {extra}", flush=True)
    return extra


def run_in_fresh_process(context, job):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(worker, job).result()
        except concurrent.futures.process.BrokenProcessPool:
            return dict(status="failed", reason="the worker process died (out of memory?)")


# ---------------------------------------------------------------------------------------------
# Results: ratios, tables, reading, plot, BENCHMARKS.md
# ---------------------------------------------------------------------------------------------


def summarize(row, parts):
    """Median time, mean call counts, and the median over iterations of time / (sum of counted parts)."""
    if row["status"] != "ok":
        return row
    predicted = [sum(n * parts[k] for k, n in c.items()) + parts["other"] for c in row["counts"]]
    row.update(seconds_median=statistics.median(row["seconds"]), parts_seconds=statistics.median(predicted),
               ratio=statistics.median(s / p for s, p in zip(row["seconds"], predicted)),
               memory_delta_mb=row["memory_peak_mb"] - row["memory_base_mb"],
               passes={k: float(np.mean([c.get(k, 0) for c in row["counts"]])) for k in PARTS if k not in ("other", "prompts", "prompts_cached")})
    return row


def fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def passes_text(p):
    return f"{fmt(p['unet_nograd'])} / {fmt(p['unet_grad'] + p['unet_grad_input'])}"


def results_table(rows, device, gib):
    unit, scale = ("GiB", 2 ** 10) if gib else ("MiB", 1)
    cuda = device == "cuda"
    head = ["method", "T", "K", "UNet passes no-grad / grad", "s / iteration", "parts sum (s)", "ratio",
            f"peak over loaded models ({unit})"] + ([f"peak allocated ({unit})"] if cuda else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k = "—" if r["K"] is None else str(r["K"])
        if r["status"] != "ok":
            reason = r["reason"].replace("|", "/")  # a table cell
            cells = [r["label"], str(r["T"]), k, "", f"{r['status']}: {reason}", "", "", ""] + ([""] if cuda else [])
        else:
            cells = [r["label"], str(r["T"]), k, passes_text(r["passes"]), fmt(r["seconds_median"]),
                     fmt(r["parts_seconds"]), f"{r['ratio']:.2f}", fmt(r["memory_delta_mb"] / scale)] + \
                ([fmt(r["memory_peak_mb"] / scale)] if cuda else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parts_table(parts):
    lines = ["| part | ms per call |", "|---|---|"]
    lines += [f"| {PARTS[k]} | {fmt(1000 * parts[k])} |" for k in PARTS if k in parts]
    if parts.get("text_encoders_freed_mb"):
        lines += ["", f"--cache_prompt_embeds frees {fmt(parts['text_encoders_freed_mb'] / 2 ** 10)} GiB of "
                      f"accelerator memory (the text encoders moved to the CPU)."]
    return "\n".join(lines)


def slope(rows, x, y, intercept=False):
    """Least-squares slope (and intercept) of y against x over rows (None with fewer than two distinct x)."""
    xs, ys = [r[x] for r in rows], [y(r) for r in rows]
    if len(set(xs)) < 2:
        return None
    fit = [float(v) for v in np.polyfit(xs, ys, 1)]
    return fit if intercept else fit[0]


def reading(rows, parts, floor=None):
    """A few sentences, each computed from this run's numbers."""
    ok = [r for r in rows if r["status"] == "ok"]
    drtune = {K: [r for r in ok if r["entry"] == 0 and r["K"] == K]
              for K in sorted({r["K"] for r in ok if r["entry"] == 0})}
    full = [r for r in ok if r["entry"] == -1]
    ms = lambda r: 1000 * r["seconds_median"]  # noqa: E731
    mib = lambda r: r["memory_delta_mb"]  # noqa: E731
    out = []
    time_slopes = {K: slope(g, "T", ms) for K, g in drtune.items()}
    if all(v is not None for v in time_slopes.values()) and full and slope(full, "T", ms) is not None:
        out.append("Time per extra sampling step (slope over T): DRTune " +
                   ", ".join(f"K={K}: {fmt(v)} ms" for K, v in time_slopes.items()) +
                   f", against {fmt(1000 * parts['unet_nograd'])} ms for one no-grad UNet pass; full backprop "
                   f"{fmt(slope(full, 'T', ms))} ms, against {fmt(1000 * parts['unet_grad_input'])} ms for one "
                   f"forward+backward through the input. DRTune pays for T through no-grad passes only (the pass "
                   f"counts: T - K no-grad, K grad).")
        memory_slopes = {K: slope(g, "T", mib) for K, g in drtune.items()}
        full_memory = slope(full, "T", mib)
        largest = max(abs(v) for v in memory_slopes.values())
        flat = " (flat next to full backprop)" if full_memory > 0 and largest < 0.1 * full_memory else ""
        out.append("Peak memory per extra sampling step: DRTune " +
                   ", ".join(f"K={K}: {v:+.2f} MiB" for K, v in memory_slopes.items()) + flat +
                   f"; full backprop {full_memory:+.2f} MiB per trained step" +
                   ("" if floor is None else f" (the floor, one step's input latents: {floor:.4f} MiB)") + ".")
    T_max = max((r["T"] for r in ok if r["entry"] == 0), default=None)
    at_T = [r for r in ok if r["entry"] == 0 and r["T"] == T_max]
    if len({r["K"] for r in at_T}) > 1:
        per_k, held = slope(at_T, "K", mib, intercept=True)
        out.append(f"At T={T_max}, each extra trained step adds {fmt(slope(at_T, 'K', ms))} ms (one grad pass minus "
                   f"one no-grad pass: {fmt(1000 * (parts['unet_grad'] - parts['unet_nograd']))} ms) and "
                   f"{per_k:+.2f} MiB of peak memory, on top of {fmt(held)} MiB that any iteration holds (decode and "
                   f"reward activations, LoRA gradients, AdamW state, allocator slack).")
        f = next((r for r in full if r["T"] == T_max), None)
        for r in at_T:
            if f is not None and r["K"] == sorted(drtune)[len(drtune) // 2]:
                out.append(f"At T={T_max}, K={r['K']}: DRTune takes {fmt(r['seconds_median'])} s and {fmt(mib(r))} MiB "
                           f"per iteration; full backprop {fmt(f['seconds_median'])} s and {fmt(mib(f))} MiB, "
                           f"{f['seconds_median'] / r['seconds_median']:.1f}x the time and "
                           f"{mib(f) / max(mib(r), 1e-9):.1f}x the memory.")
    if "prompts_cached" in parts:
        out.append(f"Prompt encoding: {fmt(1000 * parts['prompts'])} ms per iteration through the text encoders, "
                   f"{fmt(1000 * parts['prompts_cached'])} ms from the --cache_prompt_embeds cache.")
    early = {(r["T"], r["K"]): r for r in ok if r["entry"] == 1}
    pairs = [(early[r["T"], r["K"]], r) for g in drtune.values() for r in g if (r["T"], r["K"]) in early]
    if pairs:
        share = statistics.mean(e["seconds_median"] / r["seconds_median"] for e, r in pairs)
        out.append(f"Early stop (t_min drawn in [1, 0.4 T]) takes {100 * share:.0f}% of the t_min = 1 time on average "
                   f"over the {len(pairs)} (T, K) pairs.")
    ratios = [r["ratio"] for r in ok]
    if ratios:
        out.append(f"Iteration / sum of its parts: {min(ratios):.2f} to {max(ratios):.2f} (median "
                   f"{statistics.median(ratios):.2f}). Above 1 is work outside the parts (sampler step arithmetic, "
                   f"noise draws, Python); below 1, parts timed alone cost more than inside the loop (cold caches, "
                   f"noise).")
    return "\n".join(f"- {s}" for s in out)


def plot(rows, path, clock):
    """bench_drtune.png: time and memory against T, DRTune (t_min = 1) for each K and full backprop."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r["status"] == "ok" and r["entry"] in (0, -1)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, K in enumerate(sorted({r["K"] for r in ok if r["entry"] == 0}) + [None]):
        group = sorted((r for r in ok if r["K"] == K), key=lambda r: r["T"])
        style = (dict(color="black", lw=2, label="full backprop") if K is None
                 else dict(color=f"C{i}", label=f"DRTune K={K}"))
        Ts = [r["T"] for r in group]
        axes[0].plot(Ts, [r["seconds_median"] for r in group], marker="o", **style)
        axes[1].plot(Ts, [r["memory_delta_mb"] for r in group], marker="o", **style)
    axes[0].set_ylabel(f"seconds per iteration (median, {'CPU' if 'CPU' in clock else 'wall-clock'} time)")
    axes[1].set_ylabel("peak memory over loaded models (MiB)")
    for ax in axes:
        ax.set_xlabel("T (sampling steps)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine(args):
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    import diffusers
    import transformers
    threads = torch.get_num_threads() if args.num_threads is None else args.num_threads
    return (f"{name}, {os.cpu_count()} CPU cores, torch on {threads} thread{'s' * (threads > 1)}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, transformers {transformers.__version__}")


HEADER = """# Benchmarks

Generated by `bench.py`: do not edit by hand. Each mode replaces its own section below and leaves the others.

- **One iteration** = what the training loop does per optimizer step for a batch of B prompts: `algorithm_loss`,
  backward, gradient clipping and the AdamW step on the LoRA weights. Warm-up iterations are excluded; the
  median of N is reported. Each configuration runs in a fresh process.
- **DRTune** rows use t_min = 1 (`--early_stop_max 1`): all T steps run, T - K of them under no_grad, K with
  gradient. **DRTune, early stop** rows draw t_min in [1, 0.4 T] as training does, from the seeded per-step
  generator (the same draws every run).
- **Full backprop** (DRaFT-T, naive backprop): every step under gradient, through the UNet inputs, no early stop;
  the same decode, reward and backward.
- **Other methods** (DRaFT-K, DRaFT-LV, ReFL, AlignProp, when their scripts exist) run their own
  `algorithm_loss` with the flags of `METHODS` in bench.py; their random draws (stop step, truncation) come from
  the same seeded per-step generator.
- **Parts** are timed alone; each iteration counts its UNet / decode / reward calls, and
  **ratio** = iteration time / sum of (count x part time): close to 1 means no hidden overhead.
- **Memory**: on CUDA, `torch.cuda.max_memory_allocated` (total, and above the loaded models); on CPU, the
  process's peak resident set (VmHWM, reset after loading, freed heap pages first given back with malloc_trim)
  minus its resident set with models, LoRA and optimizer loaded.
- **Time**: wall-clock on a GPU; on CPU with one torch thread (the default), the process's CPU time, which other
  processes sharing the cores do not inflate. **CPU figures are for ratios only**; absolute times and memory
  that count come from a GPU.
- **Fig. 7** (`--fig7`): the LoRA gradient norm (before clipping) of DRaFT-K's first backward at the base model
  against K, with and without stop-gradient on the UNet input (draft.py's `--stop_grad_unet_input`).
- **Table 1** (`--table1`): every method trained by its script's own `main()` (`--preset demo`) for the same CPU
  budget per run (max_train_steps from a probed CPU time per step), final reward on held-out prompts, several
  seeds. Sizes are scaled down to a shared 2-core CPU: see each section.
- **DPO** (`--dpo`) and **SPO** (`--spo`): one training step of dpo.py (offline, pairs from a parquet) and of
  spo.py (sampling the pairs, then training on them) against the batch size, timed in parts; each adds a section
  of its own for a full-size model with `--full_size`.
- **Peers** (`--peers`): alignprop.py and dpo.py next to TRL's AlignPropTrainer and diffusers'
  `train_diffusion_dpo.py`, each with its own training loop in fresh processes, alternating; ratios ours / peer.
- **Checkpointing** (`--checkpointing`): the peak memory per trained step of a backprop through the chain under
  each `--checkpointing_granularity` (and none), next to the floor: one step's input latents.

"""
SECTIONS = ["peers", "checkpointing", "tiny", "full_size_sd15", "full_size_sdxl", "fig7", "table1", "dpo", "spo"]
PLACEHOLDERS = {"fig7": "## Fig. 7 on the tiny model\n\nNot measured yet: run `python bench.py --fig7`.\n",
                "checkpointing": "## Gradient checkpointing granularities\n\nNot measured yet: run `python bench.py "
                                 "--checkpointing`.\n",
                "peers": "## Side by side with the public implementations\n\nNot measured yet: run `python bench.py "
                         "--peers` (see its --help).\n",
                "dpo": "## Offline Diffusion-DPO\n\nNot measured yet: run `python bench.py --dpo`.\n",
                "spo": "## SPO\n\nNot measured yet: run `python bench.py --spo`.\n",
                "table1": "## Miniature Table 1\n\nNot measured yet: run `python bench.py --table1`.\n",
                **{f"full_size_{name}": f"## Full-size {spec['title']}, random weights\n\nNot measured yet: it needs a "
                f"GPU. Run `python bench.py --full_size {name}` on one; it replaces this section.\n"
                for name, spec in FULL_SIZE.items()}}


def write_section(path, key, body):
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    sections = {m.group(1): m.group(2) for m in re.finditer(r"<!-- begin (\w+) -->\n(.*?)<!-- end \1 -->", old, re.S)}
    sections[key] = body
    keys = SECTIONS + [k for k in sections if k not in SECTIONS]  # e.g. dpo_full_size_sdxl, once measured
    text = HEADER + "".join(f"<!-- begin {k} -->\n{sections.get(k, PLACEHOLDERS.get(k, ''))}<!-- end {k} -->\n\n"
                            for k in keys)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n")


def section(args, rows, parts, extra, seconds):
    if args.full_size:
        spec = FULL_SIZE[args.full_size]
        title = f"## Full-size {spec['title']}, random weights, the paper's settings"
        settings = (f"The paper's settings (`{' '.join(spec['flags'])}`, T={spec['T']}, K={spec['K']}) on a "
                    f"random-weight model built from the configs in bench.py ({extra}), batch {spec['batch']}, "
                    f"{args.mixed_precision} frozen weights, "
                    f"fp32 LoRA rank 128, gradient checkpointing. Reward: symmetry (no weights); the paper's reward "
                    f"models add their own memory (HPS v2.1 is a ViT-H-14, about 1 B parameters: about 2 GiB in "
                    f"bf16 plus the activations of its backward at 224 px).")
    else:
        title = "## Tiny model: DRTune against T and K, next to full backprop" + (
            f" (--gradient_checkpointing, granularity {args.checkpointing_granularity})" if args.gradient_checkpointing
            else "")
        settings = (f"`{os.path.relpath(args.model, HERE)}`, {args.resolution} px, batch {args.train_batch_size}, "
                    f"{args.sampler}, CFG {args.guidance_scale}, symmetry reward, LoRA rank {args.rank}, "
                    f"mixed precision {args.mixed_precision}, gradient checkpointing "
                    f"{'on' if args.gradient_checkpointing else 'off'}; {args.warmup} warm-up + median of {args.iters} "
                    f"iterations; parts: median of {args.part_repeats}.")
    load = os.getloadavg()
    text = [title, "", f"Command: `{args.command}`  ", f"Machine: {machine(args)}  ",
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; the whole run took "
            f"{seconds / 60:.1f} min; load average at the end {load[0]:.1f} (other processes share the CPU when it "
            f"exceeds the cores); times are {args.clock}", "", settings, ""]
    if args.device == "cpu":
        text += ["**CPU figures: read the ratios, not the absolute times.**", ""]
    text += ["Parts:", "", parts_table(parts), "", "Iterations:", "",
             results_table(rows, args.device, args.full_size), ""]
    if args.full_size and not args.smoke:
        goal, spec = [r for r in rows if r["status"] == "ok" and r["entry"] == 0], FULL_SIZE[args.full_size]
        if goal:
            gib = goal[0]["memory_peak_mb"] / 2 ** 10
            text += [f"Goal: {spec['title']}, T={spec['T']}, K={spec['K']}, batch {spec['batch']} under "
                     f"{spec['goal_gib']} GiB. DRTune peaks at {gib:.1f} GiB allocated: "
                     f"{'under' if gib < spec['goal_gib'] else 'over'} the goal.", ""]
    if not args.full_size:
        floor = latent_floor_mib(args.model, args.resolution, args.train_batch_size)
        text += ["Reading (computed from the numbers above):", "", reading(rows, parts, floor), ""]
        if not args.gradient_checkpointing:
            text += ["![time and memory against T](bench_drtune.png)", ""]
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------
# --fig7: LoRA gradient norm against K, with and without stop-gradient on the UNet input
# ---------------------------------------------------------------------------------------------


def fork_context(scripts):
    """A forkserver context whose server has imported the libraries and the scripts: fresh, cheap processes."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "numpy", "accelerate", "peft", "rewards",
                                    *[m for m in dict.fromkeys(scripts) if importlib.util.find_spec(m)],
                                    "diffusers.models.unets.unet_2d_condition",
                                    "diffusers.models.autoencoders.autoencoder_kl",
                                    "transformers.models.clip.modeling_clip"])
    return context


def run_parallel(context, jobs, n):
    with concurrent.futures.ThreadPoolExecutor(max(1, n)) as pool:
        return list(pool.map(lambda job: run_in_fresh_process(context, job), jobs))


def fig7_argv(args):
    return ["--preset", "demo", "--pretrained_model_name_or_path", args.model, "--resolution", str(args.resolution),
            "--num_inference_steps", str(args.fig7_T), "--train_batch_size", str(args.fig7_batch_size),
            "--reward", "symmetry", "--seed", "0", "--report_to", "none", "--draft_variant", "k"]


def fig7_rows(results, Ks):
    rows = []
    for K in Ks:
        row = dict(K=K)
        for stop, result in results.items():
            norms = [r["grad_norm"] for r in result["norms"] if r["K"] == K]
            row[stop] = dict(median=statistics.median(norms), min=min(norms), max=max(norms))
        rows.append(row)
    return rows


def fig7_table(rows):
    lines = ["| K | grad norm, no stop-grad: median (min–max) | grad norm, stop-grad: median (min–max) | "
             "no stop-grad / stop-grad |", "|---|---|---|---|"]
    for r in rows:
        a, b = r[False], r[True]
        lines.append(f"| {r['K']} | {a['median']:.3g} ({a['min']:.3g}–{a['max']:.3g}) | {b['median']:.3g} "
                     f"({b['min']:.3g}–{b['max']:.3g}) | {a['median'] / b['median']:.3g} |")
    return "\n".join(lines)


def fig7_reading(rows, T):
    out = []
    first, last = rows[0], rows[-1]
    for stop, name in ((False, "Without stop-gradient"), (True, "With stop-gradient")):
        out.append(f"{name}, the median norm goes from {first[stop]['median']:.3g} at K={first['K']} to "
                   f"{last[stop]['median']:.3g} at K={last['K']} ({last[stop]['median'] / first[stop]['median']:.3g}x).")
    growth = [(a["K"], b["K"], b[False]["median"] / a[False]["median"]) for a, b in zip(rows, rows[1:])]
    steepest = max(growth, key=lambda g: g[2])
    out.append(f"Without stop-gradient the steepest rise between neighbouring K is from K={steepest[0]} to "
               f"K={steepest[1]} ({steepest[2]:.3g}x); the paper (Fig. 7, SD1.5, T=50) sees the norm rise rapidly "
               f"for K >= 15.")
    same = next(b[True]["median"] / a[True]["median"] for a, b in zip(rows, rows[1:]) if b["K"] == steepest[1])
    out.append(f"With stop-gradient the same step (K={steepest[0]} to K={steepest[1]}) rises {same:.3g}x.")
    ratio = last[False]["median"] / last[True]["median"]
    out.append(f"At K={last['K']} (T={T}) the norm without stop-gradient is {ratio:.3g}x the norm with it. K=1 "
               f"is the same computation either way (the one trained call's input carries no gradient).")
    if ratio < 1.5:
        out.append("So here stop-gradient barely changes the norm, and the rise with K is there with it too: it comes "
                   "from the paths that stop-gradient keeps (each trained step's noise prediction reaches x_0 "
                   "linearly through the sampler's coefficients, and the earliest, noisiest steps get the largest "
                   "ones), not from the chain of UNet input Jacobians that it cuts. This disagrees with the paper's "
                   "Fig. 7 (the norm explodes for K >= 15 without stop-gradient and stays low with it). A likely "
                   "reason, not measured here: the tiny random-weight UNet's output depends only weakly on its "
                   "input latents, so the product of its input Jacobians stays small, while a trained SD1.5 UNet's "
                   "does not.")
    else:
        out.append("Stop-gradient removes the extra growth, as in the paper's Fig. 7.")
    return "\n".join(f"- {s}" for s in out)


def fig7_plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    Ks = [r["K"] for r in rows]
    for stop, style in ((False, dict(color="C3", marker="o", label="DRaFT-K, no stop-grad")),
                        (True, dict(color="C0", marker="s", label="DRaFT-K + stop-grad (DRTune eq. 3)"))):
        med = [r[stop]["median"] for r in rows]
        err = [[m - r[stop]["min"] for m, r in zip(med, rows)], [r[stop]["max"] - m for m, r in zip(med, rows)]]
        ax.errorbar(Ks, med, yerr=err, capsize=3, **style)
    ax.set_yscale("log")
    ax.set_xlabel("K (trained sampling steps)")
    ax.set_ylabel("LoRA grad norm before clipping (median, min-max)")
    ax.set_title("Fig. 7 on the tiny model: first backward at the base model")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main_fig7(args):
    started = time.time()
    Ks = [K for K in args.fig7_K if 1 <= K <= args.fig7_T]
    context = fork_context(["draft"])
    jobs = [dict(kind="fig7", argv=fig7_argv(args), K=Ks, stop_grad=stop, batches=args.fig7_batches,
                 num_threads=args.num_threads) for stop in (False, True)]
    out = run_parallel(context, jobs, args.jobs)
    for result in out:
        if result["status"] != "ok":
            sys.exit(f"bench.py: error: --fig7 worker: {result['reason']}\n{result.get('traceback', '')}")
    results = {job["stop_grad"]: result for job, result in zip(jobs, out)}
    rows = fig7_rows(results, Ks)
    cpu = sum(r["seconds"] for result in out for r in result["norms"])
    seconds = time.time() - started
    table, text = fig7_table(rows), fig7_reading(rows, args.fig7_T)
    print(table + "\n\n" + text + f"\n\nbenchmark time: {seconds:.0f} s (backward passes: {cpu:.0f} CPU s)")
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        fig7_plot(rows, os.path.join(args.output_dir, "bench_fig7.png"))
        settings = (f"DRaFT-K (`draft.py`, `--preset demo`: `{os.path.relpath(args.model, HERE)}`, "
                    f"{args.resolution} px, DDPM, CFG 7.5, LoRA rank 8, fp32) with T={args.fig7_T}, batch "
                    f"{args.fig7_batch_size}, symmetry reward; for each K, {args.fig7_batches} batches (prompts and "
                    f"noise from the seeded per-step generator, the same batches for every K and both variants). "
                    f"Norm: the L2 norm over all LoRA gradients after `algorithm_loss` + backward, before clipping, "
                    f"at the base model (LoRA initialized with seed 0; its B matrices are zero, so only they get "
                    f"gradient). Only the first backward is measured, not later training steps. Scaled down from the "
                    f"paper (SD1.5, T=50, batch 32, K up to 50, a trained run) to fit a few CPU-minutes: "
                    f"{cpu:.0f} CPU s of backward passes.")
        body = "\n".join([
            "## Fig. 7 on the tiny model: LoRA gradient norm against K, with and without stop-gradient", "",
            *header_lines(args, seconds, "CPU time of each one-thread process"), "", settings, "", table, "",
            "Reading (computed from the numbers above):", "", text, "", "![grad norm against K](bench_fig7.png)", ""])
        write_section(os.path.join(args.output_dir, "BENCHMARKS.md"), "fig7", body)
        print(f"wrote {os.path.join(args.output_dir, 'BENCHMARKS.md')}")
    return rows


def header_lines(args, seconds, clock):
    load = os.getloadavg()
    return [f"Command: `{args.command}`  ", f"Machine: {machine(args)}  ",
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; the whole run took "
            f"{seconds / 60:.1f} min; load average at the end {load[0]:.1f}; times are {clock}"]


# ---------------------------------------------------------------------------------------------
# --table1: every method's main() for the same CPU budget, final reward on held-out prompts
# ---------------------------------------------------------------------------------------------

# (label, script, flags on top of its --preset demo). The demo presets are the unified settings: tiny SD1.5, 64 px,
# DDPM T=20, CFG 7.5, batch 4, lr 3e-3, clip 1.0, LoRA rank 8; DRTune K=2, m=8; ReFL stop range 10; DRaFT K=2.
TABLE1_METHODS = [
    ("DRTune", "drtune", []),
    ("ReFL", "refl", []),
    ("DRaFT-LV", "draft", ["--draft_variant", "lv"]),
    ("DRaFT-K", "draft", ["--draft_variant", "k"]),
    ("AlignProp", "alignprop", []),
]
# Held out: none of these is in the scripts' DEFAULT_PROMPTS, the training prompts of the demo presets.
HELD_OUT_PROMPTS = [
    "a wooden cabin in a snowy forest", "a cup of coffee next to an open book", "a sailboat on a calm sea at sunrise",
    "a close-up of a sunflower", "a city street at night in the rain", "a dog running on a beach",
]
# The paper's Table 1 (SD1.5, 2 h on 4 A100): symmetry and compression error, both lower is better.
PAPER_TABLE1 = {"ReFL": (0.7512, 0.0057), "DRaFT-LV": (0.7648, 0.0088), "DRaFT-K": (0.7250, 0.0073),
                "AlignProp": (0.7840, 0.0097), "DRTune": (0.0551, 0.0038)}


def table1_argv(args, flags, reward, seed, prompts_file):
    argv = ["--preset", "demo", *flags, "--pretrained_model_name_or_path", args.model, "--reward", reward,
            "--seed", str(seed), "--report_to", "none", "--eval_prompts", prompts_file]
    if args.quick:  # seconds: 32 px, T=10, batch 2, 2 held-out prompts
        argv += ["--resolution", "32", "--num_inference_steps", "10", "--train_batch_size", "2",
                 "--num_eval_prompts", "2"]
    else:
        argv += ["--num_eval_prompts", str(len(HELD_OUT_PROMPTS))]
    return argv


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values, digits=4):
    m, s = mean_std(values)
    return "—" if m is None else f"{m:.{digits}g} ± {s:.2g}"


def table1_table(runs, probes, args):
    head = ["method", "CPU s / step (probe)", "steps"] + [f"{r}: final eval reward" for r in args.rewards] + \
        [f"{r}: gain over base" for r in args.rewards] + ["training CPU s per run (measured in main())"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r: [x["base_reward"] for x in runs if x["reward"] == r and x["status"] == "ok" and x["method"] ==
                next(m for m, *_ in TABLE1_METHODS if any(y["method"] == m and y["status"] == "ok" for y in runs))]
            for r in args.rewards}
    lines.append("| base model (step 0) | — | 0 | " + " | ".join(pm(base[r]) for r in args.rewards) + " | " +
                 " | ".join("0" for _ in args.rewards) + " | — |")
    for label, *_ in TABLE1_METHODS:
        mine = [x for x in runs if x["method"] == label]
        if not mine:
            continue
        failed = [x for x in mine if x["status"] != "ok"]
        steps = sorted({x["max_train_steps"] for x in mine})
        probe = statistics.mean(p for (m, _), p in probes.items() if m == label)
        cells = [label, fmt(probe), "/".join(map(str, steps))]
        for key in ("final", "gain"):
            for r in args.rewards:
                ok = [x for x in mine if x["reward"] == r and x["status"] == "ok"]
                vals = [x["final_reward"] if key == "final" else x["final_reward"] - x["base_reward"] for x in ok]
                cells.append(pm(vals) + (f" ({len(ok)} of {len(ok) + len([f for f in failed if f['reward'] == r])} "
                                         f"ran)" if failed else ""))
        cells.append(pm([x["cpu_per_step"] * x["steps"] for x in mine if x["status"] == "ok" and x["cpu_per_step"]],
                        3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table1_reading(runs, args):
    out = []
    for r in args.rewards:
        gains = {}
        for label, *_ in TABLE1_METHODS:
            ok = [x for x in runs if x["method"] == label and x["reward"] == r and x["status"] == "ok"]
            if ok:
                gains[label] = mean_std([x["final_reward"] - x["base_reward"] for x in ok])
        if not gains:
            continue
        order = sorted(gains, key=lambda m: -gains[m][0])
        out.append(f"{r}: ranking by mean gain over the base model: " +
                   ", ".join(f"{m} ({gains[m][0]:+.3g} ± {gains[m][1]:.2g})" for m in order) + ".")
        if "DRTune" in gains:
            best, second = order[0], order[1] if len(order) > 1 else None
            if best == "DRTune" and second is not None:
                gap = gains["DRTune"][0] - gains[second][0]
                noise = max(gains["DRTune"][1], gains[second][1])
                out.append(f"{r}: DRTune is first, ahead of {second} by {gap:.3g} "
                           f"({'more' if gap > noise else 'less'} than the larger seed std, {noise:.2g}).")
            else:
                out.append(f"{r}: DRTune is {order.index('DRTune') + 1} of {len(order)}; {best} leads by "
                           f"{gains[best][0] - gains['DRTune'][0]:.3g} over DRTune (seed std of the leader "
                           f"{gains[best][1]:.2g}).")
        paper_index = {"symmetry": 0, "compressibility": 1}.get(r)
        if paper_index is not None:
            paper_order = [m for m in sorted(PAPER_TABLE1, key=lambda m: PAPER_TABLE1[m][paper_index]) if m in gains]
            agree = "agrees" if order[0] == paper_order[0] else "disagrees"
            out.append(f"{r}: the paper's order (Table 1, lower {'symmetry' if paper_index == 0 else 'compression'} "
                       f"error is better): " + ", ".join(paper_order) + f". On the winner this run {agree} with the "
                       f"paper; the full order here is " + ", ".join(order) + ".")
    return "\n".join(f"- {s}" for s in out)


def table1_plot(runs, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(args.rewards), figsize=(5 * len(args.rewards), 4), squeeze=False)
    for ax, r in zip(axes[0], args.rewards):
        labels, means, stds = [], [], []
        for label, *_ in TABLE1_METHODS:
            ok = [x for x in runs if x["method"] == label and x["reward"] == r and x["status"] == "ok"]
            if ok:
                m, s = mean_std([x["final_reward"] for x in ok])
                labels.append(label), means.append(m), stds.append(s)
        base = [x["base_reward"] for x in runs if x["reward"] == r and x["status"] == "ok"]
        ax.bar(labels, means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(labels))])
        if base:
            ax.axhline(statistics.mean(base), color="black", ls="--", label="base model (step 0)")
            ax.legend(loc="lower right")
        lo, hi = min(means + base), max(means + base)
        pad = 0.15 * (hi - lo or abs(hi) or 1)
        ax.set_ylim(lo - pad - max(stds), hi + pad + max(stds))
        ax.set_title(f"{r} (higher is better)")
        ax.set_ylabel("final eval reward, held-out prompts")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"Same CPU budget per run ({args.budget:g} CPU s of training), mean ± std over seeds "
                 f"{', '.join(map(str, args.seeds))}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main_table1(args):
    started = time.time()
    context = fork_context([m for _, m, _ in TABLE1_METHODS])
    methods = [e for e in TABLE1_METHODS if importlib.util.find_spec(e[1]) is not None]
    with tempfile.TemporaryDirectory(prefix="bench-table1-") as folder:
        prompts_file = os.path.join(folder, "held_out.txt")
        with open(prompts_file, "w") as f:
            f.write("\n".join(HELD_OUT_PROMPTS) + "\n")
        # 1. probe: CPU seconds of one training iteration (algorithm_loss, backward, clip, AdamW) per method and reward
        probe_jobs = [dict(kind="iteration", label=label, module=module, loss="algorithm", warmup=0,
                           iters=1 if args.quick else 2, device="cpu", num_threads=args.num_threads, reward=r,
                           argv=table1_argv(args, flags, r, args.seeds[0], prompts_file))
                      for label, module, flags in methods for r in args.rewards]
        probes = {}
        for job, result in zip(probe_jobs, run_parallel(context, probe_jobs, args.jobs)):
            if result["status"] != "ok":
                sys.exit(f"bench.py: error: probing {job['label']} failed: {result['reason']}\n"
                         f"{result.get('traceback', '')}")
            probes[job["label"], job["reward"]] = statistics.median(result["seconds"])
            print(f"probe {job['label']} {job['reward']}: {probes[job['label'], job['reward']]:.2f} CPU s/step",
                  flush=True)
        # 2. the runs: max_train_steps = budget / probed seconds per step; validation only at 0 and at the end
        jobs = []
        for label, module, flags in methods:
            for r in args.rewards:
                steps = max(1, int(args.budget / probes[label, r]))
                for seed in args.seeds:
                    out = os.path.join(folder, f"{module}-{label}-{r}-{seed}".replace(" ", "_"))
                    argv = table1_argv(args, flags, r, seed, prompts_file) + [
                        "--max_train_steps", str(steps), "--validation_steps", str(steps), "--output_dir", out]
                    jobs.append(dict(kind="train", method=label, module=module, reward=r, seed=seed,
                                     max_train_steps=steps, argv=argv, num_threads=args.num_threads))
        runs = []
        for job, result in zip(jobs, run_parallel(context, jobs, args.jobs)):
            run = dict({k: job[k] for k in ("method", "reward", "seed", "max_train_steps")}, **result)
            runs.append(run)
            if run["status"] == "ok":
                print(f"{run['method']} {run['reward']} seed {run['seed']}: {run['steps']} steps, "
                      f"{run['cpu_per_step'] or float('nan'):.2f} CPU s/step in main(), {run['cpu_total']:.0f} CPU s in "
                      f"all; eval reward {run['base_reward']:.4g} -> {run['final_reward']:.4g}", flush=True)
            else:
                print(f"{run['method']} {run['reward']} seed {run['seed']}: {run['status']}: {run['reason']}\n"
                      f"{run.get('traceback', '')}", flush=True)
    seconds = time.time() - started
    table, text = table1_table(runs, probes, args), table1_reading(runs, args)
    per_step = [(x["cpu_per_step"] * x["steps"]) for x in runs if x["status"] == "ok" and x["cpu_per_step"]]
    print("\n" + table + "\n\n" + text + f"\n\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        table1_plot(runs, args, os.path.join(args.output_dir, "bench_table1.png"))
        all_steps = [x["steps"] for x in runs if x["status"] == "ok"] or [0]
        steps_range = f"{min(all_steps)}–{max(all_steps)}"
        used = (f"; the training CPU time measured inside main() (between consecutive `algorithm_loss` calls) came to "
                f"{min(per_step):.0f}–{max(per_step):.0f} CPU s per run" if per_step else "")
        settings = (
            f"Each method's own `main()` with `--preset demo` (the unified settings: "
            f"`{os.path.relpath(args.model, HERE)}`, {'32' if args.quick else '64'} px, DDPM T="
            f"{'10' if args.quick else '20'}, CFG 7.5, batch {'2' if args.quick else '4'}, lr 3e-3, clip 1.0, LoRA "
            f"rank 8, fp32; DRTune K=2, m=8; ReFL stop range 10; DRaFT-K K=2; DRaFT-LV n=2; AlignProp as its "
            f"demo), overriding only the reward, seed, max_train_steps, validation_steps (= max_train_steps: "
            f"evaluation at step 0 and at the end only) and the evaluation prompts. Every run is a fresh one-thread "
            f"process ({args.jobs} at a time). **Budget**: {args.budget:g} CPU s of training per run, enforced by "
            f"a probe, not by a clock inside the run: one short run per method and reward times "
            f"{'1 iteration' if args.quick else '2 iterations'} (process CPU time; first one cold), and "
            f"max_train_steps = floor(budget / seconds per step){used}. Evaluation and loading are outside the "
            f"budget. **Reward**: the script's eval_reward (its reward_fn, higher is better: -symmetry error, "
            f"-compression error) on {2 if args.quick else len(HELD_OUT_PROMPTS)} held-out prompts, not in the "
            f"training list, with the fixed evaluation noise of each seed: "
            f"{'; '.join(HELD_OUT_PROMPTS[:2 if args.quick else None])}. Mean ± std over seeds "
            f"{', '.join(map(str, args.seeds))}; \"gain over base\" is per seed, final minus step 0. Scaled down "
            f"from the paper (SD1.5 at 512 px, T=50, batch 32, 2 h on 4 A100, 400 HPS v2 prompts) to fit a "
            f"45-minute CPU session: a random-weight tiny pipeline, a budget of {args.budget:g} CPU s ({steps_range} "
            f"optimizer steps per run), {len(args.seeds)} seeds.")
        body = "\n".join([
            "## Miniature Table 1: every method for the same CPU budget, held-out prompts", "",
            *header_lines(args, seconds, "CPU time of each one-thread process"), "", settings, "", table, "",
            "Reading (computed from the numbers above):", "", text, "",
            "What this can and cannot say: every run makes only a few to a few dozen optimizer steps of a "
            "random-weight tiny UNet at 64 px, so the table compares early progress per CPU second (how many "
            "updates a method fits in the budget, times how useful each is), not converged rewards, and the step-0 "
            "images have none of the global layout that the paper's symmetry result is about (DRTune trains early "
            "sampling steps, which set the layout in a trained SD1.5; DRaFT-K, DRaFT-LV and ReFL train only late "
            "ones). With 2 seeds and held-out prompts at fixed noise, gaps smaller than the stds are noise. The "
            "paper's Table 1 runs each method 2 h on 4 A100s.", "",
            "![final reward per method](bench_table1.png)", ""])
        write_section(os.path.join(args.output_dir, "BENCHMARKS.md"), "table1", body)
        print(f"wrote {os.path.join(args.output_dir, 'BENCHMARKS.md')}")
    if any(x["status"] != "ok" for x in runs):
        sys.exit(1)
    return runs


# ---------------------------------------------------------------------------------------------
# --dpo, --spo: the preference methods' training step (dpo.py offline, spo.py), tiny or full size
# ---------------------------------------------------------------------------------------------

# (label, tiny pipeline, flags) of each model; the full-size runs take the published settings of dpo.py's and
# spo.py's sd15-paper / sdxl-paper presets that bear on time and memory (LoRA rank, VAE batch, k, inner steps).
PREFERENCE = {
    "dpo": dict(batch_sizes=[1, 2, 4, 8], models=[
        ("SD1.5", "sd15", [], ["--rank", "64"]),
        ("SDXL", "sdxl", [], ["--rank", "64", "--vae_encode_batch_size", "4"])]),
    "spo": dict(batch_sizes=[1, 2, 4], models=[
        ("SD1.5, k=4", "sd15", ["--num_candidates", "4", "--num_inner_steps", "0", "--pair_batch_size", "8"],
         ["--rank", "4"]),
        ("SDXL, k=2, 3 inner steps", "sdxl", ["--num_candidates", "2", "--num_inner_steps", "3",
                                              "--pair_batch_size", "4"], ["--rank", "64"])]),
}


def pairs_parquet(path, n, resolution, seed=0):
    """n Pick-a-Pic rows (jpg_0, jpg_1, label_0, caption) of smooth random JPEGs, 5:4 landscape at the training
    resolution's height (so the data path resizes and crops), label_0 alternating 1, 0 (either side wins)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    rng = np.random.default_rng(seed)

    def jpeg():
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        low.resize((resolution * 5 // 4, resolution), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    prompts = importlib.import_module("dpo").DEFAULT_PROMPTS
    table = pa.table({"jpg_0": pa.array([jpeg() for _ in range(n)], pa.binary()),
                      "jpg_1": pa.array([jpeg() for _ in range(n)], pa.binary()),
                      "label_0": [float(i % 2 == 0) for i in range(n)],
                      "caption": [prompts[i % len(prompts)] for i in range(n)]})
    pq.write_table(table, path)


def dpo_iterations(job):
    """--dpo worker: one offline dpo.py training step as its main() runs it: the next batch of pairs from the
    parquet (decode, resize, crop), the VAE encoding of winners and losers, algorithm_loss (the policy's forward
    with gradient, the reference's, the same UNet with its LoRA off, under no_grad), backward, clipping, AdamW."""
    from diffusers import DDPMScheduler
    s = prepare(job)
    dpo, args, models, accelerator, clock = s.script, s.args, s.models, s.accelerator, s.clock
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    batches = dpo.PairBatches(dpo.open_pairs(args), args, 0, 1)
    rows = []
    models.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    reset_peak_memory(s.device)
    base, out = memory_mb(s.device), []
    for step in range(1, job["warmup"] + job["iters"] + 1):
        rows.clear()
        start = clock()
        batch = batches.next(args.train_batch_size)
        loaded = clock()
        generator = dpo.step_generator(args, 0, step)
        pixels = batch["pixels"].to(s.device)
        latents = dpo.encode_images(models.vae, torch.cat([pixels[:, 0], pixels[:, 1]]), generator,
                                    args.vae_encode_batch_size)
        encoded = clock()
        with accelerator.autocast():
            loss, _ = dpo.algorithm_loss(models, noise_scheduler, models.unet, latents, batch["captions"],
                                         batch["time_ids"], generator, args)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(s.params, args.max_grad_norm)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        end = clock()
        if step > job["warmup"]:
            out.append(dict(data=loaded - start, encode=encoded - loaded, train=end - encoded, total=end - start,
                            unet_rows=sum(rows)))
    return dict(steps=out, clock=s.clock_name, memory_base_mb=base, memory_peak_mb=memory_mb(s.device, peak=True))


def spo_iterations(job):
    """--spo worker: one spo.py training step as its main() runs it on one process: sample_pairs for B prompts
    (no_grad), then spo_loss + backward over all the pairs in chunks of --pair_batch_size, clipping, AdamW. Also
    times a plain DDIM trajectory (the scaffold's rollout, same settings) for comparison, outside the step."""
    import rewards
    s = prepare(job)
    spo, args, models, accelerator, clock, device = s.script, s.args, s.models, s.accelerator, s.clock, s.device
    scheduler = spo.make_scheduler(args)
    reward_fn = rewards.build_reward(args.reward, device=device, dtype=s.weight_dtype, **s.info["reward_options"])
    preference_model = spo.build_preference_model(reward_fn, args)
    rows = []
    models.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    cfg = 2 if args.guidance_scale > 1 else 1  # predict_noise runs the two CFG halves as one batch
    reset_peak_memory(device)
    base, out = memory_mb(device), []
    for step in range(1, job["warmup"] + job["iters"] + 1):
        generator = spo.step_generator(args, 0, step)
        idx = torch.randint(len(args.train_prompt_list), (args.train_batch_size,), generator=generator)
        prompts = [args.train_prompt_list[i] for i in idx]
        rows.clear()
        reset_peak_memory(device)
        start = clock()
        with accelerator.autocast():
            pairs, stats = spo.sample_pairs(models, scheduler, models.unet, preference_model, prompts, generator, args)
        sampled = clock()
        sample_peak, sample_rows = memory_mb(device, peak=True), sum(rows)
        rows.clear()
        reset_peak_memory(device)
        total = len(pairs["timesteps"])
        for chunk in range(0, total, args.pair_batch_size):
            batch = spo.shard(pairs, 0, 1, chunk, chunk + args.pair_batch_size)
            with accelerator.autocast():
                loss, _, _ = spo.spo_loss(models, scheduler, models.unet, batch, args)
            accelerator.backward(loss.sum() / total)
        accelerator.clip_grad_norm_(s.params, args.max_grad_norm)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        end = clock()
        train_peak, train_rows = memory_mb(device, peak=True), sum(rows)
        with torch.no_grad(), accelerator.autocast():  # a plain DDIM trajectory of the same B prompts
            plain_start = clock()
            cond = spo.encode_prompts(models, prompts, args.resolution)
            spo.rollout(models.unet, scheduler, cond, spo.initial_latents(models, args, len(prompts), generator,
                                                                            device), generator, args)
            plain = clock() - plain_start
        if step > job["warmup"]:
            out.append(dict(sample=sampled - start, train=end - sampled, total=end - start, plain=plain, pairs=total,
                            comparisons=len(stats["gaps"]), sample_rows=sample_rows / cfg, train_rows=train_rows / cfg,
                            sample_peak_mb=sample_peak, train_peak_mb=train_peak))
    return dict(steps=out, clock=s.clock_name, memory_base_mb=base)


def preference_plan(args, folder):
    """Every --dpo / --spo configuration: dict(label, B, argv) per model and batch size."""
    spec = PREFERENCE[args.method]
    if args.full_size:
        models = [m for m in spec["models"] if m[1] == args.full_size]
        paper = FULL_SIZE[args.full_size]["flags"]
        common = ["--pretrained_model_name_or_path", folder, "--gradient_checkpointing", "--resolution",
                  "64" if args.smoke else paper[paper.index("--resolution") + 1]]
        if args.full_size == "sdxl":  # as in bench's DRTune runs: the fp16-fix VAE's architecture, our weights
            common += ["--pretrained_vae_model_name_or_path", os.path.join(folder, "vae")]
    else:
        models = spec["models"]
        common = ["--resolution", str(args.resolution), "--rank", str(args.rank)] + \
            (["--gradient_checkpointing"] if args.gradient_checkpointing else [])
    common += ["--mixed_precision", args.mixed_precision, "--report_to", "none", "--seed", "0", "--reward", "symmetry"]
    if args.method == "dpo":
        common += ["--dataset_name", os.path.join(folder, "pairs.parquet")]
    else:  # the paper's sampler; threshold 0 keeps every comparison: the most pairs, the longest training step
        T, W = (3, 1) if args.smoke else (6, 2) if args.quick else (20, 4)
        common += ["--sampler", "ddim", "--eta", "1", "--guidance_scale", "5", "--num_inference_steps", str(T),
                   "--warm_steps", str(W), "--pair_threshold", "0"]
    batch_sizes = args.batch_sizes or ([1] if args.smoke else [1, 2] if args.quick else spec["batch_sizes"])
    jobs = []
    for label, name, flags, full_flags in models:
        model = [] if args.full_size else ["--pretrained_model_name_or_path", os.path.join(HERE, "tiny_models", name)]
        for B in batch_sizes:
            argv = common + model + flags + (full_flags if args.full_size else []) + ["--train_batch_size", str(B)]
            shape = None if args.method == "dpo" else (T, W, int(flags[flags.index("--num_candidates") + 1]))
            jobs.append(dict(label=label, B=B, module=args.method, argv=argv, shape=shape,
                             resolution=int(common[common.index("--resolution") + 1])))
    return jobs


def preference_summary(row):
    """The median step (by total time; the lower one of an even count), with all its parts: they add up."""
    if row["status"] != "ok":
        return row
    totals = [step["total"] for step in row["steps"]]
    row.update(row["steps"][totals.index(statistics.median_low(totals))])
    return row


def batch_table(head, rows, cells):
    """A --dpo / --spo table: the label, B, then cells(row); a row that did not run shows why."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rest = (cells(r) if r["status"] == "ok"
                else [f"{r['status']}: {r['reason']}".replace("|", "/")] + [""] * (len(head) - 3))
        lines.append("| " + " | ".join([r["label"], str(r["B"]), *rest]) + " |")
    return "\n".join(lines)


def dpo_table(rows, gib):
    unit, scale = ("GiB", 2 ** 10) if gib else ("MiB", 1)
    head = ["model", "B (pairs)", "s / step", "s / pair", "data (s)", "VAE encode (s)", "loss + backward + AdamW (s)",
            "UNet rows / step", f"peak over loaded models ({unit})"]
    return batch_table(head, rows, lambda r: [
        fmt(r["total"]), fmt(r["total"] / r["B"]), fmt(r["data"]), fmt(r["encode"]), fmt(r["train"]),
        f"{r['unet_rows']:.0f}", fmt((r["memory_peak_mb"] - r["memory_base_mb"]) / scale)])


def dpo_reading(rows):
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        ok = [r for r in rows if r["label"] == label and r["status"] == "ok"]
        fit = slope(ok, "B", lambda r: r["total"], intercept=True)
        if fit is None:
            continue
        memory = slope(ok, "B", lambda r: r["memory_peak_mb"] - r["memory_base_mb"])
        largest = max(ok, key=lambda r: r["B"])
        share = {k: largest[k] / largest["total"] for k in ("data", "encode", "train")}
        out.append(f"{label}: a step costs about {fmt(fit[1])} s fixed plus {fmt(fit[0])} s per pair (least "
                   f"squares over B = {', '.join(str(r['B']) for r in ok)}), so B={largest['B']} takes "
                   f"{fmt(ok[0]['total'] / ok[0]['B'] / (largest['total'] / largest['B']))}x less time per pair than "
                   f"B={ok[0]['B']}; peak memory grows {memory:+.1f} MiB per pair. At B={largest['B']}: data "
                   f"{100 * share['data']:.0f}%, VAE encoding {100 * share['encode']:.0f}%, loss, backward and update "
                   f"{100 * share['train']:.0f}% of the step.")
    counted = {r["unet_rows"] == 4 * r["B"] for r in rows if r["status"] == "ok"}
    if counted == {True}:
        out.append("UNet rows per step = 4 B in every run (counted by a hook): 2 B with gradient (winners and losers "
                   "under the policy) and 2 B under no_grad for the reference, the same UNet with its LoRA off: no "
                   "second UNet is loaded.")
    elif counted:
        out.append("UNet rows per step differ from the expected 4 B (policy and reference, winners and losers): see "
                   "the table.")
    return "\n".join(f"- {s}" for s in out)


def spo_formula(r):
    """UNet rows of one trajectory: batch 1 for the W warm steps and the first branching step, k for each later one."""
    T, W, k = r["shape"]
    return (W + 1) + k * (T - W - 1)


def spo_table(rows, gib):
    unit, scale = ("GiB", 2 ** 10) if gib else ("MiB", 1)
    head = ["model", "B (prompts)", "s / step", "sampling s / trajectory", "plain DDIM s / trajectory",
            "UNet rows / trajectory (formula)", "pairs / step", "training s / pair",
            f"peak sampling ({unit})", f"peak training ({unit})"]
    return batch_table(head, rows, lambda r: [
        fmt(r["total"]), fmt(r["sample"] / r["B"]), fmt(r["plain"] / r["B"]),
        f"{r['sample_rows'] / r['B']:.0f} ({spo_formula(r)})", f"{r['pairs']:.0f}",
        fmt(r["train"] / max(r["pairs"], 1)), fmt((r["sample_peak_mb"] - r["memory_base_mb"]) / scale),
        fmt((r["train_peak_mb"] - r["memory_base_mb"]) / scale)])


def spo_reading(rows):
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        ok = [r for r in rows if r["label"] == label and r["status"] == "ok"]
        if not ok:
            continue
        T, W, k = ok[0]["shape"]
        largest = max(ok, key=lambda r: r["B"])
        overhead = statistics.median(r["sample"] / r["plain"] for r in ok)
        out.append(f"{label} (T={T}, W={W}, k={k}): sampling a trajectory costs {overhead:.1f}x a plain DDIM "
                   f"trajectory (UNet rows: {spo_formula(largest)} against {T}, "
                   f"{spo_formula(largest) / T:.1f}x); at B={largest['B']}, sampling is "
                   f"{100 * largest['sample'] / largest['total']:.0f}% of the step and training on its "
                   f"{largest['pairs']:.0f} pairs {100 * largest['train'] / largest['total']:.0f}%. Per pair, training "
                   f"runs {largest['train_rows'] / max(largest['pairs'], 1):.1f} UNet rows (policy with gradient and "
                   f"reference under no_grad, one row per distinct x_t).")
        smallest = min(ok, key=lambda r: r["B"])
        peaks = {phase: [fmt(r[f"{phase}_peak_mb"] - r["memory_base_mb"]) for r in (smallest, largest)]
                 for phase in ("sample", "train")}
        if smallest is largest:
            out.append(f"{label}: peak memory over the loaded models at B={largest['B']}: sampling "
                       f"{peaks['sample'][1]} MiB, training {peaks['train'][1]} MiB for {largest['pairs']:.0f} pairs.")
        else:
            out.append(f"{label}: peak memory over the loaded models from B={smallest['B']} to B={largest['B']}: "
                       f"sampling {peaks['sample'][0]} to {peaks['sample'][1]} MiB (the pool is k B wide), training "
                       f"{peaks['train'][0]} to {peaks['train'][1]} MiB while the pairs go from "
                       f"{smallest['pairs']:.0f} to {largest['pairs']:.0f} (they are trained --pair_batch_size at a "
                       f"time).")
    mismatch = [r for r in rows if r["status"] == "ok" and round(r["sample_rows"] / r["B"]) != spo_formula(r)]
    if not mismatch and any(r["status"] == "ok" for r in rows):
        out.append("UNet rows per trajectory, counted by a hook, equal (W + 1) + k (T - W - 1) in every run: one call "
                   "per step, batch B for the warm steps and the first branching step, k B after (each of those "
                   "calls both scores the candidates' x_0 predictions and continues the chain).")
    elif mismatch:
        out.append("UNet rows per trajectory differ from (W + 1) + k (T - W - 1) in: " +
                   ", ".join(f"{r['label']} B={r['B']}" for r in mismatch) + ".")
    return "\n".join(f"- {s}" for s in out)


def main_preference(args):
    """--dpo / --spo: seconds per step and peak memory against the batch size, each configuration in a fresh
    process, on the tiny pipelines (or a full-size random-weight one with --full_size)."""
    started = time.time()
    context = fork_context([args.method])
    common = dict(device=args.device, num_threads=args.num_threads, warmup=args.warmup, iters=args.iters)
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.method}-") as folder:
        extra = build_full_size(context, args, folder) if args.full_size else ""
        jobs = preference_plan(args, folder)
        if args.method == "dpo":
            pairs_parquet(os.path.join(folder, "pairs.parquet"),
                          max(j["B"] for j in jobs) * (args.warmup + args.iters), jobs[0]["resolution"])
        rows = []
        for i, job in enumerate(jobs, 1):
            row = preference_summary(dict(job, **run_in_fresh_process(context, dict(job, kind=args.method, **common))))
            rows.append(row)
            where = f"[{i}/{len(jobs)}] {row['label']} B={row['B']}"
            if row["status"] != "ok":
                print(f"{where}: {row['status']}: {row['reason']}\n{row.get('traceback', '')}", flush=True)
            elif args.method == "dpo":
                print(f"{where}: {row['total']:.3f} s/step, peak +{row['memory_peak_mb'] - row['memory_base_mb']:.1f} "
                      f"MiB", flush=True)
            else:
                print(f"{where}: {row['total']:.3f} s/step, {row['pairs']:.0f} pairs, sampling "
                      f"{row['sample'] / row['B']:.3f} s/trajectory", flush=True)
    seconds = time.time() - started
    clock = next((r["clock"] for r in rows if r["status"] == "ok"), "—")
    if args.method == "dpo":
        table, text = dpo_table(rows, args.full_size), dpo_reading(rows)
    else:
        table, text = spo_table(rows, args.full_size), spo_reading(rows)
    print("\n" + table + "\n\n" + text + f"\n\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        key = args.method + (f"_full_size_{args.full_size}" if args.full_size else "")
        write_section(os.path.join(args.output_dir, "BENCHMARKS.md"), key,
                      preference_section(args, table, text, seconds, clock, extra))
        print(f"wrote {os.path.join(args.output_dir, 'BENCHMARKS.md')}")
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)
    return rows


def preference_section(args, table, text, seconds, clock, extra):
    size = (f"full-size {FULL_SIZE[args.full_size]['title']}, random weights ({extra}), gradient checkpointing"
            if args.full_size else f"the tiny pipelines in tiny_models/, {args.resolution} px, LoRA rank {args.rank}")
    first = size[0].upper() + size[1:]
    if args.method == "dpo":
        title = f"## Offline Diffusion-DPO (dpo.py): time and memory against the batch, {size.split(',')[0]}"
        settings = (f"{first}, mixed precision {args.mixed_precision}; {args.warmup} warm-up + the median of "
                    f"{args.iters} steps (by total time, with its parts) per configuration, each in a fresh process. "
                    f"One step = what dpo.py's loop does per optimizer step without accumulation: the next B pairs "
                    f"from a Pick-a-Pic parquet made by the bench (smooth random JPEGs at 5:4, decoded, resized and "
                    f"center-cropped), the VAE encoding of the 2B images, `algorithm_loss` (winners and losers "
                    f"through the policy with gradient and through the reference under no_grad, beta 5000), "
                    f"backward, clipping and the AdamW step. Full size: the paper presets' LoRA rank 64 (SDXL: VAE "
                    f"batch 4).")
    else:
        title = f"## SPO (spo.py): time per trajectory and per training step, {size.split(',')[0]}"
        settings = (f"{first}, mixed precision {args.mixed_precision}, the paper's sampler (DDIM eta 1, CFG 5), "
                    f"T and W as in the reading; the official SD1.5 (k=4) and SDXL (k=2, 3 inner steps) pools; "
                    f"threshold 0, so every comparison yields pairs (the longest training step); symmetry reward as "
                    f"the preference model (PickScore, the paper's, adds its own forward per compared step). "
                    f"{args.warmup} warm-up + the median of {args.iters} steps (by total time, with its parts) per "
                    f"configuration, each in a fresh process. One step = `sample_pairs` for B prompts, then "
                    f"`spo_loss` + backward over all its pairs in chunks of --pair_batch_size, clipping and AdamW, as "
                    f"spo.py on one process. Plain DDIM: the scaffold's `rollout` for the same prompts, timed apart, "
                    f"for scale.")
    body = [title, "", *header_lines(args, seconds, clock), "", settings, ""]
    if args.device == "cpu":
        body += ["**CPU figures: read the ratios, not the absolute times.**", ""]
    body += [table, "", "Reading (computed from the numbers above):", "", text, ""]
    if not args.full_size:
        body += [f"Full size: `python bench.py --{args.method} --full_size sdxl` (or sd15) on a GPU adds its own "
                 f"section with the published architectures.", ""]
    return "\n".join(body)


# ---------------------------------------------------------------------------------------------
# --checkpointing: memory per trained step and time of each --checkpointing_granularity
# ---------------------------------------------------------------------------------------------

GRANULARITIES = ["off", "call", "block", "both"]


def latent_floor_mib(model, resolution, batch_size):
    """One trained step's input, the latents (B, C, h, w) in fp32: what a backward through a chain must keep."""
    with open(os.path.join(model, "unet", "config.json")) as f:
        channels = json.load(f)["in_channels"]
    with open(os.path.join(model, "vae", "config.json")) as f:
        factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    return batch_size * channels * (resolution // factor) ** 2 * 4 / 2 ** 20


def checkpointing_plan(args):
    """Full backprop (every step trained, through the UNet inputs) at several T, and DRTune with one trained step
    (a single UNet call with gradient, as ReFL), at every granularity."""
    jobs = []
    for granularity in GRANULARITIES:
        flags = [] if granularity == "off" else ["--gradient_checkpointing", "--checkpointing_granularity", granularity]
        for label, entry, T, K in [*[("full backprop", -1, T, None) for T in args.T], ("DRTune, K=1", 0, max(args.T), 1)]:
            argv = base_argv(args, T, None) + flags + ["--num_trained_steps", str(K or 1), "--early_stop_max", "1"]
            jobs.append(dict(entry=entry, label=label, module="drtune", T=T, K=K, argv=argv, granularity=granularity,
                             loss="full_backprop" if entry == -1 else "algorithm"))
    return jobs


def checkpointing_table(rows, floor):
    head = ["granularity", "method", "T", "trained UNet calls", "s / iteration", "peak over loaded models (MiB)",
            "MiB per trained step (slope over T)", "floor: one step's input (MiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['granularity']} | {r['label']} | {r['T']} | {r['status']}: {r['reason']} |" + " |" * 4)
            continue
        per_step = r.get("per_step")
        lines.append("| " + " | ".join([
            r["granularity"], r["label"], str(r["T"]), str(r["T"] if r["K"] is None else r["K"]),
            fmt(r["seconds_median"]), fmt(r["memory_delta_mb"]), "—" if per_step is None else f"{per_step:.2f}",
            f"{floor:.4f}"]) + " |")
    return "\n".join(lines)


def checkpointing_reading(rows, floor):
    ok = [r for r in rows if r["status"] == "ok"]
    out = []
    per_step = {g: next((r["per_step"] for r in ok if r["granularity"] == g and r.get("per_step") is not None), None)
                for g in GRANULARITIES}
    if all(v is not None for v in per_step.values()):
        out.append("Memory per trained step of a backward through the chain (full backprop, slope of the peak over "
                   "T): " + ", ".join(f"{g} {v:.2f} MiB" for g, v in per_step.items()) +
                   f"; the floor (one step's input latents) is {floor:.4f} MiB. On CPU the resident set also holds "
                   f"the autograd graph that each non-reentrant checkpoint keeps until the backward (host memory: "
                   f"nodes and holders, no activations), which a GPU's allocated memory does not count.")
    T_max = max((r["T"] for r in ok), default=None)
    full = {r["granularity"]: r for r in ok if r["entry"] == -1 and r["T"] == T_max}
    one = {r["granularity"]: r for r in ok if r["entry"] == 0}
    for name, group in [(f"full backprop T={T_max} ({T_max} trained calls)", full), ("DRTune K=1 (one trained call)", one)]:
        if len(group) == len(GRANULARITIES):
            best = min(group.values(), key=lambda r: r["memory_delta_mb"])
            out.append(f"{name}: peak " + ", ".join(f"{g} {fmt(group[g]['memory_delta_mb'])} MiB" for g in group) +
                       f"; time against off " + ", ".join(f"{g} {group[g]['seconds_median'] / group['off']['seconds_median']:.2f}x"
                                                          for g in group if g != "off") +
                       f". Lowest peak: {best['granularity']}.")
    return "\n".join(f"- {s}" for s in out)


def main_checkpointing(args):
    started = time.time()
    context = fork_context(["drtune"])
    common = dict(device=args.device, num_threads=args.num_threads, warmup=args.warmup, iters=args.iters)
    rows = []
    jobs = checkpointing_plan(args)
    for i, job in enumerate(jobs, 1):
        row = dict(job, **run_in_fresh_process(context, dict(job, kind="iteration", **common)))
        if row["status"] == "ok":
            row.update(seconds_median=statistics.median(row["seconds"]),
                       memory_delta_mb=row["memory_peak_mb"] - row["memory_base_mb"])
            print(f"[{i}/{len(jobs)}] {row['granularity']} {row['label']} T={row['T']}: {row['seconds_median']:.3f} "
                  f"s/iteration, peak +{row['memory_delta_mb']:.1f} MiB", flush=True)
        else:
            print(f"[{i}/{len(jobs)}] {row['granularity']} {row['label']} T={row['T']}: {row['status']}: "
                  f"{row['reason']}", flush=True)
        rows.append(row)
    for granularity in GRANULARITIES:
        chain = [r for r in rows if r["status"] == "ok" and r["granularity"] == granularity and r["entry"] == -1]
        per_step = slope(chain, "T", lambda r: r["memory_delta_mb"])
        for r in chain:
            r["per_step"] = per_step
    floor = latent_floor_mib(args.model, args.resolution, args.train_batch_size)
    seconds = time.time() - started
    clock = next((r["clock"] for r in rows if r["status"] == "ok" and "clock" in r),
                 "CPU time of the process (one torch thread)" if args.device == "cpu" else "wall-clock time")
    table, text = checkpointing_table(rows, floor), checkpointing_reading(rows, floor)
    print("\n" + table + "\n\n" + text + f"\n\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        settings = (f"`{os.path.relpath(args.model, HERE)}`, {args.resolution} px (larger than the sweep's, so that "
                    f"one call's activations stand out of the resident-set noise), batch {args.train_batch_size}, "
                    f"{args.sampler}, CFG {args.guidance_scale}, symmetry reward, LoRA rank {args.rank}, mixed precision "
                    f"{args.mixed_precision}; {args.warmup} warm-up + median of {args.iters} iterations, each "
                    f"configuration in a fresh process" + (
                        f", glibc's mmap threshold at {args.malloc_mmap_threshold} bytes (freed large tensors go back "
                        f"to the system, so the resident set follows live memory, not heap fragmentation; each large "
                        f"allocation then costs page faults, which the times include)"
                        if args.malloc_mmap_threshold is not None else "") + ". Full backprop: every step under gradient through the UNet "
                    f"inputs, then decode and reward (DRaFT-T; AlignProp trains a suffix of such steps). DRTune K=1: "
                    f"one UNet call with gradient (like ReFL, DRaFT-1). Granularities (`--checkpointing_granularity` "
                    f"with `--gradient_checkpointing`): call = each UNet call and decode with gradient one checkpoint; "
                    f"block = diffusers' per-block checkpointing; both = blocks inside the call checkpoint; off = none.")
        body = ["## Gradient checkpointing: memory per trained step and time of each granularity", "",
                *header_lines(args, seconds, clock), "", settings, ""]
        if args.device == "cpu":
            body += ["**CPU figures: read the ratios, not the absolute times.**", ""]
        body += [table, "", "Reading (computed from the numbers above):", "", text, ""]
        write_section(os.path.join(args.output_dir, "BENCHMARKS.md"), "checkpointing", "\n".join(body))
        print(f"wrote {os.path.join(args.output_dir, 'BENCHMARKS.md')}")
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)
    return rows


# ---------------------------------------------------------------------------------------------
# --peers: side by side with the public implementations, on the same tiny model and settings
# ---------------------------------------------------------------------------------------------

# The peers, pinned: TRL 0.23.1 (its AlignPropTrainer, deprecated there, removed in later releases; `pip install
# trl==0.23.1` into the interpreter given by --peer_python) and diffusers' examples/research_projects/diffusion_dpo/
# train_diffusion_dpo.py as of diffusers commit c9c82173068d628b0569ccb6d656adfa37a389e8 (its last change, 2025-08-11;
# a copy anywhere outside this repo, passed with --peer_dpo_script; it imports wandb and torchvision). Neither is
# copied here: the bench runs them unmodified and only sets their flags or config fields.
PEER_VERSIONS = dict(trl="0.23.1", diffusion_dpo="c9c82173068d628b0569ccb6d656adfa37a389e8")
# (key, label, our script, peer, T, trained steps per update): the AlignProp settings take T and the trained steps
PEER_SETTINGS = [
    ("alignprop_all", "AlignProp T=50, every step trained, gradient checkpointing", "alignprop", "trl", 50, 50),
    ("alignprop_all_reentrant", "AlignProp T=50, every step trained, gradient checkpointing; ours with a reentrant "
     "call checkpoint (a bench-only variant, see below)", "alignprop", "trl", 50, 50),
    ("alignprop_last", "AlignProp T=50, last step only, gradient checkpointing", "alignprop", "trl", 50, 1),
    ("dpo", "Diffusion-DPO, offline pairs", "dpo", "diffusion_dpo", None, None),
]


class StopTiming(Exception):
    """Raised by the optimizer-step hook after the last timed update: it ends the run being measured."""


def peer_job(job):
    """One side of one setting in this (fresh) process: the script's own training loop (ours: main(); TRL:
    AlignPropTrainer.train(); diffusers: the example's main()), timed between optimizer steps by a global
    optimizer-step hook (CPU time of the process, one torch thread): the warm-up updates, then `iters` timed ones.
    Peak memory: VmHWM reset at the end of the warm-up (after malloc_trim) and read after the last timed update;
    `start_mb` is the resident set at that reset (models, optimizer state, everything loaded)."""
    torch.set_num_threads(1)
    device, state = torch.device("cpu"), dict(steps=0, seconds=[])

    def hook(optimizer, args, kwargs):
        state["steps"] += 1
        now = time.process_time()
        if state["steps"] > job["warmup"]:
            state["seconds"].append(now - state["last"])
        if len(state["seconds"]) == job["iters"]:
            state["peak_mb"] = memory_mb(device, peak=True)
            raise StopTiming
        if state["steps"] == job["warmup"]:
            reset_peak_memory(device)
            state["start_mb"] = memory_mb(device)
        state["last"] = time.process_time()

    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(hook)
    run = {"ours": run_ours, "trl": run_trl_alignprop, "diffusion_dpo": run_diffusers_dpo}[job["side"]]
    with open(os.path.join(job["folder"], "log.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            run(job)
        except StopTiming:
            pass
    if "peak_mb" not in state:
        raise RuntimeError(f"{job['side']}: the run ended after {state['steps']} optimizer steps, before the timed ones")
    return dict(seconds=state["seconds"], start_mb=state["start_mb"], peak_mb=state["peak_mb"])


def run_ours(job):
    script = importlib.import_module(job["script"])
    if job.get("reentrant"):
        script.checkpointed = reentrant_checkpointed  # rollout and decode look it up at each call
    script.main(script.parse_args(job["argv"]))


def reentrant_checkpointed(module, fn, *inputs):
    """A bench-only variant of the scripts' checkpointed(): torch.utils.checkpoint with use_reentrant=True. Its first
    pass runs under no_grad, so a trained call keeps no autograd graph (one node) and skips the saved-tensor hooks;
    a dummy input that requires grad puts the call in the graph when its inputs are detached (stop-gradient). What
    it gives up: the non-reentrant checks on the recomputation (a backward through a call made with the adapters
    disabled raises there, see TRAPS.md; here it would be silently wrong) and torch.autograd.grad."""
    if getattr(module, "checkpoint_calls", False) and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint
        anchor = torch.ones((), requires_grad=True)
        return checkpoint(lambda _, *x: fn(*x), anchor, *inputs, use_reentrant=True)
    return fn(*inputs)


def run_trl_alignprop(job):
    """TRL's AlignPropTrainer with its DefaultDDPOStableDiffusionPipeline (LoRA rank 4, gradient checkpointing of
    every UNet call, always on), our symmetry reward and prompts."""
    import random

    import trl
    from accelerate import PartialState

    import rewards
    PartialState()  # TRL's pipeline logs through accelerate's logger before its trainer makes the Accelerator
    symmetry = rewards.build_reward("symmetry")
    prompts, rng = importlib.import_module("alignprop").DEFAULT_PROMPTS, random.Random(0)
    pipeline = trl.DefaultDDPOStableDiffusionPipeline(job["model"], use_lora=True)
    # TRL samples at the UNet config's sample_size (the tiny model says 16, 128 px): set it to our resolution
    pipeline.unet.register_to_config(sample_size=job["resolution"] // pipeline.sd_pipeline.vae_scale_factor)
    T, trained = job["T"], job["trained"]
    config = trl.AlignPropConfig(
        num_epochs=10 ** 6, sample_num_steps=T, sample_eta=1.0, sample_guidance_scale=5.0, train_batch_size=2,
        train_learning_rate=1e-3, train_max_grad_norm=1.0, mixed_precision="no", seed=0, log_with=None,
        truncated_backprop_rand=False, truncated_backprop_timestep=T - trained, save_freq=10 ** 9,
        project_kwargs=dict(project_dir=job["folder"], logging_dir=os.path.join(job["folder"], "logs")))
    trainer = trl.AlignPropTrainer(config, lambda images, p, metadata: (symmetry(images, list(p)), {}),
                                   lambda: (rng.choice(prompts), {}), pipeline)
    trainer.train()


def run_diffusers_dpo(job):
    """diffusers' train_diffusion_dpo.py, unmodified, loaded from its path, its main() with its own flags."""
    spec = importlib.util.spec_from_file_location("train_diffusion_dpo", job["peer_script"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(module.parse_args(job["argv"]))


def peer_plan(args, folder):
    """(setting, job of the peer, job of ours) for each setting whose peer is available; and the reasons of the
    others. Every job: B = 2, 32 px, LoRA rank 4, fp32, one torch thread."""
    model = os.path.join(HERE, "tiny_models", "sd15")
    check = subprocess.run([args.peer_python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                           text=True)
    trl_version = check.stdout.strip() if check.returncode == 0 else None
    common = dict(model=model, resolution=32, python=args.peer_python)
    plans, missing = [], []
    for key, label, script, peer, T, trained in PEER_SETTINGS:
        if args.peer_settings and key not in args.peer_settings:
            continue
        if peer == "trl" and trl_version is None:
            missing.append(f"{label}: TRL is not importable by {args.peer_python} "
                           f"(`pip install trl=={PEER_VERSIONS['trl']}` into it, or pass --peer_python)")
            continue
        if peer == "diffusion_dpo" and not (args.peer_dpo_script and os.path.isfile(args.peer_dpo_script)):
            missing.append(f"{label}: no --peer_dpo_script (diffusers' examples/research_projects/diffusion_dpo/"
                           f"train_diffusion_dpo.py, commit {PEER_VERSIONS['diffusion_dpo'][:8]})")
            continue
        ours = ["--pretrained_model_name_or_path", model, "--resolution", "32", "--train_batch_size", "2",
                "--rank", "4", "--mixed_precision", "no", "--report_to", "none", "--seed", "0",
                "--validation_steps", "1000000", "--checkpointing_steps", "1000000", "--logging_steps", "1000000",
                "--max_train_steps", "1000", "--num_eval_prompts", "1"]
        if peer == "trl":
            warmup, iters = 1, args.peer_iters or 3
            ours += ["--num_inference_steps", str(T), "--sampler", "ddim", "--eta", "1.0", "--guidance_scale", "5.0",
                     "--truncation_min", str(trained), "--truncation_max", str(trained), "--gradient_checkpointing",
                     "--reward", "symmetry", "--learning_rate", "1e-3", "--max_grad_norm", "1.0",
                     "--adam_weight_decay", "1e-4"]
            peer_job_ = dict(common, side="trl", T=T, trained=trained, version=trl_version)
        else:
            warmup, iters = 2, args.peer_iters or 20
            ours += ["--dataset_name", os.path.join(folder, "pairs"), "--beta_dpo", "5000", "--learning_rate", "1e-5",
                     "--num_inference_steps", "2", "--reward", "symmetry"]
            theirs = ["--pretrained_model_name_or_path", model, "--dataset_name", os.path.join(folder, "pairs"),
                      "--dataset_split_name", "train", "--resolution", "32", "--train_batch_size", "2", "--rank", "4",
                      "--mixed_precision", "no", "--max_train_steps", "1000", "--learning_rate", "1e-5",
                      "--beta_dpo", "2500", "--seed", "0", "--checkpointing_steps", "1000000", "--no_hflip",
                      "--report_to", "tensorboard"]
            peer_job_ = dict(common, side="diffusion_dpo", argv=theirs, peer_script=args.peer_dpo_script)
        ours_job = dict(common, side="ours", script=script, argv=ours, reentrant=key.endswith("_reentrant"))
        plans.append(dict(key=key, label=label, warmup=warmup, iters=iters,
                          jobs=dict(peer=dict(peer_job_, warmup=warmup, iters=iters),
                                    ours=dict(ours_job, warmup=warmup, iters=iters))))
    return plans, missing, trl_version


def run_peer_job(job, folder):
    """Run one job in a fresh process of job["python"] (the interpreter that has the peers installed); both sides
    use it, so that both run on the same libraries."""
    os.makedirs(folder, exist_ok=True)
    job = dict(job, folder=folder)
    if "argv" in job:
        job["argv"] = job["argv"] + ["--output_dir", os.path.join(folder, "out")]
    result_path = os.path.join(folder, "result.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled")
    done = subprocess.run([job["python"], os.path.abspath(__file__), "--peer_job", json.dumps(job), result_path],
                          env=env, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists(result_path):
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        log = os.path.join(folder, "log.txt")
        if os.path.exists(log):
            tail += " | log: " + " ".join(open(log).read().strip().splitlines()[-3:])[-300:]
        return dict(status="failed", reason=tail)
    with open(result_path) as f:
        return dict(status="ok", **json.load(f))


def peer_summary(results):
    """Median over repetitions of each run's median s/update, peak RSS and peak over the start of the timing."""
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return None
    return dict(seconds=statistics.median(statistics.median(r["seconds"]) for r in ok),
                peak_mb=statistics.median(r["peak_mb"] for r in ok),
                over_mb=statistics.median(r["peak_mb"] - r["start_mb"] for r in ok), runs=len(ok))


def peers_table(rows):
    head = ["setting", "peer s / update", "ours", "ratio", "peer peak RSS (MiB)", "ours", "ratio",
            "peer peak over the start of timing (MiB)", "ours", "ratio", "runs (peer / ours)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p, o = r["peer"], r["ours"]
        if p is None or o is None:
            lines.append(f"| {r['label']} | failed: {r['reason']} |" + " |" * (len(head) - 2))
            continue
        lines.append("| " + " | ".join([
            r["label"], fmt(p["seconds"]), fmt(o["seconds"]), f"{o['seconds'] / p['seconds']:.2f}",
            fmt(p["peak_mb"]), fmt(o["peak_mb"]), f"{o['peak_mb'] / p['peak_mb']:.2f}",
            fmt(p["over_mb"]), fmt(o["over_mb"]), f"{o['over_mb'] / max(p['over_mb'], 1e-9):.2f}",
            f"{p['runs']} / {o['runs']}"]) + " |")
    return "\n".join(lines)


PEER_DIFFERENCES = """\
- Both sides run in fresh processes of the same interpreter (the one with the peers installed), on the same
  libraries, tiny SD1.5 (`tiny_models/sd15`), 32 px, batch 2, LoRA rank 4 (alpha 4, gaussian init, to_q/k/v/out.0),
  fp32, one torch thread, AdamW, clipping 1.0; repetitions alternate which side runs first.
- AlignProp: both sample DDIM eta 1.0, CFG 5.0, T=50 and score with the same symmetry reward; TRL's loss is
  10 - reward, ours -reward (the same gradient). TRL samples at its UNet config's sample_size, set to 32 px here.
  TRL checkpoints every UNet call (always) and runs every call with gradient, detaching the model output of the
  untrained steps; ours runs untrained steps under no_grad and checkpoints each trained call and the decode
  (`--gradient_checkpointing`, granularity call). Our truncation is contiguous (`--truncation_min/max` = the trained
  steps), TRL's fixed truncation (`truncated_backprop_rand=False`, `truncated_backprop_timestep` = T - trained)
  is the same set. TRL computes DDPO's log-probabilities at every step (unused by AlignProp); we do not.
  The reentrant row runs the same alignprop.py with bench.py's `reentrant_checkpointed` in place of the scripts'
  `checkpointed` (torch.utils.checkpoint with use_reentrant=True and a dummy input that requires grad): not what the
  scripts do, measured to show what the first pass under no_grad is worth.
  On CPU the peak RSS also counts what a GPU's allocated memory would not: the autograd graph that each
  non-reentrant checkpoint keeps in host memory until the backward (nodes and holders, no activations), and the
  allocator's fragmentation, which moves with the order in which temporaries are freed.
  TRL's weight decay 1e-4 and lr 1e-3 are passed to ours; TRL's checkpoint saving is off (save_freq 1e9), ours
  (checkpointing_steps 1e6) too. Ours evaluates a grid before training (outside the timing); TRL does not.
- DPO: the same Pick-a-Pic parquet (smooth random JPEGs at 5:4, label_0 alternating, no ties), shortest side
  resized to 32 and center-cropped by both; beta: ours 5000 with eq. 14's -beta/2, theirs 2500 with its own form
  (the same loss); the same noise and timestep for the two images of a pair in both. The diffusers script flips
  at random unless --no_hflip (passed), tokenizes in its dataset transform and logs to tensorboard (its default;
  `none` is not one of its trackers); ours logs metrics.jsonl. Ours evaluates a grid before training (outside
  the timing); theirs runs no validation (its default)."""


def main_peers(args):
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as folder:
        os.makedirs(os.path.join(folder, "pairs"))
        pairs_parquet(os.path.join(folder, "pairs", "train.parquet"), 256, 32)
        plans, missing, trl_version = peer_plan(args, folder)
        for reason in missing:
            print(f"skipped: {reason}", flush=True)
        rows = []
        for plan_ in plans:
            results = dict(peer=[], ours=[])
            for rep in range(args.repeats):
                for side in ("peer", "ours") if rep % 2 == 0 else ("ours", "peer"):
                    out = run_peer_job(plan_["jobs"][side], os.path.join(folder, plan_["key"], f"{side}-{rep}"))
                    results[side].append(out)
                    where = f"{plan_['label']} [{rep + 1}/{args.repeats}] {side}"
                    if out["status"] == "ok":
                        print(f"{where}: {statistics.median(out['seconds']):.3f} s/update, peak "
                              f"{out['peak_mb']:.0f} MiB (+{out['peak_mb'] - out['start_mb']:.1f})", flush=True)
                    else:
                        print(f"{where}: failed: {out['reason']}", flush=True)
            reason = next((r["reason"] for side in results.values() for r in side if r["status"] != "ok"), "")
            rows.append(dict(key=plan_["key"], label=plan_["label"], reason=reason.replace("|", "/"),
                             iters=plan_["iters"], warmup=plan_["warmup"],
                             peer=peer_summary(results["peer"]), ours=peer_summary(results["ours"])))
    seconds = time.time() - started
    table = peers_table(rows)
    print("\n" + table + f"\n\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None and rows:
        os.makedirs(args.output_dir, exist_ok=True)
        runs = ", ".join(f"{r['label']}: {r['warmup']} warm-up + {r['iters']} timed updates" for r in rows)
        body = ["## Side by side with the public implementations (tiny SD1.5, 32 px, batch 2, LoRA rank 4, fp32)", "",
                *[line + "  " for line in header_lines(args, seconds, "CPU time of each one-thread process")],
                f"Peers: TRL {trl_version} (AlignPropTrainer); diffusers' train_diffusion_dpo.py at commit "
                f"{PEER_VERSIONS['diffusion_dpo'][:8]}" + (f"; not run: {'; '.join(missing)}" if missing else ""), "",
                f"Each side trains with its own loop in a fresh process, {args.repeats} alternating repetitions; "
                f"per run {runs}, timed between optimizer steps (a global optimizer-step hook); the table gives the "
                f"median over runs of each run's median. Peak RSS: the process's peak resident set during the timed "
                f"updates (VmHWM reset after the warm-up); peak over the start: that peak minus the resident set at "
                f"the reset (what training adds to the loaded models and optimizer). Ratio = ours / peer: below 1 "
                f"we are faster or smaller.", "",
                "**CPU figures: read the ratios, not the absolute times.**", "", table, "",
                "Settings, and every difference that remains:", "", PEER_DIFFERENCES, ""]
        write_section(os.path.join(args.output_dir, "BENCHMARKS.md"), "peers", "\n".join(body))
        print(f"wrote {os.path.join(args.output_dir, 'BENCHMARKS.md')}")
    return rows


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(args):
    if args.malloc_mmap_threshold is not None:  # read by glibc at the start of each process measured from here on
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.full_size and args.device == "cpu" and not args.allow_cpu:
        sys.exit(f"bench.py: error: --full_size {args.full_size} needs a GPU (a full-size UNet forward+backward takes "
                 f"seconds on a CPU); pass --allow_cpu for a one-iteration smoke at 64 px, T=1, K=1")
    if args.fig7:
        return main_fig7(args)
    if args.table1:
        return main_table1(args)
    if args.method:
        return main_preference(args)
    if args.peers:
        return main_peers(args)
    if args.checkpointing:
        return main_checkpointing(args)
    started = time.time()
    context = fork_context([e[1] for e in METHODS + [FULL_BACKPROP]])
    common = dict(device=args.device, num_threads=args.num_threads)
    with tempfile.TemporaryDirectory(prefix="bench-full-size-") as folder:
        extra = build_full_size(context, args, folder) if args.full_size else ""
        jobs = plan(args, folder)
        if not jobs:
            sys.exit(f"bench.py: error: no configuration to run (--methods {args.methods})")
        parts = run_in_fresh_process(context, dict(jobs[0], kind="parts", repeats=args.part_repeats, **common))
        if parts["status"] != "ok":
            sys.exit(f"bench.py: error: timing the parts failed: {parts['reason']}\n{parts.get('traceback', '')}")
        parts, args.clock = parts["parts"], parts["clock"]
        print("parts (ms): " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in parts.items() if k in PARTS), flush=True)
        rows = []
        for i, job in enumerate(jobs, 1):
            result = run_in_fresh_process(context, dict(job, kind="iteration", warmup=args.warmup, iters=args.iters,
                                                        **common))
            row = summarize(dict(job, **result), parts)
            rows.append(row)
            where = f"[{i}/{len(jobs)}] {row['label']} T={row['T']} K={row['K']}"
            if row["status"] == "ok":
                print(f"{where}: {row['seconds_median']:.3f} s/iteration, ratio {row['ratio']:.2f}, peak "
                      f"+{row['memory_delta_mb']:.1f} MiB", flush=True)
            else:
                print(f"{where}: {row['status']}: {row['reason']}", flush=True)
                if row["status"] == "failed" and "traceback" in row:
                    print(row["traceback"], file=sys.stderr)
    seconds = time.time() - started
    print()
    print(parts_table(parts))
    print()
    print(results_table(rows, args.device, args.full_size))
    if not args.full_size:
        print()
        print(reading(rows, parts, latent_floor_mib(args.model, args.resolution, args.train_batch_size)))
    print(f"\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        key = f"full_size_{args.full_size}" if args.full_size else \
            f"tiny_checkpointing_{args.checkpointing_granularity}" if args.gradient_checkpointing else "tiny"
        if not args.full_size and not args.gradient_checkpointing:
            plot(rows, os.path.join(args.output_dir, "bench_drtune.png"), args.clock)
        write_section(os.path.join(args.output_dir, "BENCHMARKS.md"), key, section(args, rows, parts, extra, seconds))
        print(f"wrote {os.path.join(args.output_dir, 'BENCHMARKS.md')}")
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peer_job"]:  # one side of --peers, in a fresh process of --peer_python
        with open(sys.argv[3], "w") as result:
            json.dump(peer_job(json.loads(sys.argv[2])), result)
    else:
        main(parse_args())
