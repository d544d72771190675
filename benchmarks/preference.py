"""The preference methods' training step against the batch size: offline Diffusion-DPO (dpo.py, --dpo) and SPO
(spo.py, --spo), seconds per step in parts and peak memory, on the tiny pipelines or, with --full_size on a GPU, a
random-weight full-size one.

- --dpo: one step as dpo.py's loop runs it: the next B pairs from a Pick-a-Pic parquet made here (smooth random
  JPEGs), the VAE encoding of winners and losers, `algorithm_loss` (policy with gradient, reference = the same UNet
  with its LoRA off, under no_grad), backward, clipping, AdamW. Tiny SD1.5 and SDXL, B in 1 2 4 8.
- --spo: one step as spo.py runs it on one process: `sample_pairs` for B prompts, then `spo_loss` + backward over
  all the pairs in chunks of --pair_batch_size, clipping, AdamW; a plain DDIM trajectory is timed apart for scale.
  Tiny SD1.5 (k=4) and SDXL (k=2, 3 inner steps), B in 1 2 4.

Each configuration runs in a fresh process: warm-up steps, then the median step (by total time, with its parts).
Writes the dpo or spo section of BENCHMARKS.md (with --full_size: dpo_full_size_<name>, spo_full_size_<name>).

    python -m benchmarks.preference --dpo                       # tiny models on CPU: a few minutes
    python -m benchmarks.preference --spo --quick --output_dir /tmp/b   # seconds: 32 px, B in (1, 2)
    python -m benchmarks.preference --dpo --full_size sdxl      # GPU: the same at 1024 px on a random-weight SDXL
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

if not __package__:  # python benchmarks/preference.py: the repo root on the path instead of benchmarks/, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common
from benchmarks.common import fmt, slope
from benchmarks.full_size import FULL_SIZE, build_full_size, require_gpu

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    method = parser.add_mutually_exclusive_group(required=True)
    method.add_argument("--dpo", action="store_true",
                        help="offline Diffusion-DPO (dpo.py): seconds per step and peak memory against the batch of "
                             "pairs, tiny SD1.5 and SDXL")
    method.add_argument("--spo", action="store_true",
                        help="SPO (spo.py): seconds per trajectory and per training step, peak memory of sampling and "
                             "of training, against the batch of prompts, tiny SD1.5 (k=4) and SDXL (k=2, 3 inner "
                             "steps)")
    parser.add_argument("--resolution", type=int, default=64, help="px of the tiny runs (full size: the paper's)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the tiny runs (full size: the presets')")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="in the tiny runs (full size: always)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: no, and bf16 for --full_size on a GPU")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None,
                        help="B (default: DPO 1 2 4 8, SPO 1 2 4; --quick 1 2)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps per configuration; the median is reported (default: --dpo 10, --spo 5 on "
                             "the tiny models, 3 at full size)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--malloc_mmap_threshold", type=int, default=None,
                        help=common.MMAP_HELP + "; default: glibc's own")
    parser.add_argument("--full_size", choices=sorted(FULL_SIZE), default=None,
                        help="random-weight full-size model at the paper presets' settings (needs a GPU); a section "
                             "of its own per model")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="with --full_size on CPU: a smoke at 64 px, batch 1, one step (prints, writes nothing)")
    parser.add_argument("--quick", action="store_true",
                        help="32 px, B in (1, 2), 2 steps, no warm-up: a seconds-long smoke")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md (default: the repo; --quick and the CPU smoke write files only "
                             "when it is given)")
    args = common.finish_args(parser.parse_args(argv), "preference", argv)
    args.method = "dpo" if args.dpo else "spo"
    args.smoke = args.full_size is not None and args.device == "cpu"
    if args.iters is None:  # a tiny DPO step takes a tenth of a second: more of them for a steady median
        args.iters = {"dpo": 10, "spo": 5}[args.method] if args.full_size is None else 3
    if args.quick:
        args.resolution, args.iters, args.warmup = 32, 2, 0
    if args.smoke:  # one step: the point is building, saving and loading the full-size model
        args.iters, args.warmup = 1, 0
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.full_size and not args.smoke else "no"
    if args.output_dir is None and not (args.quick or args.smoke):
        args.output_dir = common.ROOT
    return args


# ---------------------------------------------------------------------------------------------
# Workers: one training step, timed in parts
# ---------------------------------------------------------------------------------------------


def dpo_iterations(job):
    """Worker: one offline dpo.py training step as its main() runs it: the next batch of pairs from the parquet
    (decode, resize, crop), the VAE encoding of winners and losers, algorithm_loss (the policy's forward with
    gradient, the reference's, the same UNet with its LoRA off, under no_grad), backward, clipping, AdamW."""
    from diffusers import DDPMScheduler
    s = common.prepare(job)
    dpo, args, models, accelerator, clock = s.script, s.args, s.models, s.accelerator, s.clock
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    batches = dpo.PairBatches(dpo.open_pairs(args), args, 0, 1)
    rows = []
    models.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    common.reset_peak_memory(s.device)
    base, out = common.memory_mb(s.device), []
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
    return dict(steps=out, clock=s.clock_name, memory_base_mb=base,
                memory_peak_mb=common.memory_mb(s.device, peak=True))


def spo_iterations(job):
    """Worker: one spo.py training step as its main() runs it on one process: sample_pairs for B prompts (no_grad),
    then spo_loss + backward over all the pairs in chunks of --pair_batch_size, clipping, AdamW. Also times a plain
    DDIM trajectory (the scaffold's rollout, same settings) for comparison, outside the step."""
    import rewards
    s = common.prepare(job)
    spo, args, models, accelerator, clock, device = s.script, s.args, s.models, s.accelerator, s.clock, s.device
    scheduler = spo.make_scheduler(args)
    reward_fn = rewards.build_reward(args.reward, device=device, dtype=s.weight_dtype, **s.info["reward_options"])
    preference_model = spo.build_preference_model(reward_fn, args)
    rows = []
    models.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    cfg = 2 if args.guidance_scale > 1 else 1  # predict_noise runs the two CFG halves as one batch
    common.reset_peak_memory(device)
    base, out = common.memory_mb(device), []
    for step in range(1, job["warmup"] + job["iters"] + 1):
        generator = spo.step_generator(args, 0, step)
        idx = torch.randint(len(args.train_prompt_list), (args.train_batch_size,), generator=generator)
        prompts = [args.train_prompt_list[i] for i in idx]
        rows.clear()
        common.reset_peak_memory(device)
        start = clock()
        with accelerator.autocast():
            pairs, stats = spo.sample_pairs(models, scheduler, models.unet, preference_model, prompts, generator, args)
        sampled = clock()
        sample_peak, sample_rows = common.memory_mb(device, peak=True), sum(rows)
        rows.clear()
        common.reset_peak_memory(device)
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
        train_peak, train_rows = common.memory_mb(device, peak=True), sum(rows)
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
    """Every configuration: dict(label, B, argv) per model and batch size."""
    spec = PREFERENCE[args.method]
    if args.full_size:
        models = [m for m in spec["models"] if m[1] == args.full_size]
        paper = FULL_SIZE[args.full_size]["flags"]
        shared = ["--pretrained_model_name_or_path", folder, "--gradient_checkpointing", "--resolution",
                  "64" if args.smoke else paper[paper.index("--resolution") + 1]]
        if args.full_size == "sdxl":  # as in the sweep's DRTune runs: the fp16-fix VAE's architecture, our weights
            shared += ["--pretrained_vae_model_name_or_path", os.path.join(folder, "vae")]
    else:
        models = spec["models"]
        shared = ["--resolution", str(args.resolution), "--rank", str(args.rank)] + \
            (["--gradient_checkpointing"] if args.gradient_checkpointing else [])
    shared += ["--mixed_precision", args.mixed_precision, "--report_to", "none", "--seed", "0", "--reward", "symmetry"]
    if args.method == "dpo":
        shared += ["--dataset_name", os.path.join(folder, "pairs.parquet")]
    else:  # the paper's sampler; threshold 0 keeps every comparison: the most pairs, the longest training step
        T, W = (3, 1) if args.smoke else (6, 2) if args.quick else (20, 4)
        shared += ["--sampler", "ddim", "--eta", "1", "--guidance_scale", "5", "--num_inference_steps", str(T),
                   "--warm_steps", str(W), "--pair_threshold", "0"]
    batch_sizes = args.batch_sizes or ([1] if args.smoke else [1, 2] if args.quick else spec["batch_sizes"])
    jobs = []
    for label, name, flags, full_flags in models:
        model = [] if args.full_size else ["--pretrained_model_name_or_path",
                                           os.path.join(common.ROOT, "tiny_models", name)]
        for B in batch_sizes:
            argv = shared + model + flags + (full_flags if args.full_size else []) + ["--train_batch_size", str(B)]
            shape = None if args.method == "dpo" else (T, W, int(flags[flags.index("--num_candidates") + 1]))
            jobs.append(dict(label=label, B=B, module=args.method, argv=argv, shape=shape,
                             resolution=int(shared[shared.index("--resolution") + 1])))
    return jobs


# ---------------------------------------------------------------------------------------------
# Results: tables, reading, the section
# ---------------------------------------------------------------------------------------------


def preference_summary(row):
    """The median step (by total time; the lower one of an even count), with all its parts: they add up."""
    if row["status"] != "ok":
        return row
    totals = [step["total"] for step in row["steps"]]
    row.update(row["steps"][totals.index(statistics.median_low(totals))])
    return row


def batch_table(head, rows, cells):
    """A table: the label, B, then cells(row); a row that did not run shows why."""
    return common.markdown_table(head, [
        [r["label"], str(r["B"]), *(cells(r) if r["status"] == "ok"
                                    else [f"{r['status']}: {r['reason']}".replace("|", "/")] + [""] * (len(head) - 3))]
        for r in rows])


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
    body = [title, "", *common.header_lines(args, seconds, clock), "", settings, ""]
    if args.device == "cpu":
        body += [common.CPU_NOTE, ""]
    body += [table, "", "Reading (computed from the numbers above):", "", text, ""]
    if not args.full_size:
        body += [f"Full size: `python -m benchmarks.preference --{args.method} --full_size sdxl` (or sd15) on a GPU "
                 f"adds its own section with the published architectures.", ""]
    return "\n".join(body)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(args):
    common.set_malloc_mmap_threshold(args)
    require_gpu(args)
    started = time.time()
    context = common.fork_context([args.method])
    shared = dict(device=args.device, num_threads=args.num_threads, warmup=args.warmup, iters=args.iters)
    iterations = dpo_iterations if args.method == "dpo" else spo_iterations
    with tempfile.TemporaryDirectory(prefix=f"bench-{args.method}-") as folder:
        extra = build_full_size(context, args, folder) if args.full_size else ""
        jobs = preference_plan(args, folder)
        if args.method == "dpo":
            common.pairs_parquet(os.path.join(folder, "pairs.parquet"),
                                 max(j["B"] for j in jobs) * (args.warmup + args.iters), jobs[0]["resolution"])
        rows = []
        for i, job in enumerate(jobs, 1):
            row = preference_summary(dict(job, **common.run_in_fresh_process(context, iterations, dict(job, **shared))))
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
        key = args.method + (f"_full_size_{args.full_size}" if args.full_size else "")
        common.write_report(args.output_dir, key, preference_section(args, table, text, seconds, clock, extra))
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main(parse_args())
