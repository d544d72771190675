"""What every benchmark in benchmarks/ shares: fresh one-thread worker processes, CPU time and peak memory of one
training iteration, the BENCHMARKS.md section writer, plots and number formatting.

A benchmark is one file with parse_args(argv) and main(args); it measures in fresh processes and writes its own
section of BENCHMARKS.md, leaving the others:

    context = common.fork_context(["drtune"])                    # a fork server that has imported the libraries
    result = common.run_in_fresh_process(context, common.time_iterations, job)   # dict(status="ok", seconds=...)
    common.write_report(args.output_dir, "fig7", body)           # replaces <!-- begin fig7 --> ... <!-- end fig7 -->

The function a worker runs takes the job dict and returns a dict; it must be defined at the top level of a module,
since it reaches the worker by pickle, by name. A new section's key goes into SECTIONS (its place in the file) and
PLACEHOLDERS (what the file says before it is measured).
"""

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
import statistics
import sys
import time
import traceback
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo: the training scripts and rewards.py
if ROOT not in sys.path:  # the workers import the scripts by name, whatever the current directory
    sys.path.insert(0, ROOT)

NUM_THREADS_HELP = ("torch CPU threads (default on CPU: 1, which keeps ratios stable when other processes share the "
                    "cores; several OpenMP threads on busy cores slow down by up to 10x)")
MMAP_HELP = ("CPU: glibc's M_MMAP_THRESHOLD (bytes) for the measured processes, so that freed large tensors go back to "
             "the system and the resident set follows live memory instead of heap fragmentation (costs a page fault "
             "per large allocation)")


def finish_args(args, name, argv=None):
    """The fields every benchmark reads besides its flags: the command for the report (`python -m benchmarks.<name>`
    and the flags as typed), the device, and one torch thread on CPU unless --num_threads says otherwise."""
    args.command = " ".join([f"python -m benchmarks.{name}", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.num_threads = getattr(args, "num_threads", None)
    if args.num_threads is None and args.device == "cpu":
        args.num_threads = 1
    return args


def model_tag(model):
    """'' for a UNet pipeline, '_sd3' or '_flux' for a flow one: the suffix of a benchmark's section and figure when
    it runs on the SD3 world instead of the SD1.5 one (both sections stay in BENCHMARKS.md)."""
    import drtune
    from diffusers import DiffusionPipeline
    family = drtune.detect_family(DiffusionPipeline.load_config(model))
    return "" if family in ("sd15", "sdxl") else f"_{family}"


def error(message):
    """Exit as argparse does: `<script>: error: <message>`."""
    sys.exit(f"{os.path.basename(sys.argv[0])}: error: {message}")


def set_malloc_mmap_threshold(args):
    """--malloc_mmap_threshold: read by glibc at the start of each process measured from here on (call it before the
    first worker starts the fork server)."""
    if args.malloc_mmap_threshold is not None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)


# ---------------------------------------------------------------------------------------------
# Fresh processes: each measured job runs alone in a process forked from a server that has imported the libraries
# ---------------------------------------------------------------------------------------------


class Skip(Exception):
    """The script refuses this configuration (its flags or its argument checks)."""


def fork_context(scripts):
    """A forkserver context whose server has imported the libraries and the scripts: fresh, cheap processes."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "numpy", "accelerate", "peft", "rewards",
                                    *[m for m in dict.fromkeys(scripts) if importlib.util.find_spec(m)],
                                    "diffusers.models.unets.unet_2d_condition",
                                    "diffusers.models.autoencoders.autoencoder_kl",
                                    "transformers.models.clip.modeling_clip"])
    return context


def worker(fn, job):
    """fn(job) in this (fresh) process, with job["num_threads"] torch threads if given; returns a dict with its
    status and never raises."""
    try:
        if job.get("num_threads"):
            torch.set_num_threads(job["num_threads"])
        return dict(status="ok", **fn(job))
    except Skip as e:
        return dict(status="skipped", reason=str(e))
    except torch.OutOfMemoryError:
        return dict(status="oom", reason="out of memory")
    except Exception as e:  # reported in the table; the run goes on with the next configuration
        return dict(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0][:200],
                    traceback=traceback.format_exc())


def run_in_fresh_process(context, fn, job):
    """worker(fn, job) in a new process of context; a process that dies is reported as failed."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(worker, fn, job).result()
        except concurrent.futures.process.BrokenProcessPool:
            return dict(status="failed", reason="the worker process died (out of memory?)")


def run_parallel(context, fn, jobs, n):
    """run_in_fresh_process for each job, n at a time; the results in the order of jobs."""
    with concurrent.futures.ThreadPoolExecutor(max(1, n)) as pool:
        return list(pool.map(lambda job: run_in_fresh_process(context, fn, job), jobs))


# ---------------------------------------------------------------------------------------------
# Measuring: memory, the script's setup and clock, one training iteration
# ---------------------------------------------------------------------------------------------


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


def prepare(job):
    """What main() of a script does before its loop, for job["module"] with job["argv"]: its flags parsed and checked
    (Skip if it refuses them), accelerate, the models, LoRA (gradient checkpointing if asked, at the script's
    granularity), AdamW on job["device"]; and this process's clock."""
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
    optimizer = accelerator.prepare(script.make_optimizer(params, args, device))
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


class CountCalls:
    """reward_fn, counting its calls."""

    def __init__(self, fn, counts):
        self.fn, self.counts = fn, counts

    def __call__(self, *args, **kwargs):
        self.counts["reward"] += 1
        return self.fn(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)


def prepare_counted(job):
    """prepare(job), plus what the training loop needs (the script's reward and scheduler), with every UNet, decode
    and reward call of the forward passes counted in s.counts by kind: unet_nograd, unet_grad (input detached),
    unet_grad_input, decode_grad, decode_nograd, reward. Calls made while s.in_backward[0] is set (a call
    checkpoint reruns its call in the backward) are not counted."""
    import rewards
    s = prepare(job)
    s.counts, s.in_backward = collections.Counter(), [False]
    s.reward_fn = CountCalls(rewards.build_reward(s.args.reward, device=s.device, dtype=s.weight_dtype,
                                                  **s.info["reward_options"]), s.counts)
    s.scheduler = s.script.make_scheduler(s.args)

    def count_unet(module, inputs):  # inputs[0]: the latents (2B with CFG)
        grad = torch.is_grad_enabled()
        if not s.in_backward[0]:
            s.counts["unet_grad_input" if grad and inputs[0].requires_grad else "unet_grad" if grad
                     else "unet_nograd"] += 1

    def count_decode(module, inputs):
        if not s.in_backward[0]:
            s.counts["decode_grad" if torch.is_grad_enabled() else "decode_nograd"] += 1

    s.models.unet.register_forward_pre_hook(count_unet)
    s.models.vae.decoder.register_forward_pre_hook(count_decode)
    return s


def full_backprop_loss(script, models, scheduler, unet, reward_fn, prompts, generator, args):
    """DRaFT-T / naive backprop: every step under gradient, through the UNet inputs, no early stop."""
    cond = script.encode_prompts(models, prompts, args.resolution)
    latents = script.initial_latents(models, args, len(prompts), generator, unet.device)
    x0 = script.rollout(unet, scheduler, cond, latents, generator, args,
                        grad_steps=set(range(args.num_inference_steps)), stop_grad_input=False)
    reward = script.compute_reward(reward_fn, script.decode(models.vae, x0), prompts, args)
    return -reward.mean(), reward, {}


def time_iterations(job):
    """Worker: job["warmup"] + job["iters"] iterations of the body of a script's training loop (algorithm_loss, or
    full_backprop_loss with job["loss"] == "full_backprop"; backward, clipping, AdamW), each drawing its prompts
    and noise from the script's step_generator. Returns the seconds and call counts of each timed iteration and the
    memory after loading and at its peak."""
    s = prepare_counted(job)
    script, args, accelerator, models, params, optimizer, clock = (
        s.script, s.args, s.accelerator, s.models, s.params, s.optimizer, s.clock)
    loss_fn = functools.partial(full_backprop_loss, script) if job["loss"] == "full_backprop" else script.algorithm_loss

    def iteration(step):
        generator = script.step_generator(args, 0, step)
        idx = torch.randint(len(args.train_prompt_list), (args.train_batch_size,), generator=generator)
        prompts = [args.train_prompt_list[i] for i in idx]
        with accelerator.autocast():
            loss, reward, extra = loss_fn(models, s.scheduler, models.unet, s.reward_fn, prompts, generator, args)
        s.in_backward[0] = True
        accelerator.backward(loss)
        s.in_backward[0] = False
        accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(s.device)
    base = memory_mb(s.device)
    seconds, per_iteration_counts = [], []
    for step in range(1, job["warmup"] + job["iters"] + 1):
        s.counts.clear()
        start = clock()
        iteration(step)
        if step > job["warmup"]:
            seconds.append(clock() - start)
            per_iteration_counts.append(dict(s.counts))
    peak = memory_mb(s.device, peak=True)
    return dict(seconds=seconds, counts=per_iteration_counts, memory_base_mb=base, memory_peak_mb=peak,
                clock=s.clock_name)


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------


def latent_floor_mib(model, resolution, batch_size):
    """One trained step's input, the latents (B, C, h, w) in fp32: what a backward through a chain must keep."""
    with open(os.path.join(model, "unet", "config.json")) as f:
        channels = json.load(f)["in_channels"]
    with open(os.path.join(model, "vae", "config.json")) as f:
        factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    return batch_size * channels * (resolution // factor) ** 2 * 4 / 2 ** 20


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


# ---------------------------------------------------------------------------------------------
# Numbers and plots
# ---------------------------------------------------------------------------------------------


def fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values, digits=4):
    m, s = mean_std(values)
    return "—" if m is None else f"{m:.{digits}g} ± {s:.2g}"


def slope(rows, x, y, intercept=False):
    """Least-squares slope (and intercept) of y against x over rows (None with fewer than two distinct x)."""
    xs, ys = [r[x] for r in rows], [y(r) for r in rows]
    if len(set(xs)) < 2:
        return None
    fit = [float(v) for v in np.polyfit(xs, ys, 1)]
    return fit if intercept else fit[0]


def markdown_table(head, rows):
    """A markdown table: the header cells, then one list of cells per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


@contextlib.contextmanager
def figure(path, *args, **kwargs):
    """plt.subplots(*args, **kwargs) as (fig, axes); on leaving the block, laid out, saved to path (100 dpi) and
    closed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(*args, **kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# BENCHMARKS.md: one section per benchmark, each replaced by its own run
# ---------------------------------------------------------------------------------------------

HEADER = """# Benchmarks

Generated by the scripts in `benchmarks/` (`python -m benchmarks.<name>`): do not edit by hand. Each one replaces
its own section below and leaves the others.

- **One iteration** = what the training loop does per optimizer step for a batch of B prompts: `algorithm_loss`,
  backward, gradient clipping and the AdamW step on the LoRA weights. Warm-up iterations are excluded; the
  median of N is reported. Each configuration runs in a fresh process.
- **DRTune** rows use t_min = 1 (`--early_stop_max 1`): all T steps run, T - K of them under no_grad, K with
  gradient. **DRTune, early stop** rows draw t_min in [1, 0.4 T] as training does, from the seeded per-step
  generator (the same draws every run).
- **Full backprop** (DRaFT-T, naive backprop): every step under gradient, through the UNet inputs, no early stop;
  the same decode, reward and backward.
- **Other methods** (DRaFT-K, DRaFT-LV, ReFL, AlignProp, when their scripts exist) run their own
  `algorithm_loss` with the flags of `METHODS` in benchmarks/sweep.py; their random draws (stop step, truncation)
  come from the same seeded per-step generator.
- **Parts** are timed alone; each iteration counts its UNet / decode / reward calls, and
  **ratio** = iteration time / sum of (count x part time): close to 1 means no hidden overhead.
- **Memory**: on CUDA, `torch.cuda.max_memory_allocated` (total, and above the loaded models); on CPU, the
  process's peak resident set (VmHWM, reset after loading, freed heap pages first given back with malloc_trim)
  minus its resident set with models, LoRA and optimizer loaded.
- **Time**: wall-clock on a GPU; on CPU with one torch thread (the default), the process's CPU time, which other
  processes sharing the cores do not inflate. **CPU figures are for ratios only**; absolute times and memory
  that count come from a GPU.
- **Fig. 7** (`benchmarks.fig7`): the LoRA gradient norm (before clipping) of DRaFT-K's first backward at the base
  model against K, with and without stop-gradient on the UNet input (draft.py's `--stop_grad_unet_input`).
- **Table 1** (`benchmarks.table1`): every method trained by its script's own `main()` (`--preset demo`) for the
  same CPU budget per run (max_train_steps from a probed CPU time per step), final reward on held-out prompts,
  several seeds. Sizes are scaled down to a shared 2-core CPU: see each section.
- **Fig. 8 and 9** (`benchmarks.drtune_ablation`): DRTune's reward gain against K and against m on the tiny world,
  Table 1's protocol.
- **DPO** and **SPO** (`benchmarks.preference --dpo`, `--spo`): one training step of dpo.py (offline, pairs from a
  parquet) and of spo.py (sampling the pairs, then training on them) against the batch size, timed in parts; each
  adds a section of its own for a full-size model with `--full_size`.
- **Peers** (`benchmarks.peers`): alignprop.py and dpo.py next to TRL's AlignPropTrainer and diffusers'
  `train_diffusion_dpo.py`, each with its own training loop in fresh processes, alternating; ratios ours / peer.
- **Step preference** (`benchmarks.step_preference`): on the trained tiny world, whether the candidate that wins
  SPO's comparison at a step also ends as the better final image, per step and CFG scale.
- **SPO's labels** (`benchmarks.spo_labels`): spo.py on the tiny world with a brightness preference whose labels are
  right, swapped or random, per CFG scale: whether the final image moves the way the labels say.
- **Preference methods on the world** (`benchmarks.world_preference`): offline DPO on pairs built from the world,
  online DPO with a frozen and a moving reference, and SPO, each by its script's `main()` for the same reward,
  sampler and CPU budget; reward gain per CPU second and whether the prompts are still drawn.
- **Gallery** (`benchmarks.gallery`): every `--preset demo` on the tiny world, before and after, read back from
  the pixels; `docs/gallery.png`, shown in the README.
- **Checkpointing** (`benchmarks.checkpointing`): the peak memory per trained step of a backprop through the chain
  under each `--checkpointing_granularity` (and none), next to the floor: one step's input latents.

"""
# The order of the sections in the file; keys not listed (e.g. dpo_full_size_sdxl, once measured) follow.
SECTIONS = ["peers", "checkpointing", "tiny", "full_size_sd15", "full_size_sdxl", "fig7", "table1", "drtune_ablation",
            "dpo", "spo", "step_preference", "spo_labels", "world_preference", "gallery", "flow_full_size", "fig7_sd3",
            "drtune_ablation_sd3", "gallery_sd3", "grpo_world", "grpo_world_sd3", "grpo_backprop",
            "flow_grpo_peer", "memory_plan", "memory_plan_gpu"]
PLACEHOLDERS = {"memory_plan": "## Memory per GPU on real models, planned\n\nNot computed yet: run `python -m "
                               "benchmarks.memory_plan`.\n",
                "memory_plan_gpu": "## Memory per GPU: one denoiser step measured\n\nNot measured yet: it needs a "
                                   "GPU. Run `python -m benchmarks.memory_plan --measure` on one.\n",
                "grpo_world": "## GRPO on the world's two-shape placement\n\nNot measured yet: run `python -m "
                              "benchmarks.grpo_world`.\n",
                "grpo_backprop": "## GRPO against reward backpropagation\n\nNot measured yet: run `python -m "
                                 "benchmarks.grpo_backprop`.\n",
                "fig7": "## Fig. 7 on the tiny model\n\nNot measured yet: run `python -m benchmarks.fig7`.\n",
                "checkpointing": "## Gradient checkpointing granularities\n\nNot measured yet: run `python -m "
                                 "benchmarks.checkpointing`.\n",
                "peers": "## Side by side with the public implementations\n\nNot measured yet: run `python -m "
                         "benchmarks.peers` (see its --help).\n",
                "flow_grpo_peer": "## Side by side with Flow-GRPO's train_sd3.py\n\nNot measured yet: run `python -m "
                                  "benchmarks.flow_grpo_peer` (see its docstring).\n",
                "dpo": "## Offline Diffusion-DPO\n\nNot measured yet: run `python -m benchmarks.preference --dpo`.\n",
                "spo": "## SPO\n\nNot measured yet: run `python -m benchmarks.preference --spo`.\n",
                "step_preference": "## Does a step-level win carry to the final image?\n\nNot measured yet: run "
                                   "`python -m benchmarks.step_preference`.\n",
                "world_preference": "## Preference methods on the tiny world\n\nNot measured yet: run `python -m "
                                    "benchmarks.world_preference`.\n",
                "drtune_ablation": "## DRTune against K and m\n\nNot measured yet: run `python -m "
                                   "benchmarks.drtune_ablation`.\n",
                "gallery": "## Gallery\n\nNot made yet: run `python -m benchmarks.gallery`.\n",
                "flow_full_size": "## Real-size flow models on CPU\n\nNot measured yet: run `python -m "
                                  "benchmarks.flow_full_size`.\n",
                "table1": "## Miniature Table 1\n\nNot measured yet: run `python -m benchmarks.table1`.\n",
                **{f"full_size_{name}": f"## Full-size {title}, random weights\n\nNot measured yet: it needs a GPU. "
                   f"Run `python -m benchmarks.sweep --full_size {name}` on one; it replaces this section.\n"
                   for name, title in [("sd15", "SD1.5 (512 px)"), ("sdxl", "SDXL (1024 px)")]}}
CPU_NOTE = "**CPU figures: read the ratios, not the absolute times.**"


def write_section(path, key, body):
    """Replace the section `key` of the report at path with body (the HEADER and the other sections kept)."""
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    sections = {m.group(1): m.group(2) for m in re.finditer(r"<!-- begin (\w+) -->\n(.*?)<!-- end \1 -->", old, re.S)}
    sections[key] = body
    keys = SECTIONS + [k for k in sections if k not in SECTIONS]
    text = HEADER + "".join(f"<!-- begin {k} -->\n{sections.get(k, PLACEHOLDERS.get(k, ''))}<!-- end {k} -->\n\n"
                            for k in keys)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n")


def write_report(output_dir, key, body):
    """write_section on output_dir/BENCHMARKS.md."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "BENCHMARKS.md")
    write_section(path, key, body)
    print(f"wrote {path}")


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


def header_lines(args, seconds, clock):
    """Command, machine, date, duration, load and clock: the first lines of a section."""
    load = os.getloadavg()
    return [f"Command: `{args.command}`  ", f"Machine: {machine(args)}  ",
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; the whole run took "
            f"{seconds / 60:.1f} min; load average at the end {load[0]:.1f}; times are {clock}"]
