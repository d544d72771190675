"""Seconds per iteration and peak memory of DRTune against T and K, next to full backprop and the other methods;
on a GPU, the same at full size (random weights, the paper's settings).

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
Each run replaces its own section of BENCHMARKS.md: tiny, tiny_checkpointing_<granularity> or full_size_<name>.

    python -m benchmarks.sweep                                # tiny SD1.5 on CPU, a few minutes: bench_drtune.png
    python -m benchmarks.sweep --quick --output_dir /tmp/b    # seconds; what tests/test_benchmarks.py runs
    python -m benchmarks.sweep --gradient_checkpointing       # the sweep with checkpointing (its own section)
    python -m benchmarks.sweep --full_size sdxl               # GPU: random-weight SDXL at 1024, the paper's settings
    python -m benchmarks.sweep --full_size sd15 --allow_cpu   # CPU smoke of the full-size path (64 px, T=1, K=1)

The GPU sections, all in one go on one GPU (each replaces its placeholder in BENCHMARKS.md):

    for m in sd15 sdxl; do for b in sweep "preference --dpo" "preference --spo"; do
        python -m benchmarks.$b --full_size $m || break 2; done; done
"""

import argparse
import datetime
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

if not __package__:  # python benchmarks/sweep.py: the repo root on the path instead of benchmarks/, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common
from benchmarks.common import fmt, slope
from benchmarks.full_size import FULL_SIZE, build_full_size, require_gpu

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
# Arguments and the list of configurations
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.path.join(common.ROOT, "tiny_models", "sd15"),
                        help="pipeline of the T/K sweep")
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
                        help="in the sweep, its own section (full size: always, as the paper)")
    parser.add_argument("--checkpointing_granularity", choices=["call", "block", "both"], default="call",
                        help="the scripts' --checkpointing_granularity, with --gradient_checkpointing")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=None,
                        help=common.MMAP_HELP + "; default: glibc's own")
    parser.add_argument("--iters", type=int, default=3,
                        help="timed iterations per configuration; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--part_repeats", type=int, default=5, help="timed calls per part; the median is reported")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
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
                        help="folder of BENCHMARKS.md and bench_drtune.png (default: the repo; --quick and the CPU "
                             "smoke write files only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "sweep", argv)
    args.smoke = args.full_size is not None and args.device == "cpu"
    if args.quick:
        args.resolution, args.T, args.K, args.iters, args.warmup, args.part_repeats = 32, [2, 4], [1, 2], 2, 0, 1
    if args.smoke:  # one iteration of one step: the point is building, saving and loading the full-size model
        args.T, args.K, args.iters, args.warmup, args.part_repeats = [1], [1], 1, 0, 1
        args.methods = args.methods or ["DRTune", "full backprop"]
    elif args.full_size:
        args.T, args.K = [FULL_SIZE[args.full_size]["T"]], [FULL_SIZE[args.full_size]["K"]]
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.full_size and not args.smoke else "no"
    if args.output_dir is None and not (args.quick or args.smoke):
        args.output_dir = common.ROOT
    return args


def base_argv(args, T, model_folder):
    """Flags every configuration shares: the sweep's, or the paper's settings with a local random-weight model."""
    shared = ["--num_inference_steps", str(T), "--mixed_precision", args.mixed_precision, "--reward", "symmetry",
              "--report_to", "none", "--seed", "0"]
    if args.full_size is None:
        return shared + ["--pretrained_model_name_or_path", args.model, "--resolution", str(args.resolution),
                         "--train_batch_size", str(args.train_batch_size), "--sampler", args.sampler,
                         "--guidance_scale", str(args.guidance_scale), "--rank", str(args.rank)] + \
            (["--gradient_checkpointing", "--checkpointing_granularity", args.checkpointing_granularity]
             if args.gradient_checkpointing else [])
    batch = 1 if args.smoke else FULL_SIZE[args.full_size]["batch"]
    argv = shared + ["--pretrained_model_name_or_path", model_folder, "--train_batch_size", str(batch), "--rank", "128",
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
# Parts: each timed alone in one process (the iterations: common.time_iterations)
# ---------------------------------------------------------------------------------------------

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


def time_parts(job):
    """Worker: the median seconds of each part, timed alone, on the tensors an iteration of job would see."""
    s = common.prepare_counted(job)
    script, args, models, unet, accelerator, params, optimizer = (
        s.script, s.args, s.models, s.models.unet, s.accelerator, s.params, s.optimizer)
    repeats = job["repeats"]
    generator = torch.Generator().manual_seed(0)
    prompts = args.train_prompt_list[: args.train_batch_size]
    cond = script.encode_prompts(models, prompts, args.resolution)
    latents = script.initial_latents(models, args, len(prompts), generator, unet.device)  # (B, C, h, w)
    s.scheduler.set_timesteps(args.num_inference_steps, device=latents.device)
    t = s.scheduler.timesteps[len(s.scheduler.timesteps) // 2]

    def timed(fn, before=None):
        seconds = []
        for _ in range(repeats + (repeats > 1)):  # with several calls, the first one warms up
            if before is not None:
                before()
            start = s.clock()
            fn()
            seconds.append(s.clock() - start)
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
            score = script.compute_reward(s.reward_fn, images, prompts, args)
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
    before = common.memory_mb(unet.device)
    script.cache_prompt_embeds(models, args.train_prompt_list)
    out.update(prompts_cached=timed(lambda: script.encode_prompts(models, prompts, args.resolution)),
               text_encoders_freed_mb=before - common.memory_mb(unet.device) if unet.device.type == "cuda" else 0.0)
    return dict(clock=s.clock_name, parts=out)


# ---------------------------------------------------------------------------------------------
# Results: ratios, tables, reading, plot, the section
# ---------------------------------------------------------------------------------------------


def summarize(row, parts):
    """Median time, mean call counts, and the median over iterations of time / (sum of counted parts)."""
    if row["status"] != "ok":
        return row
    predicted = [sum(n * parts[k] for k, n in c.items()) + parts["other"] for c in row["counts"]]
    row.update(seconds_median=statistics.median(row["seconds"]), parts_seconds=statistics.median(predicted),
               ratio=statistics.median(s / p for s, p in zip(row["seconds"], predicted)),
               memory_delta_mb=row["memory_peak_mb"] - row["memory_base_mb"],
               passes={k: float(np.mean([c.get(k, 0) for c in row["counts"]]))
                       for k in PARTS if k not in ("other", "prompts", "prompts_cached")})
    return row


def passes_text(p):
    return f"{fmt(p['unet_nograd'])} / {fmt(p['unet_grad'] + p['unet_grad_input'])}"


def results_table(rows, device, gib):
    unit, scale = ("GiB", 2 ** 10) if gib else ("MiB", 1)
    cuda = device == "cuda"
    head = ["method", "T", "K", "UNet passes no-grad / grad", "s / iteration", "parts sum (s)", "ratio",
            f"peak over loaded models ({unit})"] + ([f"peak allocated ({unit})"] if cuda else [])
    cells = []
    for r in rows:
        k = "—" if r["K"] is None else str(r["K"])
        if r["status"] != "ok":
            reason = r["reason"].replace("|", "/")  # a table cell
            cells.append([r["label"], str(r["T"]), k, "", f"{r['status']}: {reason}", "", "", ""] +
                         ([""] if cuda else []))
        else:
            cells.append([r["label"], str(r["T"]), k, passes_text(r["passes"]), fmt(r["seconds_median"]),
                          fmt(r["parts_seconds"]), f"{r['ratio']:.2f}", fmt(r["memory_delta_mb"] / scale)] +
                         ([fmt(r["memory_peak_mb"] / scale)] if cuda else []))
    return common.markdown_table(head, cells)


def parts_table(parts):
    lines = ["| part | ms per call |", "|---|---|"]
    lines += [f"| {PARTS[k]} | {fmt(1000 * parts[k])} |" for k in PARTS if k in parts]
    if parts.get("text_encoders_freed_mb"):
        lines += ["", f"--cache_prompt_embeds frees {fmt(parts['text_encoders_freed_mb'] / 2 ** 10)} GiB of "
                      f"accelerator memory (the text encoders moved to the CPU)."]
    return "\n".join(lines)


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
    ok = [r for r in rows if r["status"] == "ok" and r["entry"] in (0, -1)]
    with common.figure(path, 1, 2, figsize=(10, 4)) as (fig, axes):
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


def section(args, rows, parts, extra, seconds):
    if args.full_size:
        spec = FULL_SIZE[args.full_size]
        title = f"## Full-size {spec['title']}, random weights, the paper's settings"
        settings = (f"The paper's settings (`{' '.join(spec['flags'])}`, T={spec['T']}, K={spec['K']}) on a "
                    f"random-weight model built from the configs in benchmarks/full_size.py ({extra}), batch "
                    f"{spec['batch']}, {args.mixed_precision} frozen weights, "
                    f"fp32 LoRA rank 128, gradient checkpointing. Reward: symmetry (no weights); the paper's reward "
                    f"models add their own memory (HPS v2.1 is a ViT-H-14, about 1 B parameters: about 2 GiB in "
                    f"bf16 plus the activations of its backward at 224 px).")
    else:
        title = "## Tiny model: DRTune against T and K, next to full backprop" + (
            f" (--gradient_checkpointing, granularity {args.checkpointing_granularity})" if args.gradient_checkpointing
            else "")
        settings = (f"`{os.path.relpath(args.model, common.ROOT)}`, {args.resolution} px, batch "
                    f"{args.train_batch_size}, {args.sampler}, CFG {args.guidance_scale}, symmetry reward, LoRA rank "
                    f"{args.rank}, mixed precision {args.mixed_precision}, gradient checkpointing "
                    f"{'on' if args.gradient_checkpointing else 'off'}; {args.warmup} warm-up + median of {args.iters} "
                    f"iterations; parts: median of {args.part_repeats}.")
    load = os.getloadavg()
    text = [title, "", f"Command: `{args.command}`  ", f"Machine: {common.machine(args)}  ",
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; the whole run took "
            f"{seconds / 60:.1f} min; load average at the end {load[0]:.1f} (other processes share the CPU when it "
            f"exceeds the cores); times are {args.clock}", "", settings, ""]
    if args.device == "cpu":
        text += [common.CPU_NOTE, ""]
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
        floor = common.latent_floor_mib(args.model, args.resolution, args.train_batch_size)
        text += ["Reading (computed from the numbers above):", "", reading(rows, parts, floor), ""]
        if not args.gradient_checkpointing:
            text += ["![time and memory against T](bench_drtune.png)", ""]
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(args):
    common.set_malloc_mmap_threshold(args)
    require_gpu(args)
    started = time.time()
    context = common.fork_context([e[1] for e in METHODS + [FULL_BACKPROP]])
    shared = dict(device=args.device, num_threads=args.num_threads)
    with tempfile.TemporaryDirectory(prefix="bench-full-size-") as folder:
        extra = build_full_size(context, args, folder) if args.full_size else ""
        jobs = plan(args, folder)
        if not jobs:
            common.error(f"no configuration to run (--methods {args.methods})")
        parts = common.run_in_fresh_process(context, time_parts, dict(jobs[0], repeats=args.part_repeats, **shared))
        if parts["status"] != "ok":
            common.error(f"timing the parts failed: {parts['reason']}\n{parts.get('traceback', '')}")
        parts, args.clock = parts["parts"], parts["clock"]
        print("parts (ms): " + ", ".join(f"{k} {1000 * v:.1f}" for k, v in parts.items() if k in PARTS), flush=True)
        rows = []
        for i, job in enumerate(jobs, 1):
            result = common.run_in_fresh_process(context, common.time_iterations,
                                                 dict(job, warmup=args.warmup, iters=args.iters, **shared))
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
        print(reading(rows, parts, common.latent_floor_mib(args.model, args.resolution, args.train_batch_size)))
    print(f"\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        key = f"full_size_{args.full_size}" if args.full_size else \
            f"tiny_checkpointing_{args.checkpointing_granularity}" if args.gradient_checkpointing else "tiny"
        if not args.full_size and not args.gradient_checkpointing:
            plot(rows, os.path.join(args.output_dir, "bench_drtune.png"), args.clock)
        common.write_report(args.output_dir, key, section(args, rows, parts, extra, seconds))
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main(parse_args())
