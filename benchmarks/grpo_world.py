"""GRPO on the tiny world's weakness: two shapes, each with a position word (GenEval's "position" task in miniature).

Protocol (fixed before the runs): `grpo.py --preset demo` (the world's pixel checker as the reward: the plug-ins
tiny_models/world.py:reward, the fraction of the caption's fields drawn right, and :placement, the fraction of its
position words obeyed) for each --seeds, run as a user runs it (one-thread fresh process, the preset unchanged but the
output folder and seed), or finished runs given with --runs. Each run's LoRA is read as a new user would sample it:
the family's plain diffusers pipeline with the LoRA loaded, 20 steps, at every sampler of the family (DDPM and DDIM;
the SD3 world: its Euler) and CFG 3 and 5, on the 40 held-out captions of world-position-eval-prompts.txt (two
shapes, each with a position word, the two words any two different sides; never trained on) and on 64 held-out
captions of the world's usual mix (to see that backgrounds, colors and shapes do not fall). Read by world.check
(pixel statistics, no model): both shapes placed (drawn, each nearest its word's anchor), split into captions whose
words are opposite sides (left/right, top/bottom: the only two-shape layouts of the world's training scenes) and the
others (left with top, ...: layouts it never drew); both drawn; background; on the mix: background, color, shape.
The base model is read the same way. Goal (issue 20): both placed >= 50% on the held-out captions.

The demo trains on world-position-train-prompts.txt: 256 captions whose words are opposite sides. Group-relative RL
reinforces what the policy samples, and the base does not draw the other layouts: on 12 such captions, 16 samples
each, both shapes were placed in 0 of 192 (DDIM eta 1 at CFG 5, and again DDPM at CFG 3), the first-named shape at
its word in 1 to 2, so their groups carry next to no signal for it.

    python -m benchmarks.grpo_world                                   # 3 seeds, about 3 x 12 CPU min
    python -m benchmarks.grpo_world --model tiny_models/world-sd3     # Flow-GRPO on the SD3 world (grpo_world_sd3)
    python -m benchmarks.grpo_world --runs outputs/grpo-demo          # read finished runs only
    python -m benchmarks.grpo_world --quick --output_dir /tmp/b       # seconds: 2 rounds, 8 prompts
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

if not __package__:  # python benchmarks/grpo_world.py: the repo root on the path, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common

WORLD = os.path.join(common.ROOT, "tiny_models")
sys.path.insert(0, WORLD)
import check_world  # noqa: E402
import world  # noqa: E402

GUIDANCE = (3.0, 5.0)


def read_prompts(name):
    with open(os.path.join(WORLD, name)) as f:
        return [line.strip() for line in f if line.strip()]


def load_pipeline(model, lora=None):
    """The family's plain diffusers pipeline (as check_world loads it), with a run's LoRA when given."""
    import diffusers

    index = check_world.model_index(model)
    family = check_world.model_family(model, index)
    kwargs = dict(safety_checker=None, requires_safety_checker=False) if family == "sd15" else {}
    text = None
    if family == "sd3" and index.get("text_encoder_3") == [None, None]:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
        text = 77
    pipe = getattr(diffusers, check_world.PIPELINES[family]).from_pretrained(model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe, family, text


OPPOSITE = ({"left", "right"}, {"top", "bottom"})  # the only two-shape layouts of the world's training scenes


def opposite(prompt):
    return {s["position"] for s in world.parse(prompt)["shapes"]} in OPPOSITE


def read(pipe, family, text, position_prompts, mix_prompts, seed=0):
    """{sampler/cfg: dict(both_placed, both_opposite, both_mixed, both_drawn, background, mix_background, mix_color,
    mix_shape)}: both placed over all position captions, over those whose words are opposite sides (the layouts the
    world was trained on) and over the others (left with top, ...: layouts it never saw)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    base_config, out = pipe.scheduler.config, {}
    same = np.array([opposite(p) for p in position_prompts])
    for sampler in check_world.SAMPLERS[family]:
        if sampler != "euler":
            pipe.scheduler = dict(ddpm=DDPMScheduler, ddim=DDIMScheduler)[sampler].from_config(base_config)
        for cfg in GUIDANCE:
            images = check_world.generate(pipe, position_prompts, cfg, 20, seed, text)
            checks = [world.check(im, p) for im, p in zip(images, position_prompts)]
            placed = np.array([bool(c["position"]) for c in checks])
            mix = [world.check(im, p) for im, p in
                   zip(check_world.generate(pipe, mix_prompts, cfg, 20, seed, text), mix_prompts)]
            score = check_world.score(mix)
            out[f"{sampler}/{cfg:g}"] = dict(
                both_placed=float(placed.mean()), both_opposite=float(placed[same].mean()),
                both_mixed=float(placed[~same].mean()) if (~same).any() else float("nan"),
                both_drawn=float(np.mean([bool(c["colors_pair"]) for c in checks])),
                background=float(np.mean([c["background"] for c in checks])),
                mix_background=score["background"][0], mix_color=score["color"][0], mix_shape=score["shape"][0])
    return out


def train(args, seed, output_dir):
    command = [sys.executable, os.path.join(common.ROOT, "grpo.py"), "--preset", "demo", "--output_dir", output_dir,
               "--seed", str(seed), "--report_to", "none", "--pretrained_model_name_or_path", args.model]
    if args.quick:
        command += ["--max_train_steps", "2", "--validation_steps", "1", "--train_batch_size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.process_time()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    usage = os.times()
    return usage.children_user + usage.children_system - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.path.join(WORLD, "world-sd15"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", default=None, help="comma-separated finished run folders: read them, train nothing")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 8 prompts: a smoke test of the benchmark")
    parser.add_argument("--output_dir", default=common.ROOT, help="where BENCHMARKS.md is (re)written")
    args = common.finish_args(parser.parse_args(argv), "grpo_world", argv)
    import torch
    torch.set_num_threads(args.num_threads or 1)
    start = time.time()
    positions = read_prompts("world-position-eval-prompts.txt")
    mix = check_world.eval_prompts(64, "any")
    if args.quick:
        positions, mix = positions[:8], mix[:8]
    with tempfile.TemporaryDirectory() as tmp:
        if args.runs:
            runs = [(os.path.basename(r.rstrip("/")), r, None) for r in args.runs.split(",")]
        else:
            runs = []
            for seed in map(int, args.seeds.split(",")):
                out = os.path.join(tmp, f"seed{seed}")
                runs.append((f"seed {seed}", out, train(args, seed, out)))
        pipe, family, text = load_pipeline(args.model)
        results = {"base": read(pipe, family, text, positions, mix)}
        metrics = {}
        for name, path, _ in runs:
            pipe, family, text = load_pipeline(args.model, path)
            results[name] = read(pipe, family, text, positions, mix)
            if os.path.exists(os.path.join(path, "metrics.jsonl")):  # a checkpoint-N folder has none
                with open(os.path.join(path, "metrics.jsonl")) as f:
                    metrics[name] = [json.loads(line) for line in f]
    body = report(args, results, runs, metrics, time.time() - start)
    common.write_report(args.output_dir, "grpo_world" + common.model_tag(args.model), body)
    return results


def report(args, results, runs, metrics, seconds):
    settings = list(results["base"])
    positions = read_prompts("world-position-eval-prompts.txt")
    n_opposite = sum(opposite(p) for p in positions[:8 if args.quick else None])
    lines = ["## GRPO on the world's two-shape placement" + (" (SD3 world)" if common.model_tag(args.model) else ""),
             "", *common.header_lines(args, seconds, "CPU seconds of the training processes"), "",
             f"Cells: both shapes placed right on the held-out two-shape captions with position words (never trained "
             f"on), all / the {n_opposite} whose words are opposite sides (the only layouts of the world's training "
             f"scenes) / the others (left with top, ...: layouts it never saw); both drawn; background; then on the "
             f"world's usual mix (64 held-out captions) background / color / shape of one-shape prompts. Plain "
             f"diffusers pipeline, 20 steps, the run's LoRA loaded.", ""]
    rows = []
    for name, result in results.items():
        rows.append([name] + [f"{r['both_placed']:.0%} / {r['both_opposite']:.0%} / {r['both_mixed']:.0%} ; "
                              f"{r['both_drawn']:.0%} ; {r['background']:.0%} ; {r['mix_background']:.0%} / "
                              f"{r['mix_color']:.0%} / {r['mix_shape']:.0%}" for r in (result[s] for s in settings)])
    lines.append(common.markdown_table(["model", *settings], rows))
    trained = [r for r in results if r != "base"]
    if trained:
        for key, what in (("both_placed", "all"), ("both_opposite", "opposite sides"), ("both_mixed", "other pairs")):
            lines += ["", f"Both placed ({what}), base -> mean of the runs: " + "; ".join(
                f"{s} {results['base'][s][key]:.0%} -> {np.mean([results[r][s][key] for r in trained]):.0%}"
                for s in settings) + "."]
        cpu = [c for _, _, c in runs if c is not None]
        if cpu:
            lines += ["", f"Training: {np.mean(cpu) / 60:.1f} CPU min per run (one thread)."]
        for name in trained:
            rows_ = [r for r in metrics.get(name, []) if "reward_mean" in r]
            if rows_:
                first = np.mean([r["reward_mean"] for r in rows_[:10]])
                last = np.mean([r["reward_mean"] for r in rows_[-10:]])
                lines += [f"{name}: training reward {first:.3f} (first 10 rounds) -> {last:.3f} (last 10)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
