"""The DRTune paper's claim about reinforcement learning, measured on the tiny world: RL "does not require rewards to be
differentiable" but "converges slower" than backpropagating the reward. GRPO (grpo.py) against DRTune and ReFL on the
same differentiable reward, sampler and CPU budget.

Protocol (fixed before the first run):
- Reward: the demos' `symmetry:1,clipscore:1` (minus eq. 6's symmetry error, plus the world's tiny CLIP score as
  the paper's regularizer), with the world's reward models, for training and evaluation. GRPO reads only its values;
  DRTune and ReFL backpropagate it.
- Sampler, for every image of training and evaluation: DDPM, T = 20, CFG 6, the DRTune and ReFL demos' own (DDPM's
  Gaussian step is the transition density GRPO trains on, so no method samples differently from the others).
- Methods: each script's `main()` with `--preset demo` on the demos' world prompts (tiny_models/world-train-prompts.txt,
  the 8 held-out prompts of world-eval-prompts.txt), overriding only the reward, the prompts and sampler above, the
  seed, max_train_steps and validation_steps. DRTune: its demo (K = 2 trained steps, early stop up to 8). ReFL: its
  demo (stop range 10). GRPO: 4 prompts x G = 8 images per round, half of each image's 20 steps trained, the demos'
  learning rate 3e-3, the plain DDPO/GRPO objective (clip range 1e-4, no KL, no window), pinned in METHODS.
- Budget, CPU time and evaluation exactly as benchmarks/world_preference.py measures them (its train_run): a probe
  of the CPU s per step (seed 0, 4 steps), max_train_steps = budget / that, training CPU time measured per run from
  the end of the step-0 evaluation to the last step, less evaluations; the scripts' own evaluation at step 0, every
  quarter and the end; eq. 6 symmetry error and prompts drawn read back from the before/after grid by
  tiny_models/world.py. Seeds 0, 1, 2, one-thread fresh processes, 2 at a time.
- Reading rule for the claim: at half the budget and at the whole budget, GRPO's mean gain against the better of
  DRTune and ReFL: the claim holds when GRPO trails by more than the larger seed std, fails when it leads by more,
  undecided in between.

    python -m benchmarks.grpo_backprop                              # 3 methods x 3 seeds, ~10 min on 2 shared cores
    python -m benchmarks.grpo_backprop --quick --output_dir /tmp/b  # a minute: T=8, 2 eval prompts, 1 CPU s
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

if not __package__:  # python benchmarks/grpo_backprop.py: the repo root on the path, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common
from benchmarks import world_preference as wp

WORLD = os.path.join(common.ROOT, "tiny_models")
REWARD = "symmetry:1,clipscore:1"
SAMPLER = dict(sampler="ddpm", num_inference_steps=20, guidance_scale=6.0)
PROMPTS = dict(train_prompts=os.path.join(WORLD, "world-train-prompts.txt"),
               eval_prompts=os.path.join(WORLD, "world-eval-prompts.txt"))
# GRPO pinned to its plain form (the demo's preset may move): 4 prompts x G = 8 per round, half the steps trained,
# the demos' learning rate 3e-3, clip range 1e-4, no KL, every step stochastic
GRPO = ["--group_size", "8", "--train_batch_size", "4", "--timestep_fraction", "0.5", "--learning_rate", "3e-3",
        "--beta", "0", "--sde_window_size", "0", "--clip_range", "1e-4"]
METHODS = [("DRTune", "drtune", []), ("ReFL", "refl", []), ("GRPO", "grpo", GRPO)]
QUICK = dict(num_inference_steps=8, num_eval_prompts=2, budget=1.0, probe_steps=2,
             grpo=["--train_batch_size", "2", "--group_size", "2"], drtune=["--train_batch_size", "2", "--early_stop_max", "4"],
             refl=["--train_batch_size", "2", "--stop_range", "4"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--budget", type=float, default=60.0, help="CPU seconds of training per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probe_steps", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help="T=8, 2 eval prompts, budget 1 CPU s, seed 0: a smoke")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md and bench_grpo_backprop.png (default: the repo; --quick writes "
                             "files only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "grpo_backprop", argv)
    args.sampler = dict(SAMPLER)
    if args.quick:
        args.sampler["num_inference_steps"] = QUICK["num_inference_steps"]
        args.budget, args.probe_steps, args.seeds = QUICK["budget"], QUICK["probe_steps"], [0]
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


def method_argv(args, module, flags, seed, output_dir, steps, validation_steps):
    argv = ["--preset", "demo", "--seed", str(seed), "--report_to", "none", "--output_dir", output_dir,
            "--max_train_steps", str(steps), "--validation_steps", str(validation_steps), "--reward", REWARD, *flags]
    argv += [x for key, value in {**args.sampler, **PROMPTS}.items() for x in (f"--{key}", str(value))]
    if args.quick:
        argv += ["--num_eval_prompts", str(QUICK["num_eval_prompts"])] + QUICK[module]
    return argv


def reading(runs, methods, args):
    ok = [r for r in runs if r["status"] == "ok"]
    stats = {m: {key: wp.mean_std([r["summary"][key] for r in ok if r["method"] == m])
                 for key in ("gain", "gain_per_s", "gain_half", "gain_full", "sym_before", "sym_after",
                             "drawn_before", "drawn_after")}
             for m in methods if any(r["method"] == m for r in ok)}
    if not stats:
        return "- No run finished."
    out = ["Ranking by mean eval gain per training CPU second: " + ", ".join(
        f"{m} ({1000 * stats[m]['gain_per_s'][0]:+.3g} ± {1000 * stats[m]['gain_per_s'][1]:.2g} per 1000 s)"
        for m in sorted(stats, key=lambda m: -stats[m]["gain_per_s"][0])) + "."]
    for m, s in stats.items():
        out.append(f"{m}: eval gain {s['gain'][0]:+.3g} ± {s['gain'][1]:.2g}; eq. 6 symmetry error read from the "
                   f"pixels {s['sym_before'][0]:.3f} -> {s['sym_after'][0]:.3f}; prompts still drawn "
                   f"{s['drawn_before'][0]:.0%} -> {s['drawn_after'][0]:.0%}.")
    backprop = [m for m in ("DRTune", "ReFL") if m in stats]
    if "GRPO" in stats and backprop:
        for key, when in (("gain_half", "half the budget"), ("gain_full", "the whole budget")):
            best = max(backprop, key=lambda m: stats[m][key][0])
            rl, bp = stats["GRPO"][key], stats[best][key]
            gap, noise = rl[0] - bp[0], max(rl[1], bp[1])
            verdict = ("is undecided (one seed)" if len(args.seeds) < 2 else "holds" if gap < -noise
                       else "fails" if gap > noise else "is undecided (within the seed std)")
            seconds = args.budget / 2 if key == "gain_half" else args.budget
            out.append(f"The paper's claim that RL converges slower, at {when} ({seconds:g} CPU s): GRPO "
                       f"{rl[0]:+.3g} ± {rl[1]:.2g} against {best} {bp[0]:+.3g} ± {bp[1]:.2g}: it {verdict} here.")
    return "\n".join(f"- {line}" for line in out)


def main(args):
    started = time.time()
    context = common.fork_context([module for _, module, _ in METHODS])
    methods = [label for label, *_ in METHODS]
    with tempfile.TemporaryDirectory(prefix="bench-grpo-backprop-") as folder:
        probes = [dict(method=label, module=module, probe_steps=args.probe_steps, num_threads=args.num_threads,
                       argv=method_argv(args, module, flags, args.seeds[0], os.path.join(folder, f"probe-{i}"),
                                        args.probe_steps, args.probe_steps))
                  for i, (label, module, flags) in enumerate(METHODS)]
        per_step = {}
        for job, result in zip(probes, common.run_parallel(context, wp.train_run, probes, args.jobs)):
            if result["status"] != "ok":
                common.error(f"probing {job['method']} failed: {result['reason']}\n{result.get('traceback', '')}")
            per_step[job["method"]] = result["cpu"] / job["probe_steps"]
            print(f"probe {job['method']}: {per_step[job['method']]:.3f} CPU s/step", flush=True)
        jobs = []
        for label, module, flags in METHODS:
            steps = max(1, int(args.budget / per_step[label]))
            for seed in args.seeds:
                jobs.append(dict(method=label, module=module, seed=seed, num_threads=args.num_threads,
                                 argv=method_argv(args, module, flags, seed, os.path.join(folder, f"run-{len(jobs)}"),
                                                  steps, max(1, steps // 4))))
        runs = []
        for job, result in zip(jobs, common.run_parallel(context, wp.train_run, jobs, args.jobs)):
            run = dict(method=job["method"], seed=job["seed"], **result)
            if run["status"] == "ok":
                run["summary"] = wp.summarize(run, args.budget)
                s = run["summary"]
                print(f"{run['method']} seed {run['seed']}: {run['steps']} steps, {run['cpu']:.1f} training CPU s; "
                      f"eval reward {s['base']:.4g} -> {s['final']:.4g}", flush=True)
            else:
                print(f"{run['method']} seed {run['seed']}: {run['status']}: {run['reason']}\n"
                      f"{run.get('traceback', '')}", flush=True)
            runs.append(run)
    seconds = time.time() - started
    text_table, text = wp.table(runs, methods), reading(runs, methods, args)
    print("\n" + text_table + "\n\n" + text)
    if args.output_dir is not None:
        png = os.path.join(args.output_dir, "bench_grpo_backprop.png")
        os.makedirs(args.output_dir, exist_ok=True)
        wp.plot(runs, methods, args, png)
        s = args.sampler
        settings = (f"Protocol: the module docstring (fixed before the first run). Reward `{REWARD}`; every image at "
                    f"DDPM T={s['num_inference_steps']}, CFG {s['guidance_scale']:g}; the demos' world prompts. "
                    f"**Budget** {args.budget:g} CPU s of training per run, max_train_steps from a probe (seed 0: "
                    + ", ".join(f"{m} {per_step[m]:.2f} s/step" for m in methods) + "). Mean ± std over seeds "
                    f"{', '.join(map(str, args.seeds))}.")
        body = "\n".join(["## GRPO against reward backpropagation (the DRTune paper's claim about RL)", "",
                          *common.header_lines(args, seconds, "CPU time of each one-thread process"), "", settings, "",
                          text_table, "", "Reading (computed from the numbers above):", "", text, "",
                          f"![gain against CPU time, and the pixels read back]({os.path.basename(png)})", ""])
        common.write_report(args.output_dir, "grpo_backprop", body)
    if any(r["status"] != "ok" for r in runs):
        sys.exit(1)
    return runs


if __name__ == "__main__":
    main(parse_args())
