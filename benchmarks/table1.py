"""A miniature Table 1 of the DRTune paper on the trained tiny world: every gradient method, and the stop-gradient
variants of Fig. 6, trained by its script's own main() (--preset demo) for the same CPU-time budget, on the world's
rewards, several seeds; the final reward on held-out prompts and measures that do not come from rewards.py.

Protocol (fixed before the first run): the world pipeline (tiny_models/world-sd15) and each script's --preset demo
(DDPM T=20, CFG 6, batch 4, lr 3e-3, clip 1.0, LoRA rank 8; DRTune K=2, m=8; ReFL stop range 10; DRaFT-K K=2;
DRaFT-LV n=2), overriding only the reward, seed, max_train_steps and validation_steps. Rewards: symmetry with the
tiny CLIP's score as regularizer (the paper's form, `symmetry:1,clipscore:1`), compressibility (eq. 7), the world's
aesthetic head and the tiny CLIP's score. Evaluation: the 8 held-out prompts of tiny_models/world-eval-prompts.txt
with each seed's fixed noise, at step 0 and at the end. Per run besides the script's eval reward, from its
before/after grid: the eq. 6 symmetry error computed with numpy (tiny_models/world.py, not rewards.py), the JPEG
size at quality 95 (PIL), and how many prompts are still drawn (background and shape colors read back by the world's
pixel check), which catches reward hacking.

1. Probe: one short run per method and reward times its training iterations (common.time_iterations, process CPU
   time); max_train_steps = floor(--budget / seconds per step).
2. Runs: each method's main() in a fresh one-thread process (--jobs at a time) per reward and seed. Writes the table1
   section of BENCHMARKS.md and bench_table1.png.

    python -m benchmarks.table1                                 # 8 methods x 4 rewards x 3 seeds at 20 CPU s: 35 min
    python -m benchmarks.table1 --quick --output_dir /tmp/b     # seconds: T=10, batch 2, one seed, budget 0.5 s
"""

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

if not __package__:  # python benchmarks/table1.py: the repo root on the path instead of benchmarks/, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common
from benchmarks.common import fmt, mean_std, pm

WORLD = os.path.join(common.ROOT, "tiny_models")
EVAL_PROMPTS = os.path.join(WORLD, "world-eval-prompts.txt")  # 8 held-out prompts, none in world-train-prompts.txt
# (label, script, flags on top of its --preset demo). "+ sg": stop-gradient on the UNet input (Fig. 6).
TABLE1_METHODS = [
    ("DRTune", "drtune", []),
    ("ReFL", "refl", []),
    ("DRaFT-LV", "draft", ["--draft_variant", "lv"]),
    ("DRaFT-K", "draft", ["--draft_variant", "k"]),
    ("AlignProp", "alignprop", []),
    ("AlignProp + sg", "alignprop", ["--stop_grad_unet_input"]),
    ("DRaFT-T", "draft", ["--draft_variant", "t"]),
    ("DRaFT-T + sg", "draft", ["--draft_variant", "t", "--stop_grad_unet_input"]),
]
REWARDS = ["symmetry:1,clipscore:1", "compressibility", "aesthetic", "clipscore"]
# The paper's Table 1 (SD1.5, 2 h on 4 A100): symmetry and compression error, both lower is better.
PAPER_TABLE1 = {"ReFL": (0.7512, 0.0057), "DRaFT-LV": (0.7648, 0.0088), "DRaFT-K": (0.7250, 0.0073),
                "AlignProp": (0.7840, 0.0097), "DRTune": (0.0551, 0.0038)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.path.join(WORLD, "world-sd15"), help="pipeline")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="CPU seconds of training per run (max_train_steps = budget / probed s per step)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument("--rewards", nargs="+", default=REWARDS, help="rewards (rewards.py specs)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="labels of TABLE1_METHODS to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true",
                        help="T=10, batch 2, 2 held-out prompts, budget 0.5 s, seed 0, the symmetry reward: a "
                             "seconds-long smoke of every method")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md and bench_table1.png (default: the repo; --quick writes files "
                             "only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "table1", argv)
    if args.quick:
        args.budget, args.seeds, args.rewards = 0.5, [0], [REWARDS[0]]
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


def run_argv(args, flags, reward, seed):
    argv = ["--preset", "demo", *flags, "--pretrained_model_name_or_path", args.model, "--reward", reward,
            "--seed", str(seed), "--report_to", "none", "--eval_prompts", EVAL_PROMPTS]
    if args.quick:  # seconds: T=10, batch 2, 2 held-out prompts
        argv += ["--num_inference_steps", "10", "--train_batch_size", "2", "--num_eval_prompts", "2"]
    else:
        argv += ["--num_eval_prompts", "8"]
    return argv


def grid_measures(output_dir):
    """From a run's samples/before_after.png, outside rewards.py: mean eq. 6 symmetry error (numpy), mean JPEG size
    at quality 95 (bytes, PIL) and the fraction of prompts still drawn, before and after."""
    from PIL import Image
    sys.path.insert(0, WORLD)
    import world
    result, prompts = world.read_run(output_dir)
    before, after = world.split_grid(os.path.join(output_dir, "samples", "before_after.png"), len(prompts))

    def jpeg_bytes(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        return buffer.tell()

    out = {}
    for name, images in (("before", before), ("after", after)):
        out[f"symmetry_{name}"] = float(np.mean(result[name]["symmetry"]))
        out[f"drawn_{name}"] = float(np.mean(result[name]["drawn"]))
        out[f"jpeg_{name}"] = float(np.mean([jpeg_bytes(image) for image in images]))
    return out


def train_run(job):
    """Worker: the script's own main() with job["argv"]; returns its metrics, the CPU time it took and the grid
    measures. The training steps' CPU time is measured between consecutive algorithm_loss calls (evaluation runs
    only before the first and after the last step, since validation_steps = max_train_steps)."""
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
                train_reward_last=rows[-1].get("reward_mean"), **grid_measures(args.output_dir))


def run_methods(args, methods, rewards, context, folder):
    """Probe, then train every (method, reward, seed) for args.budget CPU s of training; returns (runs, probes).
    methods: (label, module, flags) entries."""
    probe_jobs = [dict(label=label, module=module, loss="algorithm", warmup=0, iters=1 if args.quick else 2,
                       device="cpu", num_threads=args.num_threads, reward=r, argv=run_argv(args, flags, r, args.seeds[0]))
                  for label, module, flags in methods for r in rewards]
    probes = {}
    for job, result in zip(probe_jobs, common.run_parallel(context, common.time_iterations, probe_jobs, args.jobs)):
        if result["status"] != "ok":
            common.error(f"probing {job['label']} failed: {result['reason']}\n{result.get('traceback', '')}")
        probes[job["label"], job["reward"]] = statistics.median(result["seconds"])
        print(f"probe {job['label']} {job['reward']}: {probes[job['label'], job['reward']]:.2f} CPU s/step", flush=True)
    jobs = []
    for label, module, flags in methods:
        for r in rewards:
            steps = max(1, int(args.budget / probes[label, r]))
            for seed in args.seeds:
                out = os.path.join(folder, f"{label}-{r}-{seed}".replace(" ", "_").replace(",", "_").replace(":", ""))
                argv = run_argv(args, flags, r, seed) + [
                    "--max_train_steps", str(steps), "--validation_steps", str(steps), "--output_dir", out]
                jobs.append(dict(method=label, module=module, reward=r, seed=seed, max_train_steps=steps,
                                 argv=argv, num_threads=args.num_threads))
    runs = []
    for job, result in zip(jobs, common.run_parallel(context, train_run, jobs, args.jobs)):
        run = dict({k: job[k] for k in ("method", "reward", "seed", "max_train_steps")}, **result)
        runs.append(run)
        if run["status"] == "ok":
            print(f"{run['method']} {run['reward']} seed {run['seed']}: {run['steps']} steps, "
                  f"{run['cpu_per_step'] or float('nan'):.2f} CPU s/step in main(), {run['cpu_total']:.0f} CPU s in "
                  f"all; eval reward {run['base_reward']:.4g} -> {run['final_reward']:.4g}; symmetry error "
                  f"{run['symmetry_before']:.3f} -> {run['symmetry_after']:.3f}; drawn {run['drawn_before']:.2f} -> "
                  f"{run['drawn_after']:.2f}", flush=True)
        else:
            print(f"{run['method']} {run['reward']} seed {run['seed']}: {run['status']}: {run['reason']}\n"
                  f"{run.get('traceback', '')}", flush=True)
    return runs, probes


def ok_runs(runs, method, reward):
    return [x for x in runs if x["method"] == method and x["reward"] == reward and x["status"] == "ok"]


def reward_table(runs, probes, labels, reward):
    """One reward: a row for the base model (step 0 of every run) and one per method, mean ± std over seeds."""
    head = ["method", "CPU s / step (probe)", "steps", "eval reward", "gain over base", "symmetry error (numpy)",
            "JPEG bytes", "prompts drawn"]
    every = [x for x in runs if x["reward"] == reward and x["status"] == "ok"]
    rows = [["base model (step 0)", "—", "0", pm([x["base_reward"] for x in every]), "0",
             pm([x["symmetry_before"] for x in every], 3), pm([x["jpeg_before"] for x in every], 4),
             pm([x["drawn_before"] for x in every], 2)]]
    for label in labels:
        mine = ok_runs(runs, label, reward)
        tried = [x for x in runs if x["method"] == label and x["reward"] == reward]
        if not tried:
            continue
        note = f" ({len(mine)} of {len(tried)} ran)" if len(mine) < len(tried) else ""
        rows.append([label, fmt(probes.get((label, reward))), "/".join(map(str, sorted({x["max_train_steps"] for x in tried}))),
                     pm([x["final_reward"] for x in mine]) + note,
                     pm([x["final_reward"] - x["base_reward"] for x in mine]),
                     pm([x["symmetry_after"] for x in mine], 3), pm([x["jpeg_after"] for x in mine], 4),
                     pm([x["drawn_after"] for x in mine], 2)])
    return common.markdown_table(head, rows)


def gains(runs, labels, reward, key=lambda x: x["final_reward"] - x["base_reward"]):
    out = {}
    for label in labels:
        mine = ok_runs(runs, label, reward)
        if mine:
            out[label] = mean_std([key(x) for x in mine])
    return out


def reward_reading(runs, labels, reward):
    """Sentences computed from the runs of one reward."""
    out = []
    g = gains(runs, labels, reward)
    if not g:
        return out
    order = sorted(g, key=lambda m: -g[m][0])
    out.append(f"ranking by mean gain over the base model: " + ", ".join(
        f"{m} ({g[m][0]:+.3g} ± {g[m][1]:.2g})" for m in order) + ".")
    if "DRTune" in g and len(order) > 1:
        if order[0] == "DRTune":
            second = order[1]
            gap, noise = g["DRTune"][0] - g[second][0], max(g["DRTune"][1], g[second][1])
            out.append(f"DRTune is first, ahead of {second} by {gap:.3g} ({'more' if gap > noise else 'less'} than "
                       f"the larger seed std, {noise:.2g}).")
        else:
            out.append(f"DRTune is {order.index('DRTune') + 1} of {len(order)}; {order[0]} leads it by "
                       f"{g[order[0]][0] - g['DRTune'][0]:.3g} (seed std of the leader {g[order[0]][1]:.2g}).")
    for plain in ("AlignProp", "DRaFT-T"):
        if plain in g and f"{plain} + sg" in g:
            a, b = g[plain][0], g[f"{plain} + sg"][0]
            out.append(f"stop-gradient (Fig. 6): {plain} {a:+.3g} without, {b:+.3g} with "
                       f"({'better' if b > a else 'not better'} with it).")
    drawn_base = statistics.mean(x["drawn_before"] for x in runs if x["reward"] == reward and x["status"] == "ok")
    lost = [f"{m} ({statistics.mean(x['drawn_after'] for x in ok_runs(runs, m, reward)):.0%})" for m in order
            if statistics.mean(x["drawn_after"] for x in ok_runs(runs, m, reward)) < drawn_base - 0.1]
    out.append(f"prompts still drawn: {drawn_base:.0%} at step 0; " + (
        "lost more than 10 points (images that no longer show a shape or the background the prompt asks for): " + ", ".join(lost) if lost else
        "no method lost more than 10 points") + ".")
    if reward.startswith("symmetry"):
        independent = gains(runs, labels, reward, key=lambda x: x["symmetry_before"] - x["symmetry_after"])
        agree = [m for m in order if (independent[m][0] > 0) == (g[m][0] > 0)]
        out.append(f"the symmetry error computed outside rewards.py falls (before - after) by: " + ", ".join(
            f"{m} {independent[m][0]:+.3f}" for m in order) + f"; its sign agrees with the reward gain for "
            f"{len(agree)} of {len(order)} methods.")
        paper = [m for m in sorted(PAPER_TABLE1, key=lambda m: PAPER_TABLE1[m][0]) if m in g]
        out.append(f"the paper's order (Table 1, symmetry error, lower is better): {', '.join(paper)}; here the "
                   f"same methods rank {', '.join(m for m in order if m in paper)} "
                   f"({'same winner' if order[0] == paper[0] else 'a different winner'}).")
    if reward == "compressibility":
        paper = [m for m in sorted(PAPER_TABLE1, key=lambda m: PAPER_TABLE1[m][1]) if m in g]
        out.append(f"the paper's order (Table 1, compression error): {', '.join(paper)}; here "
                   f"{', '.join(m for m in order if m in paper)}.")
    return out


def table1_plot(runs, labels, rewards, path, title):
    with common.figure(path, 1, len(rewards), figsize=(4.2 * len(rewards), 4), squeeze=False) as (fig, axes):
        for ax, r in zip(axes[0], rewards):
            g = gains(runs, labels, r)
            names = list(g)
            ax.bar(range(len(names)), [g[m][0] for m in names], yerr=[g[m][1] for m in names], capsize=3,
                   color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_title(f"{r}")
            ax.set_ylabel("eval reward gain over step 0")
        fig.suptitle(title)


def main(args):
    started = time.time()
    methods = [e for e in TABLE1_METHODS if importlib.util.find_spec(e[1]) is not None and
               (args.methods is None or e[0] in args.methods)]
    labels = [label for label, *_ in methods]
    context = common.fork_context([m for _, m, _ in methods])
    with tempfile.TemporaryDirectory(prefix="bench-table1-") as folder:
        runs, probes = run_methods(args, methods, args.rewards, context, folder)
    seconds = time.time() - started
    sections = []
    for r in args.rewards:
        text = "\n".join(f"- {line}" for line in reward_reading(runs, labels, r))
        sections.append(f"### {r}\n\n{reward_table(runs, probes, labels, r)}\n\n{text}\n")
    print("\n".join(sections) + f"\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        table1_plot(runs, labels, args.rewards, os.path.join(args.output_dir, "bench_table1.png"),
                    f"Same CPU budget per run ({args.budget:g} CPU s of training), mean ± std over seeds "
                    f"{', '.join(map(str, args.seeds))}")
        steps = [x["steps"] for x in runs if x["status"] == "ok"] or [0]
        settings = (
            f"Protocol (the module docstring): each method's own `main()` with `--preset demo` on "
            f"`{os.path.relpath(args.model, common.ROOT)}` (DDPM T={10 if args.quick else 20}, CFG 6, batch "
            f"{2 if args.quick else 4}, lr 3e-3, clip 1.0, LoRA rank 8, fp32; DRTune K=2, m=8; ReFL stop range 10; "
            f"DRaFT-K K=2; DRaFT-LV n=2; \"+ sg\": `--stop_grad_unet_input`), overriding only the reward, seed, "
            f"max_train_steps and validation_steps (evaluation at step 0 and at the end). Every run is a fresh "
            f"one-thread process ({args.jobs} at a time). **Budget**: {args.budget:g} CPU s of training per run: a "
            f"probe times {'1 iteration' if args.quick else '2 iterations'} per method and reward and max_train_steps "
            f"= floor(budget / seconds per step) ({min(steps)}–{max(steps)} optimizer steps per run); evaluation "
            f"and loading are outside it. **Measures** on the {2 if args.quick else 8} held-out prompts of "
            f"`tiny_models/world-eval-prompts.txt` with each seed's fixed noise: the script's eval reward (higher is "
            f"better), and from its before/after grid, outside rewards.py, the eq. 6 symmetry error (numpy; lower "
            f"is more symmetric), the JPEG size at quality 95 (smaller is more compressible) and the fraction of "
            f"prompts still drawn (the world's pixel check). Mean ± std over seeds {', '.join(map(str, args.seeds))}; "
            f"the gain is per seed, final minus step 0.")
        body = "\n".join([
            "## Miniature Table 1 on the tiny world: every method for the same CPU budget", "",
            *common.header_lines(args, seconds, "CPU time of each one-thread process"), "", settings, "",
            *sections,
            "What this can and cannot say: each run makes a few dozen optimizer steps at most on a 2.4 M-parameter "
            "UNet at 32 px, so the tables compare early progress per CPU second (updates that fit in the budget, "
            "times how useful each is), not converged rewards; gaps smaller than the seed stds are noise. The "
            "paper's Table 1 runs each method 2 h on 4 A100s at 512 px.", "",
            "![gain per method](bench_table1.png)", ""])
        common.write_report(args.output_dir, "table1", body)
    if any(x["status"] != "ok" for x in runs):
        sys.exit(1)
    return runs


if __name__ == "__main__":
    main(parse_args())
