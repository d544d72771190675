"""Gradient checkpointing: peak memory per trained step and time of each --checkpointing_granularity (call, block,
both) and none, next to the floor (one step's input latents), on tiny SD1.5.

Two backprops through the sampling chain, each configuration in a fresh process (common.time_iterations):
full backprop (every step under gradient through the UNet inputs, then decode and reward; DRaFT-T) at several T,
whose peak-memory slope over T is the memory per trained step; and DRTune with K=1 (one UNet call with gradient,
like ReFL) at the largest T. On CPU the measured processes run with glibc's mmap threshold at 64 KiB by default, so
that the resident set follows live memory rather than heap fragmentation. Writes the checkpointing section of
BENCHMARKS.md.

    python -m benchmarks.checkpointing                              # 128 px, T in (5, 10, 20): a few minutes
    python -m benchmarks.checkpointing --quick --output_dir /tmp/b  # seconds: 32 px, T in (2, 4), one iteration
"""

import argparse
import os
import statistics
import sys
import time

if not __package__:  # python benchmarks/checkpointing.py: the repo root on the path instead of benchmarks/, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common
from benchmarks.common import fmt, slope

GRANULARITIES = ["off", "call", "block", "both"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.path.join(common.ROOT, "tiny_models", "sd15"), help="pipeline")
    parser.add_argument("--resolution", type=int, default=128,
                        help="px (larger than the sweep's, so that one call's activations stand out of the "
                             "resident-set noise)")
    parser.add_argument("--train_batch_size", type=int, default=2, help="B")
    parser.add_argument("--T", type=int, nargs="+", default=[5, 10, 20],
                        help="sampling steps of full backprop; DRTune K=1 runs at the largest")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default="ddpm")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="CFG")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--malloc_mmap_threshold", type=int, default=None,
                        help=common.MMAP_HELP + "; default on CPU: 65536")
    parser.add_argument("--iters", type=int, default=3,
                        help="timed iterations per configuration; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true",
                        help="32 px, T in (2, 4), 1 iteration, no warm-up: a seconds-long smoke")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md (default: the repo; --quick writes files only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "checkpointing", argv)
    if args.quick:
        args.resolution, args.T, args.iters, args.warmup = 32, [2, 4], 1, 0
    if args.malloc_mmap_threshold is None and args.device == "cpu":
        args.malloc_mmap_threshold = 65536
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


def checkpointing_plan(args):
    """Full backprop (every step trained, through the UNet inputs) at several T, and DRTune with one trained step
    (a single UNet call with gradient, as ReFL), at every granularity."""
    jobs = []
    for granularity in GRANULARITIES:
        flags = [] if granularity == "off" else ["--gradient_checkpointing", "--checkpointing_granularity", granularity]
        chain = [("full backprop", -1, T, None) for T in args.T]
        for label, entry, T, K in [*chain, ("DRTune, K=1", 0, max(args.T), 1)]:
            argv = ["--num_inference_steps", str(T), "--mixed_precision", args.mixed_precision, "--reward", "symmetry",
                    "--report_to", "none", "--seed", "0", "--pretrained_model_name_or_path", args.model,
                    "--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch_size),
                    "--sampler", args.sampler, "--guidance_scale", str(args.guidance_scale), "--rank", str(args.rank),
                    *flags, "--num_trained_steps", str(K or 1), "--early_stop_max", "1"]
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
                   f"; the floor (one step's input latents) is {floor:.4f} MiB. The call checkpoint is reentrant "
                   f"(no autograd graph kept until the backward); diffusers' per-block one is not: on CPU the "
                   f"resident set also holds the graph each of those keeps (nodes and holders, no activations), "
                   f"which a GPU's allocated memory does not count.")
    T_max = max((r["T"] for r in ok), default=None)
    full = {r["granularity"]: r for r in ok if r["entry"] == -1 and r["T"] == T_max}
    one = {r["granularity"]: r for r in ok if r["entry"] == 0}
    for name, group in [(f"full backprop T={T_max} ({T_max} trained calls)", full),
                        ("DRTune K=1 (one trained call)", one)]:
        if len(group) == len(GRANULARITIES):
            best = min(group.values(), key=lambda r: r["memory_delta_mb"])
            out.append(f"{name}: peak " + ", ".join(f"{g} {fmt(group[g]['memory_delta_mb'])} MiB" for g in group) +
                       "; time against off " +
                       ", ".join(f"{g} {group[g]['seconds_median'] / group['off']['seconds_median']:.2f}x"
                                 for g in group if g != "off") +
                       f". Lowest peak: {best['granularity']}.")
    return "\n".join(f"- {s}" for s in out)


def main(args):
    common.set_malloc_mmap_threshold(args)
    started = time.time()
    context = common.fork_context(["drtune"])
    shared = dict(device=args.device, num_threads=args.num_threads, warmup=args.warmup, iters=args.iters)
    rows = []
    jobs = checkpointing_plan(args)
    for i, job in enumerate(jobs, 1):
        row = dict(job, **common.run_in_fresh_process(context, common.time_iterations, dict(job, **shared)))
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
    floor = common.latent_floor_mib(args.model, args.resolution, args.train_batch_size)
    seconds = time.time() - started
    clock = next((r["clock"] for r in rows if r["status"] == "ok" and "clock" in r),
                 "CPU time of the process (one torch thread)" if args.device == "cpu" else "wall-clock time")
    table, text = checkpointing_table(rows, floor), checkpointing_reading(rows, floor)
    print("\n" + table + "\n\n" + text + f"\n\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None:
        settings = (f"`{os.path.relpath(args.model, common.ROOT)}`, {args.resolution} px (larger than the sweep's, so "
                    f"that one call's activations stand out of the resident-set noise), batch {args.train_batch_size}, "
                    f"{args.sampler}, CFG {args.guidance_scale}, symmetry reward, LoRA rank {args.rank}, mixed "
                    f"precision {args.mixed_precision}; {args.warmup} warm-up + median of {args.iters} iterations, "
                    f"each configuration in a fresh process" + (
                        f", glibc's mmap threshold at {args.malloc_mmap_threshold} bytes (freed large tensors go back "
                        f"to the system, so the resident set follows live memory, not heap fragmentation; each large "
                        f"allocation then costs page faults, which the times include)"
                        if args.malloc_mmap_threshold is not None else "") +
                    ". Full backprop: every step under gradient through the UNet "
                    f"inputs, then decode and reward (DRaFT-T; AlignProp trains a suffix of such steps). DRTune K=1: "
                    f"one UNet call with gradient (like ReFL, DRaFT-1). Granularities (`--checkpointing_granularity` "
                    f"with `--gradient_checkpointing`): call = each UNet call and decode with gradient one checkpoint; "
                    f"block = diffusers' per-block checkpointing; both = blocks inside the call checkpoint; off = "
                    f"none.")
        body = ["## Gradient checkpointing: memory per trained step and time of each granularity", "",
                *common.header_lines(args, seconds, clock), "", settings, ""]
        if args.device == "cpu":
            body += [common.CPU_NOTE, ""]
        body += [table, "", "Reading (computed from the numbers above):", "", text, ""]
        common.write_report(args.output_dir, "checkpointing", "\n".join(body))
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main(parse_args())
