"""The README's gallery: every method's `--preset demo` on the trained tiny world, run as a user runs it, one
before/after row per method on the same 8 held-out prompts and noise.

Each demo runs in a fresh one-thread process (--jobs at a time) with its preset unchanged except the output folder
(and --seed); its samples/before_after.png is read back by tiny_models/world.py, outside rewards.py: the eq. 6
symmetry error of each image (numpy) and whether each prompt is still drawn. The demos differ in sampler and CFG
(their presets say why), so each row's "before" is the base model under that method's own sampler. Writes
docs/gallery.png (one row per method: its 8 "before" images, then its 8 "after" images) and the gallery section of
BENCHMARKS.md.

    python -m benchmarks.gallery                                  # 7 demos and DRaFT-LV at 2 more lrs, 8 CPU min
    python -m benchmarks.gallery --model tiny_models/world-sd3    # the same on the SD3 world (gallery_sd3 section)
    python -m benchmarks.gallery --quick --output_dir /tmp/b      # seconds: 2 steps each, drtune and spo only
"""

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import time

import numpy as np

if not __package__:  # python benchmarks/gallery.py: the repo root on the path, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common

# (label, script, flags on top of its --preset demo)
DEMOS = [
    ("DRTune", "drtune", []),
    ("ReFL", "refl", []),
    ("DRaFT-K", "draft", []),
    ("DRaFT-LV", "draft", ["--draft_variant", "lv"]),
    # DRaFT-LV has no demo preset of its own and collapses at the demo's lr 3e-3: the same at two lower lrs
    ("DRaFT-LV, lr 1e-3", "draft", ["--draft_variant", "lv", "--learning_rate", "1e-3"]),
    ("DRaFT-LV, lr 3e-4", "draft", ["--draft_variant", "lv", "--learning_rate", "3e-4"]),
    ("AlignProp", "alignprop", []),
    ("online DPO", "dpo", []),
    ("SPO", "spo", []),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=os.path.join(common.ROOT, "tiny_models", "world-sd15"),
                        help="the world the demos run on (its demo presets' settings for that family)")
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help="2 training steps, DRTune and SPO only: seconds")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md; the image goes to OUTPUT_DIR/docs/gallery.png (default: the "
                             "repo; --quick writes files only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "gallery", argv)
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


def run_demo(job):
    """Worker: the script's main() with --preset demo and job["flags"]; returns the grid read back and the metrics
    of its first and last evaluation."""
    import json
    script = importlib.import_module(job["module"])
    args = script.parse_args(["--preset", "demo", *job["flags"], "--output_dir", job["output_dir"]])
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.process_time()
    with open(os.path.join(args.output_dir, "log.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        script.main(args)
    sys.path.insert(0, os.path.join(common.ROOT, "tiny_models"))
    import world
    result, prompts = world.read_run(args.output_dir)
    before, after = world.split_grid(os.path.join(args.output_dir, "samples", "before_after.png"), len(prompts))
    with open(os.path.join(args.output_dir, "metrics.jsonl")) as f:
        evals = [row["eval_reward"] for row in map(json.loads, f) if "eval_reward" in row]
    return dict(cpu=time.process_time() - start, before=np.stack(before), after=np.stack(after),
                symmetry_before=result["before"]["symmetry"], symmetry_after=result["after"]["symmetry"],
                drawn_before=result["before"]["drawn"], drawn_after=result["after"]["drawn"], evals=evals,
                steps=args.max_train_steps, guidance_scale=args.guidance_scale, sampler=args.sampler, eta=args.eta)


def sampling(r):
    """'DDPM, 6', 'DDIM, eta 1, 1.5', 'flow Euler, 4': a demo's sampler and CFG."""
    name = "flow Euler" if r["sampler"] == "euler" else r["sampler"].upper()
    eta = f", eta {r['eta']:g}" if r["eta"] else ""
    return f"{name}{eta}, {r['guidance_scale']:g}"


def compose(results, path, scale=3, gap=4):
    """One row per method: its before images, a gap, its after images; enlarged `scale` times, pixels kept sharp."""
    from PIL import Image
    rows = []
    for r in results.values():
        before, after = np.concatenate(list(r["before"]), 1), np.concatenate(list(r["after"]), 1)
        rows.append(np.concatenate([before, np.full((before.shape[0], gap, 3), 255, np.uint8), after], 1))
    spacer = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([x for row in rows for x in (row, spacer)][:-1], 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(args):
    started = time.time()
    demos = [d for d in DEMOS if not args.quick or d[0] in ("DRTune", "SPO")]
    context = common.fork_context([module for _, module, _ in demos])
    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as folder:
        extra = ["--seed", str(args.seed), "--pretrained_model_name_or_path", args.model]
        extra += ["--max_train_steps", "2", "--validation_steps", "2"] if args.quick else []
        jobs = [dict(module=module, flags=flags + extra, output_dir=os.path.join(folder, label.replace(" ", "_")),
                     num_threads=args.num_threads) for label, module, flags in demos]
        out = common.run_parallel(context, run_demo, jobs, args.jobs)
    results = {}
    for (label, module, _), result in zip(demos, out):
        if result["status"] != "ok":
            common.error(f"{module}.py --preset demo: {result['reason']}\n{result.get('traceback', '')}")
        results[label] = result
    head = ["method (row, top to bottom)", "command", "sampler, CFG", "steps", "eval reward", "symmetry error (numpy)",
            "prompts drawn", "CPU s"]
    table = common.markdown_table(head, [
        [label, f"`{module}.py --preset demo{' ' + ' '.join(flags) if flags else ''}`",
         sampling(r), str(r["steps"]), f"{r['evals'][0]:.3g} → {r['evals'][-1]:.3g}",
         f"{np.mean(r['symmetry_before']):.3f} → {np.mean(r['symmetry_after']):.3f}",
         f"{sum(r['drawn_before'])}/{len(r['drawn_before'])} → {sum(r['drawn_after'])}/{len(r['drawn_after'])}",
         f"{r['cpu']:.0f}"] for (label, module, flags), r in zip(demos, results.values())])
    seconds = time.time() - started
    print(table)
    if args.output_dir is not None:
        tag = common.model_tag(args.model)  # the SD3 world's gallery is a section and image of its own
        compose(results, os.path.join(args.output_dir, "docs", f"gallery{tag}.png"))
        body = "\n".join([
            f"## Gallery: every demo on the tiny {'SD3 ' if tag else ''}world (`{os.path.relpath(args.model, common.ROOT)}`)",
            "",
            *common.header_lines(args, seconds, "CPU time of each one-thread process"), "",
            f"Each script's `--preset demo` as a user runs it (seed {args.seed}), the reward `symmetry:1,clipscore:1`; "
            f"`docs/gallery{tag}.png` shows one row per method, its 8 \"before\" images (the base model under the "
            f"method's sampler) then its 8 \"after\" images, on the 8 held-out prompts of "
            f"`tiny_models/world-eval-prompts.txt`. Symmetry error (eq. 6, numpy) and prompts drawn (the world's "
            f"pixel check) are read back from the images, outside rewards.py.", "", table, "",
            f"![gallery](docs/gallery{tag}.png)", ""])
        common.write_report(args.output_dir, f"gallery{tag}", body)
    return results


if __name__ == "__main__":
    main(parse_args())
