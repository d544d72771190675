"""Fig. 7 of the DRTune paper on the tiny model: the norm of the LoRA gradient of DRaFT-K's first backward at the
base model against K, with and without stop-gradient on the UNet input (draft.py's --stop_grad_unet_input).

Two processes, one per variant (one torch thread each, --jobs at a time), run draft.py's `algorithm_loss` and
backward for each K on --fig7_batches batches; batch b draws its prompts and noise from step_generator(step b + 1),
the same for every K and both variants, and the LoRA is initialized with the same seed in both. The norm is taken
over all LoRA gradients before clipping. Writes the fig7 section of BENCHMARKS.md and bench_fig7.png.

    python -m benchmarks.fig7                                 # T=20, K up to 20, 4 batches: a few CPU minutes
    python -m benchmarks.fig7 --quick --output_dir /tmp/b     # seconds: 32 px, T=4, K in (1, 2, 4), one batch
"""

import argparse
import importlib
import os
import statistics
import sys
import time

import torch

if not __package__:  # python benchmarks/fig7.py: the repo root on the path instead of benchmarks/, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.path.join(common.ROOT, "tiny_models", "sd15"), help="pipeline")
    parser.add_argument("--resolution", type=int, default=64, help="px")
    parser.add_argument("--fig7_T", type=int, default=20, help="sampling steps T")
    parser.add_argument("--fig7_K", type=int, nargs="+", default=[1, 2, 5, 10, 15, 20], help="K (<= T)")
    parser.add_argument("--fig7_batches", type=int, default=4,
                        help="batches (seeded prompt and noise draws) per K; the median norm is reported")
    parser.add_argument("--fig7_batch_size", type=int, default=2, help="B")
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true",
                        help="32 px, T=4, K in (1, 2, 4), one batch: a seconds-long smoke")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md and bench_fig7.png (default: the repo; --quick writes files "
                             "only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "fig7", argv)
    if args.quick:
        args.resolution, args.fig7_T, args.fig7_K, args.fig7_batches = 32, 4, [1, 2, 4], 1
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


def fig7_argv(args):
    return ["--preset", "demo", "--pretrained_model_name_or_path", args.model, "--resolution", str(args.resolution),
            "--num_inference_steps", str(args.fig7_T), "--train_batch_size", str(args.fig7_batch_size),
            "--reward", "symmetry", "--seed", "0", "--report_to", "none", "--draft_variant", "k"]


def grad_norms(job):
    """Worker: the LoRA gradient norm (before clipping) of DRaFT-K's first backward at the base model, for each K and
    batch; the batch b draws its prompts and noise from step_generator(step b + 1), the same for every K."""
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
        rise = last[stop]["median"] / first[stop]["median"]
        out.append(f"{name}, the median norm goes from {first[stop]['median']:.3g} at K={first['K']} to "
                   f"{last[stop]['median']:.3g} at K={last['K']} ({rise:.3g}x).")
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
    with common.figure(path, figsize=(6, 4)) as (fig, ax):
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


def main(args):
    started = time.time()
    Ks = [K for K in args.fig7_K if 1 <= K <= args.fig7_T]
    context = common.fork_context(["draft"])
    jobs = [dict(argv=fig7_argv(args), K=Ks, stop_grad=stop, batches=args.fig7_batches, num_threads=args.num_threads)
            for stop in (False, True)]
    out = common.run_parallel(context, grad_norms, jobs, args.jobs)
    for result in out:
        if result["status"] != "ok":
            common.error(f"fig7 worker: {result['reason']}\n{result.get('traceback', '')}")
    results = {job["stop_grad"]: result for job, result in zip(jobs, out)}
    rows = fig7_rows(results, Ks)
    cpu = sum(r["seconds"] for result in out for r in result["norms"])
    seconds = time.time() - started
    table, text = fig7_table(rows), fig7_reading(rows, args.fig7_T)
    print(table + "\n\n" + text + f"\n\nbenchmark time: {seconds:.0f} s (backward passes: {cpu:.0f} CPU s)")
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        fig7_plot(rows, os.path.join(args.output_dir, "bench_fig7.png"))
        settings = (f"DRaFT-K (`draft.py`, `--preset demo`: `{os.path.relpath(args.model, common.ROOT)}`, "
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
            *common.header_lines(args, seconds, "CPU time of each one-thread process"), "", settings, "", table, "",
            "Reading (computed from the numbers above):", "", text, "", "![grad norm against K](bench_fig7.png)", ""])
        common.write_report(args.output_dir, "fig7", body)
    return rows


if __name__ == "__main__":
    main(parse_args())
