"""Side by side with Flow-GRPO's own training script: grpo.py next to yifan123/flow_grpo's scripts/train_sd3.py on
the tiny SD3 pipeline (tiny_models/sd35) with the same settings; CPU time and peak memory per trained image.

Protocol (fixed before running):
- Peer: github.com/yifan123/flow_grpo at commit PEER_COMMIT, a copy outside this repo (--peer_root, default
  /tmp/flow_grpo), run unmodified: its scripts/train_sd3.py executed as __main__ (absl flags) with a config file of
  ours that loads its config/grpo.py, takes `pickscore_sd3()` and overrides fields only (model, size, group, batches,
  reward). Its reward is one it ships, `jpeg_compressibility` (PIL JPEG at quality 95, -kB / 500); ours is
  `jpeg_size` at `jpeg_quality=95` (-kB): the same score up to a positive scale, which both sides' global-std
  advantages remove. Its missing dependencies (ml_collections, wandb 0.18.7 as its setup.py pins, and wandb's own)
  live in a folder put on PYTHONPATH (--peer_pythonpath); WANDB_MODE=disabled. With beta > 0 its training loop calls
  `transformer.module.disable_adapter()`, which exists only on a DDP-wrapped model: the peer runs as a one-process
  DDP job (the environment torchrun would set: RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR/PORT, and
  ACCELERATE_USE_CPU=true), as its multi-GPU launches run it. Nothing else is changed.
- Settings, both sides: 32 px, fp32, the flow SDE (Euler, a = 0.7), T = 10 sampling steps (quick: 4), CFG 4.5 in
  sampling and training, group G = 4 (quick: 2) images per prompt, a sampling batch of one prompt's G images, two
  sampling batches per round, two optimizer updates per round (each over G images: Flow-GRPO's
  gradient_accumulation_steps = num_batches_per_epoch / 2), one inner epoch, int(0.99 T) trained steps per image,
  one training forward per G transitions (theirs: one timestep of its train batch; ours --train_micro_batch G),
  beta 0.01 (KL to the adapter-off model), advantages over the round's global std, clip 1e-4, advantage clip 5,
  LoRA rank 32 on the joint attention's eight projections, AdamW lr 3e-4, weight decay 1e-4, clipping 1.0,
  T5 at 128 tokens, no EMA (pickscore_sd3 has it: it is turned off, ours has none), no checkpoint saving, the
  peer's evaluation (always at its epoch 0) and ours (the grid before training) outside the timing.
- Each side runs its own loop in a fresh process of this interpreter (`nice`, OMP_NUM_THREADS=1, one torch thread),
  repetitions alternating which side runs first. A global optimizer-step hook (torch's, fires on real updates only:
  accelerate skips the accumulation micro-steps) reads the process's CPU time: the first round (2 updates) is
  warm-up, then `rounds` whole rounds are timed, from the last update of the warm-up to the last timed update
  (so each timed round's sampling, rewards, advantages and both updates are inside). Time per trained image = that
  CPU time / (rounds x images per round): every image is sampled once and trained on once.
- Peak memory: peak resident set of the fresh process (Linux VmHWM) during the timed rounds, reset after the
  warm-up (malloc_trim, then clear_refs); that peak minus the resident set of a fresh process that has only
  imported what the side imports (FLOOR_IMPORTS: the libraries, which on this tiny model are most of the peak);
  and that peak minus the resident set at the reset (what a round adds to the loaded models, optimizer and
  caches); and ru_maxrss read just before the reset (loading and the warm-up round). Both sides have the same images per round and per forward, so the
  ratios are per trained image too. The peer's DataLoader worker (its train loader has num_workers=1) is another
  process and is not counted; neither is its CPU time.
- Where the time goes: CPU time inside SD3Transformer2DModel.forward, torch.autograd.backward, the VAE, the text
  encoders (CLIP-L/G, T5) and the optimizer step, each exclusive of the others (methods wrapped on their classes,
  so that both loops run unmodified); the rest is the loops' own code (sampler arithmetic, rewards, data, logging).
Ratios are ours / theirs: below 1 we are faster or smaller. Goal: <= 0.8 on time and on peak memory.

    pip install --no-deps --target /tmp/fgpeer/lib ml_collections wandb==0.18.7 "protobuf>=5,<6" six \\
        docker-pycreds gitpython gitdb smmap platformdirs sentry-sdk setproctitle
    git clone https://github.com/yifan123/flow_grpo /tmp/flow_grpo && git -C /tmp/flow_grpo checkout ac4c86e8
    python -m benchmarks.flow_grpo_peer                      # writes the flow_grpo_peer section of BENCHMARKS.md
    python -m benchmarks.flow_grpo_peer --quick --side ours  # seconds: our side only
"""

import argparse
import contextlib
import json
import os
import resource
import runpy
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

if not __package__:  # python benchmarks/flow_grpo_peer.py: the repo root on the path, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common, peers
from benchmarks.common import fmt

PEER_COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"  # flow_grpo main, 2025-07-18 ("fix imagereward")
MODEL = os.path.join(common.ROOT, "tiny_models", "sd35")
PROMPTS = os.path.join(common.ROOT, "tiny_models", "world-train-prompts.txt")

# Where the time goes: (part, classes, methods), timed exclusively as benchmarks/peers.py does
PARTS = [("transformer forward", ["diffusers:SD3Transformer2DModel"], ["forward"]),
         ("backward", ["torch.autograd"], ["backward"]),
         ("VAE", ["diffusers:AutoencoderKL"], ["encode", "decode"]),
         ("text encoders", ["transformers:CLIPTextModelWithProjection", "transformers:T5EncoderModel"], ["forward"])]
PART_NAMES = [name for name, _, _ in PARTS] + ["optimizer step", "the rest"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--peer_root", default=os.environ.get("FLOW_GRPO_ROOT", "/tmp/flow_grpo"),
                        help="a copy of github.com/yifan123/flow_grpo (outside this repo)")
    parser.add_argument("--peer_pythonpath", default=os.environ.get("FLOW_GRPO_PYTHONPATH", "/tmp/fgpeer/lib"),
                        help="folder(s) (os.pathsep) with the peer's dependencies this venv lacks (ml_collections, "
                             "wandb); put on PYTHONPATH of both sides' processes")
    parser.add_argument("--side", choices=["both", "ours"], default="both", help="ours: skip the peer")
    parser.add_argument("--quick", action="store_true", help="T = 4, G = 2, one timed round, one repetition")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions of each side (default 5, quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per run (default 3, quick 1)")
    parser.add_argument("--no_cached_row", action="store_true",
                        help="skip the extra row of ours with --cache_prompt_embeds")
    parser.add_argument("--keep", default=None, help="keep the runs' folders (logs, configs) here")
    parser.add_argument("--output_dir", default=common.ROOT, help="folder of BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return common.finish_args(args, "flow_grpo_peer", argv)


def settings(quick):
    T, G = (4, 2) if quick else (10, 4)
    return dict(T=T, G=G, batches=2, updates=2, fraction=0.99, cfg=4.5, eta=0.7, beta=0.01, rank=32, lr=3e-4,
                max_sequence_length=128, seed=0)


# ---------------------------------------------------------------------------------------------
# One side, in a fresh process (this file with --job)
# ---------------------------------------------------------------------------------------------


class StopTiming(Exception):
    """Raised by the optimizer-step hook after the last timed update: it ends the run being measured."""


class Timer(peers.PartTimer):
    """peers.PartTimer with the SD3 pipeline's parts."""

    def __init__(self):
        self.totals, self.stack = dict.fromkeys(PART_NAMES, 0.0), []

    def install(self):
        import importlib
        for part, owners, methods in PARTS:
            for owner in owners:
                module, _, attr = owner.partition(":")
                target = importlib.import_module(module)
                target = getattr(target, attr) if attr else target
                for method in methods:
                    self.wrap(target, method, part)


def run_job(job):
    """The side's own loop, timed between optimizer steps; returns the CPU seconds of each timed update, the peak
    resident set over the timed rounds and at their start, and the parts' CPU seconds over the timed rounds."""
    torch.set_num_threads(1)
    device, state, timer = torch.device("cpu"), dict(steps=0, seconds=[]), Timer()
    timer.install()
    warmup, iters = job["warmup"], job["iters"]

    def pre_hook(optimizer, args, kwargs):
        timer.enter("optimizer step")

    def hook(optimizer, args, kwargs):
        timer.exit()
        state["steps"] += 1
        now = time.process_time()
        if state["steps"] > warmup:
            state["seconds"].append(now - state["last"])
        if len(state["seconds"]) == iters:
            state["peak_mb"] = common.memory_mb(device, peak=True)
            state["parts"] = dict(timer.totals)
            raise StopTiming
        if state["steps"] == warmup:
            state["load_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the reset
            common.reset_peak_memory(device)
            state["start_mb"] = common.memory_mb(device)
            timer.totals = dict.fromkeys(PART_NAMES, 0.0)
        state["last"] = time.process_time()

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(pre_hook)
    register_optimizer_step_post_hook(hook)
    with open(os.path.join(job["folder"], "log.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            (run_flow_grpo if job["side"] == "flow_grpo" else run_ours)(job)
        except StopTiming:
            pass
    if "peak_mb" not in state:
        raise RuntimeError(f"{job['side']}: the run ended after {state['steps']} optimizer steps, before the timed "
                           f"ones")
    parts = {k: v for k, v in state["parts"].items()}
    parts["the rest"] = sum(state["seconds"]) - sum(parts.values())
    return dict(seconds=state["seconds"], start_mb=state["start_mb"], peak_mb=state["peak_mb"],
                load_peak_mb=state["load_peak_mb"], parts=parts)


def run_ours(job):
    import grpo
    grpo.main(grpo.parse_args(job["argv"]))


CONFIG = '''\
# Written by benchmarks/flow_grpo_peer.py: Flow-GRPO's pickscore_sd3 config, fields overridden, nothing else.
import importlib.util, os
spec = importlib.util.spec_from_file_location("flow_grpo_config_grpo", os.path.join({root!r}, "config", "grpo.py"))
grpo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grpo)


def get_config():
    config = grpo.pickscore_sd3()
    config.pretrained.model = {model!r}
    config.dataset = {dataset!r}
    config.resolution = 32
    config.mixed_precision = "no"
    config.allow_tf32 = False
    config.seed = {seed}
    config.logdir = {logdir!r}
    config.save_dir = {logdir!r}
    config.save_freq = 10 ** 9
    config.eval_freq = 10 ** 9  # it evaluates at epoch 0 whatever this is: inside the warm-up round
    config.sample.num_steps = {T}
    config.sample.eval_num_steps = {T}
    config.sample.guidance_scale = {cfg}
    config.sample.noise_level = {eta}
    config.sample.train_batch_size = {G}  # images per sampling batch: one prompt's group
    config.sample.num_image_per_prompt = {G}
    config.sample.num_batches_per_epoch = {batches}
    config.sample.test_batch_size = 1
    config.sample.global_std = True
    config.train.batch_size = {G}
    config.train.gradient_accumulation_steps = {batches} // {updates}
    config.train.num_inner_epochs = 1
    config.train.timestep_fraction = {fraction}
    config.train.beta = {beta}
    config.train.learning_rate = {lr}
    config.train.ema = False
    config.reward_fn = {{"jpeg_compressibility": 1.0}}
    return config
'''


def run_flow_grpo(job):
    """Flow-GRPO's scripts/train_sd3.py, unmodified, as __main__ with --config our config file."""
    root = job["peer_root"]
    sys.path.insert(0, root)
    os.chdir(job["folder"])
    sys.argv = [os.path.join(root, "scripts", "train_sd3.py"), f"--config={job['config']}"]
    runpy.run_path(sys.argv[0], run_name="__main__")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_side(job, folder):
    """run_job(job) in a fresh, niced process of this interpreter."""
    os.makedirs(folder, exist_ok=True)
    job = dict(job, folder=folder)
    if job["side"] == "ours":
        job["argv"] = job["argv"] + ["--output_dir", os.path.join(folder, "out")]
    result_path = os.path.join(folder, "result.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    if job.get("pythonpath"):
        env["PYTHONPATH"] = os.pathsep.join([job["pythonpath"], common.ROOT, env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
    if job["side"] == "flow_grpo":  # a one-process DDP job, as torchrun would set it (see the docstring)
        env.update(ACCELERATE_USE_CPU="true", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = subprocess.run(["nice", "-n", "10", sys.executable, os.path.abspath(__file__), "--job", json.dumps(job),
                           result_path], env=env, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists(result_path):
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        log = os.path.join(folder, "log.txt")
        if os.path.exists(log):
            tail += " | log: " + " ".join(open(log).read().strip().splitlines()[-3:])[-300:]
        return dict(status="failed", reason=tail)
    with open(result_path) as f:
        return dict(status="ok", **json.load(f))


# ---------------------------------------------------------------------------------------------
# The plan, the runs, the section
# ---------------------------------------------------------------------------------------------


FLOOR_IMPORTS = dict(
    # what grpo.py has imported by the time it trains an SD3 pipeline (its models are loaded one by one)
    ours="import grpo, accelerate, peft; from diffusers import AutoencoderKL, SD3Transformer2DModel, "
         "FlowMatchEulerDiscreteScheduler, DiffusionPipeline; from transformers import CLIPTextModelWithProjection, "
         "T5EncoderModel, CLIPTokenizer, T5TokenizerFast",
    # scripts/train_sd3.py's own import lines
    flow_grpo="import accelerate, peft, wandb, ml_collections, absl.app; from ml_collections import config_flags; "
              "from diffusers import StableDiffusion3Pipeline; import flow_grpo.prompts, flow_grpo.rewards, "
              "flow_grpo.stat_tracking, flow_grpo.ema, flow_grpo.diffusers_patch.sd3_pipeline_with_logprob, "
              "flow_grpo.diffusers_patch.sd3_sde_with_logprob, flow_grpo.diffusers_patch.train_dreambooth_lora_sd3")


def libraries_rss(side, pythonpath, repeats=3):
    """Resident set (MiB, median of fresh processes) of a one-thread process that has only imported what the side
    imports (FLOOR_IMPORTS): the floor under its peak, before any model is loaded."""
    code = (f"import torch; torch.set_num_threads(1); {FLOOR_IMPORTS[side]}; from benchmarks import common; "
            f"print(common.memory_mb(torch.device('cpu')))")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join(p for p in [pythonpath, common.ROOT] if p))
    values = []
    for _ in range(repeats):
        done = subprocess.run(["nice", "-n", "10", sys.executable, "-c", code], cwd=common.ROOT, capture_output=True,
                              text=True, env=env)
        values.append(float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else float("nan"))
    return statistics.median(values)


def peer_available(args):
    """None if the peer can run, else the one-line reason."""
    script = os.path.join(args.peer_root, "scripts", "train_sd3.py")
    if args.side == "ours":
        return "--side ours"
    if not os.path.isfile(script):
        return (f"Flow-GRPO is not installed: no {script} (git clone https://github.com/yifan123/flow_grpo "
                f"{args.peer_root}; commit {PEER_COMMIT[:8]}), or pass --peer_root")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([args.peer_pythonpath, args.peer_root]), WANDB_MODE="disabled")
    check = subprocess.run([sys.executable, "-c", "import ml_collections, wandb, absl, flow_grpo.rewards"],
                           env=env, capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return (f"Flow-GRPO's dependencies are not importable ({last}): pip install --no-deps --target "
                f"{args.peer_pythonpath} ml_collections wandb==0.18.7 ... (see the docstring)")
    return None


def jobs(args, folder):
    s = settings(args.quick)
    T, G = s["T"], s["G"]
    dataset = os.path.join(folder, "prompts")
    os.makedirs(dataset, exist_ok=True)
    with open(PROMPTS) as f:
        prompts = [line.strip() for line in f if line.strip()][:32]
    with open(os.path.join(dataset, "train.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    with open(os.path.join(dataset, "test.txt"), "w") as f:
        f.write(prompts[0] + "\n")
    warmup, iters = s["updates"], s["updates"] * args.rounds  # one warm-up round, then whole rounds
    ours = ["--pretrained_model_name_or_path", MODEL, "--resolution", "32", "--mixed_precision", "no",
            "--sampler", "euler", "--eta", str(s["eta"]), "--num_inference_steps", str(T),
            "--guidance_scale", str(s["cfg"]), "--group_size", str(G), "--train_batch_size", "1",
            "--gradient_accumulation_steps", str(s["batches"]), "--updates_per_round", str(s["updates"]),
            "--num_inner_epochs", "1", "--train_micro_batch", str(G), "--timestep_fraction", str(s["fraction"]),
            "--beta", str(s["beta"]), "--advantage_std", "batch", "--clip_range", "1e-4", "--advantage_clip", "5",
            "--rank", str(s["rank"]), "--learning_rate", str(s["lr"]), "--adam_weight_decay", "1e-4",
            "--max_grad_norm", "1.0", "--reward", "jpeg_size", "--reward_options", "jpeg_quality=95",
            "--max_sequence_length", str(s["max_sequence_length"]), "--seed", str(s["seed"]),
            "--train_prompts", os.path.join(dataset, "train.txt"), "--eval_prompts", os.path.join(dataset, "test.txt"),
            "--num_eval_prompts", "1", "--report_to", "none", "--validation_steps", "1000000",
            "--checkpointing_steps", "1000000", "--logging_steps", "1000000", "--max_train_steps", "1000"]
    pythonpath = args.peer_pythonpath if args.side == "both" else None
    shared = dict(warmup=warmup, iters=iters, images_per_update=G * s["batches"] // s["updates"],
                  pythonpath=pythonpath)
    out = dict(ours=dict(shared, side="ours", argv=ours))
    if not (args.quick or args.no_cached_row):
        out["ours_cached"] = dict(shared, side="ours", argv=ours + ["--cache_prompt_embeds"])
    if args.side == "both":
        config = os.path.join(folder, "flow_grpo_tiny_config.py")
        with open(config, "w") as f:
            f.write(CONFIG.format(root=args.peer_root, model=MODEL, dataset=dataset, logdir=os.path.join(folder, "logs"),
                                  **s))
        out["flow_grpo"] = dict(shared, side="flow_grpo", peer_root=args.peer_root, config=config,
                                pythonpath=os.pathsep.join([args.peer_pythonpath, args.peer_root]))
    return out, s


def summary(results, images_per_update):
    """Medians over runs: CPU s per trained image, peak RSS, peak over the start, parts per trained image."""
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return None
    per_image = lambda r: sum(r["seconds"]) / (len(r["seconds"]) * images_per_update)  # noqa: E731
    return dict(seconds=statistics.median(per_image(r) for r in ok),
                spread=(min(per_image(r) for r in ok), max(per_image(r) for r in ok)),
                peak_mb=statistics.median(r["peak_mb"] for r in ok),
                over_mb=statistics.median(r["peak_mb"] - r["start_mb"] for r in ok),
                load_peak_mb=statistics.median(r["load_peak_mb"] for r in ok), runs=len(ok),
                parts={k: statistics.median(r["parts"][k] / (len(r["seconds"]) * images_per_update) for r in ok)
                       for k in PART_NAMES})


LABELS = dict(flow_grpo="Flow-GRPO train_sd3.py", ours="ours: grpo.py",
              ours_cached="ours: grpo.py --cache_prompt_embeds")


def ratio(o, p):
    return f"{o / p:.2f}" if p > 0 else "—"


def results_table(rows):
    """rows: {side: summary or None}; the ratios of each of ours to the peer's."""
    head = ["side", "CPU s / trained image (median, min-max)", "ratio", "peak RSS in the timed rounds (MiB)",
            "ratio", "peak above its imports (MiB)", "ratio", "peak over their start (MiB)", "ratio",
            "peak RSS up to the timing (MiB)", "ratio", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    peer = rows.get("flow_grpo")
    for side, r in rows.items():
        if r is None:
            continue
        cells = [LABELS[side], f"{fmt(r['seconds'])} ({fmt(r['spread'][0])}-{fmt(r['spread'][1])})"]
        for key in ("seconds", "peak_mb", "above_mb", "over_mb", "load_peak_mb"):
            if key != "seconds":
                cells.append(fmt(r[key]))
            cells.append(ratio(r[key], peer[key]) if peer is not None and side != "flow_grpo" else "—")
        lines.append("| " + " | ".join(cells + [str(r["runs"])]) + " |")
    return "\n".join(lines)


def parts_table(rows):
    head = ["side", *PART_NAMES, "sum"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side, r in rows.items():
        if r is not None:
            lines.append("| " + " | ".join([LABELS[side], *(fmt(r["parts"][k]) for k in PART_NAMES),
                                            fmt(sum(r["parts"].values()))]) + " |")
    return "\n".join(lines)


def reading(rows):
    """The goal's verdict for each of ours and where the difference comes from, computed from the numbers."""
    peer, lines = rows.get("flow_grpo"), []
    if peer is None:
        return lines
    for side in ("ours", "ours_cached"):
        ours = rows.get(side)
        if ours is None:
            continue
        t, m = ours["seconds"] / peer["seconds"], ours["peak_mb"] / peer["peak_mb"]
        diff = {k: ours["parts"][k] - peer["parts"][k] for k in PART_NAMES}
        order = sorted(PART_NAMES, key=lambda k: diff[k])
        lines.append(
            f"- {LABELS[side]}: time {t:.2f}x theirs per trained image ({'meets' if t <= 0.8 else 'misses'} the "
            f"0.8x goal); peak RSS {m:.2f}x ({'meets' if m <= 0.8 else 'misses'} it), what a round adds over its "
            f"start {ratio(ours['over_mb'], peer['over_mb'])}x ({fmt(ours['over_mb'])} vs {fmt(peer['over_mb'])} "
            f"MiB). Time differences per trained image, ours - theirs: " + ", ".join(
                f"{k} {diff[k] * 1e3:+.2f} ms ({diff[k] / peer['seconds']:+.0%} of theirs)" for k in order) + ".")
    ours = rows.get("ours")
    if ours is not None and "calls" in ours:
        theirs_rows, ours_rows = ours["calls"]
        measured = ours["parts"]["transformer forward"] / peer["parts"]["transformer forward"] - 1
        lines.append(
            f"- Transformer forwards: per image theirs runs {theirs_rows:g} CFG forwards (T sampling steps, then per "
            f"trained step the policy and the reference), ours {ours_rows:g}: the same plus a no-grad forward of the "
            f"second update's transitions (the old log-densities, see the differences below), "
            f"{ours_rows / theirs_rows - 1:+.0%} by count; measured {measured:+.0%} in transformer forward time.")
    if ours is not None:
        best = ours["floor_mb"] / peer["peak_mb"]
        lines.append(
            f"- The floor under the peaks: a fresh one-thread process that has only imported what a side imports holds "
            f"{fmt(ours['floor_mb'])} MiB for ours (torch, diffusers, transformers, peft, accelerate) and "
            f"{fmt(peer['floor_mb'])} MiB for theirs (the same, plus wandb, ml_collections, absl and its package): "
            f"ours cannot go below {best:.2f}x the peer's peak RSS on this tiny model whatever it holds. Above "
            f"those floors (the models, LoRA, optimizer, caches and a round's tensors) ours holds "
            f"{fmt(ours['above_mb'])} MiB, theirs {fmt(peer['above_mb'])}: "
            f"{ratio(ours['above_mb'], peer['above_mb'])}x.")
    return lines


DIFFERENCES = """\
- Same interpreter and libraries on both sides (this venv, plus the peer's missing dependencies on PYTHONPATH for
  both): the peer's setup.py pins older ones (diffusers 0.33.1, transformers 4.40, peft 0.10, accelerate 1.4,
  torch 2.6); its code ran on these unchanged.
- The peer runs as a one-process DDP job (its beta > 0 path needs `transformer.module`): DDP's forward wrapper and
  a gradient all-reduce over gloo with one rank; accelerate skips the all-reduce on accumulation micro-steps
  (no_sync). Ours is not wrapped (its LoRA gradients are all-reduced by hand, a no-op with one process).
- Trained steps: theirs the first int(0.99 T) of each image's T, ours int(0.99 T) drawn per image (the same count).
- Old log-densities: theirs the ones recorded while sampling; ours the training forward's own (exact ratio 1 on
  the first update, see grpo.py), which costs a no-grad forward of the second update's transitions before the
  first update (half the round's trained transitions, with CFG).
- Text: theirs encodes each sampling batch's prompts once and reuses the embeddings in training; ours encodes the
  prompts of each training forward again (its policy, old-log-prob and reference forwards) unless
  --cache_prompt_embeds, which is not passed (the grpo.py command as a user types it). Both: T5 at 128 tokens,
  the negative prompt encoded once.
- Theirs logs to wandb (disabled: its calls are no-ops, the images it logs every 10 epochs are still written as
  JPEGs to a temp folder at epoch 0, in the warm-up), computes rewards in a thread pool and loads prompts through a
  DataLoader worker process; ours logs metrics.jsonl. LoRA: both rank 32 on the same eight projections, theirs
  alpha 64 (scale 2), ours alpha 32 (scale 1): the same compute. Theirs per-prompt stat tracker with global std,
  ours --advantage_std batch: the same advantages."""


def main(args):
    started = time.time()
    reason = peer_available(args)
    if reason is not None:
        print(f"skipped: the Flow-GRPO side: {reason}", flush=True)
    if args.side == "both" and reason is not None:
        args.side = "ours"
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="bench-flow-grpo-")) \
            as folder:
        plan, s = jobs(args, folder)
        sides = (["flow_grpo"] if "flow_grpo" in plan else []) + [k for k in plan if k != "flow_grpo"]
        floors = {side: libraries_rss("flow_grpo" if side == "flow_grpo" else "ours", plan[side]["pythonpath"])
                  for side in sides}
        results = {side: [] for side in sides}
        for rep in range(args.repeats):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                out = run_side(plan[side], os.path.join(folder, f"{side}-{rep}"))
                results[side].append(out)
                where = f"[{rep + 1}/{args.repeats}] {side}"
                if out["status"] == "ok":
                    per = sum(out["seconds"]) / (len(out["seconds"]) * plan[side]["images_per_update"])
                    print(f"{where}: {per:.4f} CPU s / trained image, peak {out['peak_mb']:.0f} MiB "
                          f"(+{out['peak_mb'] - out['start_mb']:.1f})", flush=True)
                else:
                    print(f"{where}: failed: {out['reason']}", flush=True)
    images = plan["ours"]["images_per_update"]
    rows = {side: summary(results[side], images) for side in sides}
    K = int(s["fraction"] * s["T"])
    for side, r in rows.items():
        if r is not None:  # CFG forwards per image: theirs T + 2K (policy, reference), ours + K / 2 (old log-probs)
            r["calls"] = (s["T"] + 2 * K, s["T"] + 2 * K + K * (s["updates"] - 1) / s["updates"])
            r["floor_mb"] = floors[side]
            r["above_mb"] = r["peak_mb"] - floors[side]
    failures = [f"{side}: {r['reason']}" for side, rs in results.items() for r in rs if r["status"] != "ok"]
    table, parts, lines = results_table(rows), parts_table(rows), reading(rows)
    seconds = time.time() - started
    print("\n" + table + "\n\n" + parts + "\n\n" + "\n".join(lines) + f"\n\nbenchmark time: {seconds:.0f} s")
    if rows["ours"] is None:
        common.error("our side failed: " + "; ".join(failures))
    if args.output_dir is not None:
        body = [f"## Side by side with Flow-GRPO's train_sd3.py (tiny SD3, 32 px, T = {s['T']}, G = {s['G']}, "
                f"beta {s['beta']}, LoRA rank {s['rank']}, fp32)", "",
                *[line + "  " for line in common.header_lines(args, seconds, "CPU time of each one-thread process")],
                f"Peer: github.com/yifan123/flow_grpo at {PEER_COMMIT[:8]}, scripts/train_sd3.py unmodified" +
                (f"; not run: {reason}" if reason else "") +
                (f"; failed runs: {'; '.join(failures)}" if failures else ""), "",
                f"Protocol (benchmarks/flow_grpo_peer.py's docstring): each side trains with its own loop in a fresh "
                f"process, {args.repeats} alternating repetitions; per run one warm-up round (2 updates) then "
                f"{args.rounds} timed rounds of {s['batches'] * s['G']} images ({s['batches']} prompts x G = "
                f"{s['G']}, each image sampled with {s['T']} SDE steps and trained on int(0.99 T) = "
                f"{int(0.99 * s['T'])} of them, CFG {s['cfg']} in both, with the KL's reference forward), timed "
                f"between optimizer steps by a global optimizer-step hook. CPU s / trained image = the timed rounds' "
                f"CPU time / their images. Peak RSS: the process's VmHWM during the timed rounds (reset after the "
                f"warm-up); above its imports: minus the resident set of a fresh process that has only imported what "
                f"that side imports (median of 3); over their start: minus the resident set at the reset; up to the "
                f"timing: ru_maxrss "
                f"before the reset (loading and the warm-up round, the peer's evaluation included). Both sides have "
                f"the same images per round and per forward, so the memory ratios are per trained image too. "
                f"Ratio = ours / theirs. The `--cache_prompt_embeds` row is ours with that one flag added.", "",
                common.CPU_NOTE, "", table, "",
                "Where the time goes (CPU s per trained image, the median over runs; parts exclusive of each other; "
                "the rest: sampler arithmetic, rewards, advantages, data, logging, DDP's wrapper on the peer's "
                "side):", "", parts, "", "Reading (computed from the numbers above):", "", *lines, "",
                "Every difference that remains:", "", DIFFERENCES, ""]
        common.write_report(args.output_dir, "flow_grpo_peer", "\n".join(body))
    return dict(rows=rows, reason=reason, failures=failures)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--job"]:  # one side, in a fresh process
        with open(sys.argv[3], "w") as result:
            json.dump(run_job(json.loads(sys.argv[2])), result)
    else:
        main(parse_args())
