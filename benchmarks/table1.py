"""A miniature Table 1 of the DRTune paper: every gradient method trained by its script's own main() (--preset demo)
for the same CPU-time budget, final reward on held-out prompts, several seeds.

1. Probe: one short run per method and reward times its training iterations (common.time_iterations, process CPU
   time); max_train_steps = floor(--budget / seconds per step).
2. Runs: each method's main() in a fresh one-thread process (--jobs at a time) per reward and seed, evaluating at
   step 0 and at the end only (validation_steps = max_train_steps) on HELD_OUT_PROMPTS with each seed's fixed
   evaluation noise. Writes the table1 section of BENCHMARKS.md and bench_table1.png.

    python -m benchmarks.table1 --budget 25                     # 5 methods x 2 rewards x 2 seeds: ~10 min, 2 cores
    python -m benchmarks.table1 --quick --output_dir /tmp/b     # seconds: 32 px, T=10, one seed, budget 0.5 s
"""

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

if not __package__:  # python benchmarks/table1.py: the repo root on the path instead of benchmarks/, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common
from benchmarks.common import fmt, mean_std, pm

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.path.join(common.ROOT, "tiny_models", "sd15"), help="pipeline")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="CPU seconds of training per run (max_train_steps = budget / probed s per step)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds")
    parser.add_argument("--rewards", nargs="+", default=["symmetry", "compressibility"], help="rewards")
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true",
                        help="32 px, T=10, batch 2, 2 held-out prompts, budget 0.5 s, seed 0, symmetry: a "
                             "seconds-long smoke")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md and bench_table1.png (default: the repo; --quick writes files "
                             "only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "table1", argv)
    if args.quick:
        args.budget, args.seeds, args.rewards = 0.5, [0], ["symmetry"]
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


def table1_argv(args, flags, reward, seed, prompts_file):
    argv = ["--preset", "demo", *flags, "--pretrained_model_name_or_path", args.model, "--reward", reward,
            "--seed", str(seed), "--report_to", "none", "--eval_prompts", prompts_file]
    if args.quick:  # seconds: 32 px, T=10, batch 2, 2 held-out prompts
        argv += ["--resolution", "32", "--num_inference_steps", "10", "--train_batch_size", "2",
                 "--num_eval_prompts", "2"]
    else:
        argv += ["--num_eval_prompts", str(len(HELD_OUT_PROMPTS))]
    return argv


def train_run(job):
    """Worker: the script's own main() with job["argv"]; returns its metrics and the CPU time it took. The training
    steps' CPU time is measured between consecutive algorithm_loss calls (evaluation runs only before the first and
    after the last step, since validation_steps = max_train_steps)."""
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
    with common.figure(path, 1, len(args.rewards), figsize=(5 * len(args.rewards), 4), squeeze=False) as (fig, axes):
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


def main(args):
    started = time.time()
    context = common.fork_context([m for _, m, _ in TABLE1_METHODS])
    methods = [e for e in TABLE1_METHODS if importlib.util.find_spec(e[1]) is not None]
    with tempfile.TemporaryDirectory(prefix="bench-table1-") as folder:
        prompts_file = os.path.join(folder, "held_out.txt")
        with open(prompts_file, "w") as f:
            f.write("\n".join(HELD_OUT_PROMPTS) + "\n")
        # 1. probe: CPU seconds of one training iteration (algorithm_loss, backward, clip, AdamW) per method and reward
        probe_jobs = [dict(label=label, module=module, loss="algorithm", warmup=0, iters=1 if args.quick else 2,
                           device="cpu", num_threads=args.num_threads, reward=r,
                           argv=table1_argv(args, flags, r, args.seeds[0], prompts_file))
                      for label, module, flags in methods for r in args.rewards]
        probes = {}
        for job, result in zip(probe_jobs, common.run_parallel(context, common.time_iterations, probe_jobs, args.jobs)):
            if result["status"] != "ok":
                common.error(f"probing {job['label']} failed: {result['reason']}\n{result.get('traceback', '')}")
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
                    jobs.append(dict(method=label, module=module, reward=r, seed=seed, max_train_steps=steps,
                                     argv=argv, num_threads=args.num_threads))
        runs = []
        for job, result in zip(jobs, common.run_parallel(context, train_run, jobs, args.jobs)):
            run = dict({k: job[k] for k in ("method", "reward", "seed", "max_train_steps")}, **result)
            runs.append(run)
            if run["status"] == "ok":
                print(f"{run['method']} {run['reward']} seed {run['seed']}: {run['steps']} steps, "
                      f"{run['cpu_per_step'] or float('nan'):.2f} CPU s/step in main(), {run['cpu_total']:.0f} CPU s "
                      f"in all; eval reward {run['base_reward']:.4g} -> {run['final_reward']:.4g}", flush=True)
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
            f"`{os.path.relpath(args.model, common.ROOT)}`, {'32' if args.quick else '64'} px, DDPM T="
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
            *common.header_lines(args, seconds, "CPU time of each one-thread process"), "", settings, "", table, "",
            "Reading (computed from the numbers above):", "", text, "",
            "What this can and cannot say: every run makes only a few to a few dozen optimizer steps of a "
            "random-weight tiny UNet at 64 px, so the table compares early progress per CPU second (how many "
            "updates a method fits in the budget, times how useful each is), not converged rewards, and the step-0 "
            "images have none of the global layout that the paper's symmetry result is about (DRTune trains early "
            "sampling steps, which set the layout in a trained SD1.5; DRaFT-K, DRaFT-LV and ReFL train only late "
            "ones). With 2 seeds and held-out prompts at fixed noise, gaps smaller than the stds are noise. The "
            "paper's Table 1 runs each method 2 h on 4 A100s.", "",
            "![final reward per method](bench_table1.png)", ""])
        common.write_report(args.output_dir, "table1", body)
    if any(x["status"] != "ok" for x in runs):
        sys.exit(1)
    return runs


if __name__ == "__main__":
    main(parse_args())
