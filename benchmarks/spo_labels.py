"""Does SPO move the final image the way its labels say? spo.py trained on the tiny world with a pixel preference,
its labels right, swapped or random, at several CFG scales.

The README left open why SPO lowered a brightness preference at CFG 2-3, where step_preference finds the step-level
win mostly carrying to the final image. This separates a learning signal that points the wrong way from drift that
any update would cause. Protocol (fixed before the first run): spo.py's own main() with `--preset demo` (the world,
DDIM eta 1, T=20, k=4, 6 warm steps, batch 4, lr 1e-3, 30 steps) at each CFG scale, `--pair_threshold 0` (every
comparison makes a pair), and as the preference model, scoring the decoded x_0 predictions:
- right: mean brightness (higher wins);
- swapped: minus mean brightness (`brightness:-1`, darker wins);
- random: uniform random scores (labels independent of the images).
Measured from the before/after grid's pixels (numpy, outside rewards.py): the mean brightness of the 8 held-out
prompts' images before and after, with the same noise, and how many prompts are still drawn (the world's check).
A signal that works raises brightness with the right labels and lowers it with the swapped ones; random labels
show the drift. At every CFG scale above 1, the right labels once more with SPO's ratio clamp widened
(`--clip_eps 0.99` instead of 0.1): whether the clamp decides the direction. One fresh one-thread process per run.

    python -m benchmarks.spo_labels                                  # CFG 1, 3, 6 x 3 label sets: about 10 CPU min
    python -m benchmarks.spo_labels --quick --output_dir /tmp/b      # seconds: 2 steps, CFG 3, right and random
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time

import numpy as np

if not __package__:  # python benchmarks/spo_labels.py: the repo root on the path, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common

LABELS = {"right": "brightness", "swapped": "brightness:-1", "random": "random_scores"}
WIDE_CLAMP = ["--clip_eps", "0.99"]  # the extra run at CFG > 1: right labels, the ratio clamp [0.01, 1.99]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    parser.add_argument("--labels", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help="2 training steps, CFG 3, right and random labels")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md (default: the repo; --quick writes files only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "spo_labels", argv)
    args.wide_clamp = not args.quick
    if args.quick:
        args.guidance_scales, args.labels = [3.0], ["right", "random"]
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


def register_pixel_preferences():
    """Two preference models for this experiment, added to rewards.py's registry in this process only: the mean
    pixel of the images, and uniform random scores from a seeded generator."""
    import torch

    import rewards

    def brightness(device, dtype, options):
        def score(images, prompts):
            value = images.float().mean(dim=(1, 2, 3))
            return value, value
        return score

    def random_scores(device, dtype, options):
        generator = torch.Generator().manual_seed(0)

        def score(images, prompts):
            value = torch.rand(len(images), generator=generator).to(images.device)
            return value, value
        return score

    rewards.REWARDS["brightness"] = rewards.RewardInfo(brightness, True, False, "mean pixel (spo_labels)")
    rewards.REWARDS["random_scores"] = rewards.RewardInfo(random_scores, False, False, "uniform (spo_labels)")


def run_spo(job):
    """Worker: spo.py's main() with --preset demo and this run's preference and CFG; the grid read back."""
    register_pixel_preferences()
    import spo
    sys.path.insert(0, os.path.join(common.ROOT, "tiny_models"))
    import world
    args = spo.parse_args(["--preset", "demo", "--reward", LABELS[job["labels"]], "--pair_threshold", "0",
                           "--guidance_scale", str(job["cfg"]), "--seed", str(job["seed"]), *job["extra"],
                           *job["flags"], "--output_dir", job["output_dir"]])
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.process_time()
    with open(os.path.join(args.output_dir, "log.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        spo.main(args)
    result, prompts = world.read_run(args.output_dir)
    before, after = world.split_grid(os.path.join(args.output_dir, "samples", "before_after.png"), len(prompts))
    mean = lambda images: float(np.mean([x.astype(np.float64).mean() / 255 for x in images]))  # noqa: E731
    return dict(before=mean(before), after=mean(after), drawn_before=sum(result["before"]["drawn"]),
                drawn_after=sum(result["after"]["drawn"]), n=len(prompts), cpu=time.process_time() - start,
                steps=args.max_train_steps, clip_eps=args.clip_eps)


def reading(args, results):
    """One line per CFG scale, from the numbers: the gains of the three label sets and what they say."""
    lines = []
    for cfg in args.guidance_scales:
        gain = {labels: r["after"] - r["before"] for (c, labels), r in results.items() if c == cfg}
        wide = gain.pop("right, wide clamp", None)
        parts = ", ".join(f"{labels} {gain[labels]:+.4f}" for labels in args.labels if labels in gain)
        verdict = ""
        if {"right", "swapped"} <= set(gain):
            if gain["right"] > 0 > gain["swapped"]:
                verdict = ": the labels steer it as they say"
            elif gain["right"] < 0 < gain["swapped"]:
                verdict = ": it moves against its labels, both ways"
            else:
                verdict = ": the same direction whatever the labels"
            if "random" in gain:
                verdict += (f" (random labels {gain['random']:+.4f}, "
                            f"{abs(gain['random']) / max(abs(gain['right']), abs(gain['swapped']), 1e-9):.2f}x the "
                            f"larger of the two)")
        if wide is not None and "right" in gain:
            verdict += (f"; right labels with the clamp widened (--clip_eps 0.99) {wide:+.4f}, "
                        f"{'the sign the labels ask for' if wide > 0 else 'still against them'}")
        lines.append(f"- CFG {cfg:g}: brightness gain {parts}{verdict}.")
    return lines


def main(args):
    started = time.time()
    context = common.fork_context(["spo"])
    extra = ["--max_train_steps", "2", "--validation_steps", "2"] if args.quick else []
    keys = [(cfg, labels) for cfg in args.guidance_scales for labels in args.labels]
    if args.wide_clamp and "right" in args.labels:
        keys += [(cfg, "right, wide clamp") for cfg in args.guidance_scales if cfg > 1]
    with tempfile.TemporaryDirectory(prefix="bench-spo-labels-") as folder:
        jobs = [dict(cfg=cfg, labels=labels.split(",")[0], flags=WIDE_CLAMP if "wide" in labels else [], seed=args.seed,
                     extra=extra, num_threads=args.num_threads,
                     output_dir=os.path.join(folder, f"cfg{cfg:g}-{labels.replace(', ', '-').replace(' ', '_')}"))
                for cfg, labels in keys]
        out = common.run_parallel(context, run_spo, jobs, args.jobs)
    results = {}
    for key, result in zip(keys, out):
        if result["status"] != "ok":
            common.error(f"spo.py CFG {key[0]:g}, {key[1]} labels: {result['reason']}\n{result.get('traceback', '')}")
        results[key] = result
    head = ["CFG", "labels", "preference (--reward)", "--clip_eps", "brightness before", "after", "gain",
            "prompts drawn", "CPU s"]
    table = common.markdown_table(head, [
        [f"{cfg:g}", labels, f"`{LABELS[labels.split(',')[0]]}`", f"{r['clip_eps']:g}", f"{r['before']:.4f}",
         f"{r['after']:.4f}",
         f"{r['after'] - r['before']:+.4f}", f"{r['drawn_before']}/{r['n']} → {r['drawn_after']}/{r['n']}",
         f"{r['cpu']:.0f}"] for (cfg, labels), r in results.items()])
    lines = reading(args, results)
    seconds = time.time() - started
    print(table + "\n\n" + "\n".join(lines))
    if args.output_dir is not None:
        steps = next(iter(results.values()))["steps"]
        body = "\n".join([
            "## Does SPO move the final image the way its labels say? (the tiny world, a brightness preference)", "",
            *common.header_lines(args, seconds, "CPU time of each one-thread process"), "",
            f"Protocol (the module docstring): `spo.py --preset demo` ({steps} steps, seed {args.seed}) at each CFG "
            f"scale with `--pair_threshold 0`; the preference scoring the decoded x_0 predictions is the mean "
            f"brightness (right), minus it (swapped) or uniform random scores (random). Brightness and prompts drawn "
            f"are read from the before/after grid's pixels (8 held-out prompts, the same noise before and after). "
            f"One seed.", "", table, "", "Reading (computed from the numbers above):", "", *lines, ""])
        common.write_report(args.output_dir, "spo_labels", body)
    return results


if __name__ == "__main__":
    main(parse_args())
