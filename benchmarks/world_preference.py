"""Preference methods on the trained tiny world, for one preference signal and one CPU budget: offline
Diffusion-DPO on Pick-a-Pic-format pairs built from the world, online self-rewarding DPO with a frozen reference and
with a moving one (EMA rates 0.1, 0.5), and SPO. Reward gain per CPU second, and whether the prompt is still drawn.

Protocol (fixed before the first run):
- Signal: the demos' reward `symmetry:1,clipscore:1` (minus eq. 6's symmetry error, plus the tiny CLIP's score) with
  the world's reward models (dpo.py's WORLD_DEMO reward options), for ranking pairs, SPO's comparisons and evaluation.
- Sampler, for every image sampled in training, in the pairs and in evaluation: DDIM eta 1, T=20, CFG 1.5 (SAMPLER).
  That is spo.py's demo sampler: SPO needs eta > 0, and at CFG 1.5 a step-level win carries to the final image on
  this model (benchmarks.step_preference; at CFG 6 it does not). dpo.py's demo samples at DDIM eta 0, T=10, CFG 3;
  here it samples as SPO does, so that every method is evaluated on the same images at step 0 (and an online round
  samples 20-step trajectories).
- Methods (METHODS): each script's `main()` with `--preset demo` (lr, beta, batch, LoRA rank, rounds as its demo),
  overriding only the sampler, the seed, max_train_steps, validation_steps, the output folder and the method's own
  flags. Offline DPO: `--offline` on the pairs below, frozen reference, `--no_random_flip` (the world's captions name
  left and right, which a flip would swap), otherwise dpo.py's offline defaults (center crop, 20 % empty captions).
  Online DPO: rounds of 4 images for 16 prompts, best vs worst, 10 steps per round, the reference frozen
  (`--ref_update_rate 0`) or moved after each round at rate 0.1 or 0.5 (the demo's). SPO: its demo (k=4, 6 warm
  steps, threshold 0.3, temperature 0.1).
- Pairs for offline DPO, built once: 4 images for each of the 256 world training prompts from the base pipeline
  (a plain diffusers StableDiffusionPipeline of tiny_models/world-sd15, DDIMScheduler, SAMPLER), scored with the same
  reward, best vs worst per prompt (as an online round pairs them) written as Pick-a-Pic rows (jpg_0, jpg_1,
  label_0, caption; the winner on alternate sides; PNG bytes, lossless at 32 px, which dpo.py reads as it reads
  JPEG). Its CPU time, the offline method's data cost, is reported apart from the training budget.
- Budget: 45 CPU s of training per run (--budget; 60 was planned, cut so that the whole run, about 1,000 CPU s,
  fits about 25 minutes on 2 cores shared with another benchmark). A probe run per method (seed 0; online DPO one
  whole round, so that its sampling is counted; the others 4 steps) gives the CPU time per step, and max_train_steps
  = floor(budget / that). Training CPU time is measured in every run: process CPU time (one torch thread) from the
  end of the step-0 evaluation to the call of save_lora after the last step, less the evaluations in between; gains
  per CPU second divide by that measured time. Loading, evaluation and the final grid are outside it.
- Evaluation: each script's own evaluate(): the 8 held-out prompts of tiny_models/world-eval-prompts.txt with the
  fixed noise of the run's seed (the same for every method, so the step-0 reward and images of a seed must agree
  across methods), at step 0, every max_train_steps / 4 steps (online DPO also at each round's end, as dpo.py
  does) and at the end. Per run: eval reward at step 0 and at the end, the gain, the gain per training CPU s, the gain
  at half the budget (the evaluations interpolated linearly in training CPU s: the convergence measure); from the
  before/after grid, outside rewards.py (tiny_models/world.py read_run): the mean eq. 6 symmetry error and the
  fraction of prompts still drawn (world.drawn: background and every shape's color) before and after.
- Seeds 0, 1, 2; every run a fresh one-thread process, 2 at a time. Table: mean ± std over seeds.
- Reading rule for the SPO paper's claim (faster convergence than Diffusion-DPO): at half the budget and at the whole
  budget, SPO's mean gain against the best DPO variant's: it holds when SPO leads by more than the larger of the two
  seed stds, fails when it trails by more, and is undecided in between.

    python -m benchmarks.world_preference                              # 5 methods x 3 seeds: ~20 min, 2 shared cores
    python -m benchmarks.world_preference --quick --output_dir /tmp/b  # under a minute: T=8, 2 prompts, 1 CPU s
"""

import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import sys
import tempfile
import time

import numpy as np
import torch

if not __package__:  # python benchmarks/world_preference.py: the repo root on the path, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common
from benchmarks.common import fmt, mean_std, pm

WORLD = os.path.join(common.ROOT, "tiny_models")
REWARD = "symmetry:1,clipscore:1"
SAMPLER = dict(sampler="ddim", eta=1.0, num_inference_steps=20, guidance_scale=1.5)
PAIR_IMAGES = 4  # images per prompt of the offline pairs, as an online round of the demo
# (label, script, flags on top of --preset demo and SAMPLER); "offline" runs get --dataset_name of the built pairs
METHODS = [
    ("DPO offline", "dpo", ["--offline", "--ref_update_rate", "0", "--no_random_flip"]),
    ("DPO online, frozen ref", "dpo", ["--ref_update_rate", "0"]),
    ("DPO online, EMA ref 0.1", "dpo", ["--ref_update_rate", "0.1"]),
    ("DPO online, EMA ref 0.5", "dpo", ["--ref_update_rate", "0.5"]),
    ("SPO", "spo", []),
]
QUICK = dict(num_inference_steps=8, num_eval_prompts=2, budget=1.0, num_pair_prompts=8, probe_steps=2,
             dpo=["--train_batch_size", "4"], online=["--prompts_per_round", "4", "--steps_per_round", "2"],
             spo=["--warm_steps", "2", "--train_batch_size", "2"])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--budget", type=float, default=45.0, help="CPU seconds of training per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_pair_prompts", type=int, default=256,
                        help="offline pairs: the first N world training prompts, one pair each")
    parser.add_argument("--probe_steps", type=int, default=4, help="probe length (online DPO: one round)")
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true",
                        help="T=8, 2 eval prompts, 8 pair prompts, smaller rounds and batches, budget 1 CPU s, seed 0: "
                             "a smoke of a minute")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md and bench_world_preference.png (default: the repo; --quick "
                             "writes files only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "world_preference", argv)
    args.sampler = dict(SAMPLER)
    if args.quick:
        args.sampler["num_inference_steps"] = QUICK["num_inference_steps"]
        args.budget, args.num_pair_prompts, args.probe_steps, args.seeds = (
            QUICK["budget"], QUICK["num_pair_prompts"], QUICK["probe_steps"], [0])
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


def load_world():
    """tiny_models/world.py as a module (the pixel check and eq. 6), without putting tiny_models/ on the path."""
    spec = importlib.util.spec_from_file_location("world", os.path.join(WORLD, "world.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Workers (fresh processes)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def build_pairs(job):
    """Worker: the offline pairs, written to job["path"]: per prompt, job["k"] images of the base pipeline scored with
    the reward, best vs worst as one Pick-a-Pic row. Returns its CPU time and the pairs' reward statistics."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    import dpo
    import rewards
    from diffusers.utils import logging
    logging.disable_progress_bar()
    start = time.process_time()
    pipe = StableDiffusionPipeline.from_pretrained(dpo.WORLD_DEMO["pretrained_model_name_or_path"])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    reward_fn = rewards.build_reward(REWARD, device=torch.device("cpu"), dtype=torch.float32,
                                     **rewards.parse_options(dpo.WORLD_DEMO["reward_options"]))
    prompts = read_lines(dpo.WORLD_DEMO["train_prompts"])[:job["num_prompts"]]
    generator, k, size = torch.Generator().manual_seed(job["seed"]), job["k"], dpo.WORLD_DEMO["resolution"]
    s = job["sampler"]

    def png(image):  # (3, H, W) in [0, 1]
        buffer = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    rows, winners, losers = [], [], []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i:i + 16]
        images = pipe(chunk, height=size, width=size, num_images_per_prompt=k,
                      num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"], eta=s["eta"],
                      generator=generator, output_type="pt").images
        scores = reward_fn(images, [p for p in chunk for _ in range(k)]).view(len(chunk), k)  # prompt-major
        for j, prompt in enumerate(chunk):
            best, worst = int(scores[j].argmax()), int(scores[j].argmin())
            if scores[j, best] <= scores[j, worst]:  # no preference: Pick-a-Pic would record a tie; none is kept
                continue
            win, lose = png(images[j * k + best]), png(images[j * k + worst])
            first = len(rows) % 2 == 0  # the winner on alternate sides: label_0 says which
            rows.append(dict(jpg_0=win if first else lose, jpg_1=lose if first else win, label_0=float(first),
                             caption=prompt))
            winners.append(float(scores[j, best]))
            losers.append(float(scores[j, worst]))
    pq.write_table(pa.table({"jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
                             "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
                             "label_0": [r["label_0"] for r in rows], "caption": [r["caption"] for r in rows]}),
                   job["path"])
    return dict(cpu=time.process_time() - start, pairs=len(rows), prompts=len(prompts),
                winner_reward=float(np.mean(winners)), loser_reward=float(np.mean(losers)))


def train_run(job):
    """Worker: the script's own main() with job["argv"]. Training CPU time runs from the end of the step-0
    evaluation to the call of save_lora after the last step, less the evaluations in between (evaluate() and
    save_lora are looked up in the module at each call, so they are timed by replacing them there). Returns the
    evaluations (step, training CPU s so far, eval reward), the training CPU time, and the before/after grid read
    back by world.read_run (eq. 6 symmetry error, drawn)."""
    script = importlib.import_module(job["module"])
    args = script.parse_args(job["argv"])
    clock, marks, evals = time.process_time, dict(start=None, eval_cpu=0.0, end=None), []
    evaluate, save_lora = script.evaluate, script.save_lora

    def timed_evaluate(models, scheduler, unet, reward_fn, run_args, step):
        begin = clock()
        out = evaluate(models, scheduler, unet, reward_fn, run_args, step)
        if marks["start"] is None:  # the step-0 evaluation: training starts after it
            marks["start"] = clock()
            evals.append(dict(step=step, cpu=0.0, reward=out[0]))
        else:
            evals.append(dict(step=step, cpu=begin - marks["start"] - marks["eval_cpu"], reward=out[0]))
            marks["eval_cpu"] += clock() - begin
        return out

    def timed_save_lora(*a, **k):
        marks["end"] = clock()
        return save_lora(*a, **k)

    script.evaluate, script.save_lora = timed_evaluate, timed_save_lora
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "log.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        script.main(args)
    grid, _ = load_world().read_run(args.output_dir)
    return dict(evals=evals, cpu=marks["end"] - marks["start"] - marks["eval_cpu"], steps=args.max_train_steps,
                **{f"{name}_{key}": [bool(v) if key == "drawn" else float(v) for v in grid[name][key]]
                   for name in ("before", "after") for key in ("symmetry", "drawn")})


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def method_argv(args, module, flags, seed, output_dir, pairs, steps, validation_steps):
    argv = ["--preset", "demo", "--seed", str(seed), "--report_to", "none", "--output_dir", output_dir,
            "--max_train_steps", str(steps), "--validation_steps", str(validation_steps), *flags]
    argv += [x for key, value in args.sampler.items() for x in (f"--{key}", str(value))]
    offline = "--offline" in flags
    if offline:
        argv += ["--dataset_name", pairs]
    if args.quick:
        argv += ["--num_eval_prompts", str(QUICK["num_eval_prompts"])] + QUICK[module]
        argv += QUICK["online"] if module == "dpo" and not offline else []
    return argv


def probe_steps(args, module, flags):
    """Steps of the probe: online DPO one whole round (its sampling is paid at a round's first step)."""
    if module == "dpo" and "--offline" not in flags:
        import dpo
        return int(dpo.parse_args(method_argv(args, module, flags, 0, "unused", None, 1, 1)).steps_per_round)
    return args.probe_steps


def gain_at(evals, cpu):
    """The eval gain over step 0 at `cpu` training CPU seconds, linear between evaluations (the last one beyond)."""
    xs, ys = [e["cpu"] for e in evals], [e["reward"] - evals[0]["reward"] for e in evals]
    return float(np.interp(cpu, xs, ys))


def summarize(run, budget):
    e = run["evals"]
    gain = e[-1]["reward"] - e[0]["reward"]
    return dict(base=e[0]["reward"], final=e[-1]["reward"], gain=gain, gain_per_s=gain / run["cpu"],
                gain_half=gain_at(e, budget / 2), gain_full=gain_at(e, budget),
                sym_before=float(np.mean(run["before_symmetry"])), sym_after=float(np.mean(run["after_symmetry"])),
                drawn_before=float(np.mean(run["before_drawn"])), drawn_after=float(np.mean(run["after_drawn"])))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

HEAD = ["method", "steps", "training CPU s", "eval reward, step 0", "eval reward, end", "gain",
        "gain per CPU s (x1000)", "gain at half the budget", "symmetry error (eq. 6), step 0 -> end",
        "prompts drawn, step 0 -> end"]


def table(runs, methods):
    rows = []
    for label in methods:
        ok = [r for r in runs if r["method"] == label and r["status"] == "ok"]
        failed = len([r for r in runs if r["method"] == label]) - len(ok)
        if not ok:
            rows.append([label] + ["—"] * (len(HEAD) - 1))
            continue
        s = [r["summary"] for r in ok]
        col = lambda key, scale=1.0, digits=4: pm([x[key] * scale for x in s], digits)  # noqa: E731
        rows.append([label + (f" ({len(ok)} of {len(ok) + failed} ran)" if failed else ""),
                     "/".join(sorted({str(r["steps"]) for r in ok})), pm([r["cpu"] for r in ok], 3),
                     col("base"), col("final"), col("gain", digits=3), col("gain_per_s", 1000, 3),
                     col("gain_half", digits=3), f"{col('sym_before', digits=3)} -> {col('sym_after', digits=3)}",
                     f"{col('drawn_before', digits=2)} -> {col('drawn_after', digits=2)}"])
    return common.markdown_table(HEAD, rows)


def lost_text(s, args):
    """How many evaluation images (prompts x seeds) lost what their prompt asks for, from the mean drawn fractions."""
    total = (QUICK["num_eval_prompts"] if args.quick else 8) * len(args.seeds)
    lost = round((s["drawn_before"][0] - s["drawn_after"][0]) * total)
    return f" ({lost} of {total} images lost a shape or the background color)" if lost > 0 else ""


def reading(runs, methods, pairs, args):
    ok = [r for r in runs if r["status"] == "ok"]
    stats = {m: {key: mean_std([r["summary"][key] for r in ok if r["method"] == m])
                 for key in ("gain", "gain_per_s", "gain_half", "gain_full", "sym_before", "sym_after",
                             "drawn_before", "drawn_after")}
             for m in methods if any(r["method"] == m for r in ok)}
    out = []
    if not stats:
        return "- No run finished."
    order = sorted(stats, key=lambda m: -stats[m]["gain_per_s"][0])
    out.append("Ranking by mean eval gain per training CPU second: " + ", ".join(
        f"{m} ({1000 * stats[m]['gain_per_s'][0]:+.3g} ± {1000 * stats[m]['gain_per_s'][1]:.2g} per 1000 s)"
        for m in order) + ".")
    same = all(len({round(r["summary"]["base"], 6) for r in ok if r["seed"] == seed}) <= 1 for seed in args.seeds)
    out.append("Step 0 is the same for every method of a seed (equal eval rewards): one model, one sampler, one noise."
               if same else "Step 0 differs between methods of one seed: the samplers or the noise differ, and the "
               "gains are not comparable.")
    for m in order:
        s = stats[m]
        agree = (s["gain"][0] > 0) == (s["sym_after"][0] < s["sym_before"][0])
        out.append(f"{m}: eval gain {s['gain'][0]:+.3g} ± {s['gain'][1]:.2g}; eq. 6 symmetry error computed outside "
                   f"rewards.py {s['sym_before'][0]:.3f} -> {s['sym_after'][0]:.3f} "
                   f"({'agrees' if agree else 'disagrees'} in direction with the reward); prompts still drawn "
                   f"{s['drawn_before'][0]:.0%} -> {s['drawn_after'][0]:.0%}"
                   f"{lost_text(s, args)}.")
    dpo_methods = [m for m in stats if m.startswith("DPO")]
    if "DPO online, frozen ref" in stats:
        frozen = stats["DPO online, frozen ref"]["gain"]
        for m in [m for m in dpo_methods if "EMA" in m]:
            g = stats[m]["gain"]
            gap, noise = g[0] - frozen[0], max(g[1], frozen[1])
            out.append(f"Moving reference, {m.split('EMA ref ')[1]}: gain {gap:+.3g} against the frozen reference "
                       f"({'more' if abs(gap) > noise else 'less'} than the larger seed std, {noise:.2g}).")
    if pairs is not None and "DPO offline" in stats:
        cpu = np.mean([r["cpu"] for r in ok if r["method"] == "DPO offline"])
        gain = stats["DPO offline"]["gain"][0]
        out.append(f"Offline DPO's data: {pairs['pairs']} pairs from {pairs['prompts']} prompts x {PAIR_IMAGES} images "
                   f"(mean reward of winners {pairs['winner_reward']:.3f}, of losers {pairs['loser_reward']:.3f}) "
                   f"cost {pairs['cpu']:.0f} CPU s, {pairs['cpu'] / args.budget:.1f}x a run's training budget; "
                   f"counted once per run, its gain per CPU s would be {1000 * gain / (cpu + pairs['cpu']):+.3g} per "
                   f"1000 s instead of {1000 * gain / cpu:+.3g}.")
    if "SPO" in stats and dpo_methods:
        for key, when in (("gain_half", "half the budget"), ("gain_full", "the whole budget")):
            best = max(dpo_methods, key=lambda m: stats[m][key][0])
            spo, dpo = stats["SPO"][key], stats[best][key]
            gap, noise = spo[0] - dpo[0], max(spo[1], dpo[1])
            verdict = ("is undecided (one seed: no spread to judge by)" if len(args.seeds) < 2 else "holds"
                       if gap > noise else "fails" if gap < -noise else "is undecided (within the seed std)")
            out.append(f"SPO's claim of faster convergence than Diffusion-DPO, at {when} ({when_seconds(key, args)} "
                       f"CPU s): SPO {spo[0]:+.3g} ± {spo[1]:.2g} against the best DPO variant, {best}, "
                       f"{dpo[0]:+.3g} ± {dpo[1]:.2g}: it {verdict} here.")
    return "\n".join(f"- {line}" for line in out)


def when_seconds(key, args):
    return f"{args.budget / 2 if key == 'gain_half' else args.budget:g}"


def plot(runs, methods, args, path):
    ok = [r for r in runs if r["status"] == "ok"]
    with common.figure(path, 1, 2, figsize=(12, 4.2)) as (fig, (curve, world)):
        grid = np.linspace(0, args.budget, 41)
        for i, m in enumerate(methods):
            mine = [r for r in ok if r["method"] == m]
            if not mine:
                continue
            for r in mine:
                curve.plot([e["cpu"] for e in r["evals"]], [e["reward"] - r["evals"][0]["reward"] for e in r["evals"]],
                           color=f"C{i}", alpha=0.25, lw=0.8)
            curve.plot(grid, np.mean([[gain_at(r["evals"], c) for c in grid] for r in mine], axis=0), color=f"C{i}",
                       lw=2, label=m)
        curve.axhline(0, color="gray", lw=0.8)
        curve.axvline(args.budget / 2, color="gray", ls=":", lw=0.8)
        curve.set_xlabel("training CPU s")
        curve.set_ylabel("eval reward - step 0 (held-out prompts)")
        curve.set_title("gain against CPU time (thin: seeds; bold: mean)")
        curve.legend(fontsize=8)
        labels = [m for m in methods if any(r["method"] == m for r in ok)]
        for i, m in enumerate(labels):
            s = [r["summary"] for r in ok if r["method"] == m]
            world.errorbar(np.mean([x["sym_after"] for x in s]), np.mean([x["drawn_after"] for x in s]),
                           xerr=np.std([x["sym_after"] for x in s]), yerr=np.std([x["drawn_after"] for x in s]),
                           fmt="o", color=f"C{methods.index(m)}", label=m, capsize=3)
        base = [r["summary"] for r in ok]
        if base:
            world.plot(np.mean([x["sym_before"] for x in base]), np.mean([x["drawn_before"] for x in base]), "k*",
                       ms=12, label="step 0")
        world.set_xlabel("eq. 6 symmetry error of the grid, end (lower is better)")
        world.set_ylabel("fraction of prompts still drawn, end")
        world.set_title("read back from the pixels (world.py)")
        world.legend(fontsize=8)
        fig.suptitle(f"{args.budget:g} CPU s of training per run, seeds {', '.join(map(str, args.seeds))}")


def main(args):
    started = time.time()
    context = common.fork_context(["dpo", "spo"])
    methods = [label for label, *_ in METHODS]
    with tempfile.TemporaryDirectory(prefix="bench-world-preference-") as folder:
        pairs_path = os.path.join(folder, "pairs.parquet")
        # 0. the offline pairs, once
        pairs = common.run_in_fresh_process(context, build_pairs, dict(
            path=pairs_path, num_prompts=args.num_pair_prompts, k=PAIR_IMAGES, seed=0, sampler=args.sampler,
            num_threads=args.num_threads))
        if pairs["status"] != "ok":
            common.error(f"building the pairs failed: {pairs['reason']}\n{pairs.get('traceback', '')}")
        print(f"pairs: {pairs['pairs']} from {pairs['prompts']} prompts in {pairs['cpu']:.1f} CPU s; winners "
              f"{pairs['winner_reward']:.3f}, losers {pairs['loser_reward']:.3f}", flush=True)
        # 1. probe: CPU s per training step of each method (seed 0)
        probe_jobs = []
        for label, module, flags in METHODS:
            n = probe_steps(args, module, flags)
            probe_jobs.append(dict(method=label, module=module, probe_steps=n, num_threads=args.num_threads, argv=(
                method_argv(args, module, flags, args.seeds[0], os.path.join(folder, f"probe-{len(probe_jobs)}"),
                            pairs_path, n, n))))
        per_step = {}
        for job, result in zip(probe_jobs, common.run_parallel(context, train_run, probe_jobs, args.jobs)):
            if result["status"] != "ok":
                common.error(f"probing {job['method']} failed: {result['reason']}\n{result.get('traceback', '')}")
            per_step[job["method"]] = result["cpu"] / job["probe_steps"]
            print(f"probe {job['method']}: {per_step[job['method']]:.3f} CPU s/step", flush=True)
        # 2. the runs: max_train_steps = budget / probed s per step; evaluations at 0, every quarter, the end
        jobs = []
        for label, module, flags in METHODS:
            steps = max(1, int(args.budget / per_step[label]))
            for seed in args.seeds:
                out = os.path.join(folder, f"run-{len(jobs)}")
                jobs.append(dict(method=label, module=module, seed=seed, num_threads=args.num_threads,
                                 argv=method_argv(args, module, flags, seed, out, pairs_path, steps,
                                                  max(1, steps // 4))))
        runs = []
        for job, result in zip(jobs, common.run_parallel(context, train_run, jobs, args.jobs)):
            run = dict(method=job["method"], seed=job["seed"], **result)
            if run["status"] == "ok":
                run["summary"] = summarize(run, args.budget)
                s = run["summary"]
                print(f"{run['method']} seed {run['seed']}: {run['steps']} steps, {run['cpu']:.1f} training CPU s; "
                      f"eval reward {s['base']:.4g} -> {s['final']:.4g}; symmetry error {s['sym_before']:.3f} -> "
                      f"{s['sym_after']:.3f}; drawn {s['drawn_before']:.0%} -> {s['drawn_after']:.0%}", flush=True)
            else:
                print(f"{run['method']} seed {run['seed']}: {run['status']}: {run['reason']}\n"
                      f"{run.get('traceback', '')}", flush=True)
            runs.append(run)
    seconds = time.time() - started
    text_table, text = table(runs, methods), reading(runs, methods, pairs, args)
    print("\n" + text_table + "\n\n" + text + f"\n\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        png = os.path.join(args.output_dir, "bench_world_preference.png")
        plot(runs, methods, args, png)
        s = args.sampler
        settings = (
            f"Protocol: the module docstring (fixed before the first run). Reward `{REWARD}` with the world's reward "
            f"models, for ranking, SPO's comparisons and evaluation. Every image sampled at DDIM eta {s['eta']:g}, "
            f"T={s['num_inference_steps']}, CFG {s['guidance_scale']:g} (spo.py's demo sampler; dpo.py's demo "
            f"samples at eta 0, T=10, CFG 3). Each method is its script's `main()` with `--preset demo` and only the "
            f"sampler, seed, max_train_steps, validation_steps and its own flags changed: "
            + "; ".join(f"{label}: `{' '.join(flags) or '(the demo)'}`" for label, _, flags in METHODS) +
            f". Offline pairs: {pairs['pairs']} Pick-a-Pic rows, best vs worst of {PAIR_IMAGES} base-model images "
            f"for each of the first {pairs['prompts']} world training prompts, built in {pairs['cpu']:.0f} CPU s "
            f"(outside the budget). **Budget**: {args.budget:g} CPU s of training per run; max_train_steps from a "
            f"probe of the CPU time per step (seed 0: " + ", ".join(f"{m} {per_step[m]:.2f} s" for m in methods) +
            f"); the training CPU time each run used is measured (from the end of the step-0 evaluation to the end "
            f"of the last step, less evaluations) and is what the gain per CPU s divides by. **Evaluation**: the "
            f"scripts' own, on the {QUICK['num_eval_prompts'] if args.quick else 8} held-out prompts of "
            f"`tiny_models/world-eval-prompts.txt` with the fixed noise of each seed, at step 0, every quarter of "
            f"the run (online DPO also at each round's end) and at the end; \"gain at half the budget\" interpolates "
            f"them at {args.budget / 2:g} CPU s. Symmetry error and prompts drawn are read back from the "
            f"before/after grid by `tiny_models/world.py` (eq. 6 in numpy; background and every shape's color by "
            f"the pixel check), not by rewards.py. Mean ± std over seeds {', '.join(map(str, args.seeds))}; "
            f"each run a fresh one-thread process, {args.jobs} at a time.")
        body = "\n".join([
            "## Preference methods on the tiny world: offline DPO, online DPO (frozen and moving reference), SPO", "",
            *common.header_lines(args, seconds, "CPU time of each one-thread process"), "", settings, "",
            text_table, "", "Reading (computed from the numbers above):", "", text, "",
            f"![gain against CPU time, and the pixels read back]({os.path.basename(png)})", ""])
        common.write_report(args.output_dir, "world_preference", body)
    if any(r["status"] != "ok" for r in runs):
        sys.exit(1)
    return runs


if __name__ == "__main__":
    main(parse_args())
