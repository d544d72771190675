"""How well a pipeline draws the tiny world, read back by pixel statistics (world.check), not by any model.

Prompts come from held-out scene seeds (never used for training): most are drawn like the training scenes but
may contain the held-out color-shape pairs, and a second set has only held-out pairs (combinations the model
never saw). Images come from the plain diffusers pipeline of the model's family (PIPELINES, decided from its
components as evaluate.py does: StableDiffusionPipeline for the SD1.5 world, StableDiffusion3Pipeline for the SD3
world), so the figures are what a user gets. The SD families sample with DDPM and DDIM, SD3 and FLUX with their own
flow-matching Euler scheduler ("euler"). An SD3 pipeline saved without T5 (the SD3 world) is sampled with 77 T5
tokens, as it was trained (zeros in the empty T5 slot; the pipeline's default is 256).

    python tiny_models/check_world.py                                    # tiny_models/world-sd15, DDPM and DDIM
    python tiny_models/check_world.py --pipeline tiny_models/world-sd3   # Euler, 77 T5 tokens
    python tiny_models/check_world.py --pipeline DIR --num_prompts 100 --json out.json
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import world  # noqa: E402

EVAL_SEED = 10**7  # held-out scene seeds start here (training uses 0..N-1)
METRICS = ("background", "color", "shape", "position", "colors_pair")
TARGETS = dict(background=0.95, color=0.85, shape=0.60, position=0.65, colors_pair=0.60)
# Each family's pipeline class and samplers: DDPM and DDIM built from the SD pipelines' scheduler config; the flow
# pipelines' own FlowMatchEulerDiscreteScheduler.
PIPELINES = dict(sd15="StableDiffusionPipeline", sdxl="StableDiffusionXLPipeline", sd3="StableDiffusion3Pipeline",
                 flux="FluxPipeline")
SAMPLERS = dict(sd15=("ddpm", "ddim"), sdxl=("ddpm", "ddim"), sd3=("euler",), flux=("euler",))
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


class UsageError(ValueError):
    """Bad input, reported as one line naming the flag."""


def model_index(pipeline):
    path = os.path.join(pipeline, "model_index.json")
    if not os.path.isfile(path):
        raise UsageError(f"--pipeline {pipeline}: no model_index.json (give a diffusers pipeline folder)")
    with open(path) as f:
        return json.load(f)


def model_family(pipeline, index):
    """sd15, sdxl, sd3 or flux from the folder's components, never its name (as evaluate.py decides): the class of its
    transformer, else its UNet's conditioning (SDXL: a second text encoder and text_time embeddings)."""
    if "transformer" in index:
        if index["transformer"][1] not in TRANSFORMER_FAMILIES:
            raise UsageError(f"--pipeline {pipeline}: a {index['transformer'][1]} model; the families are "
                             f"SD1.5, SDXL, SD3 and FLUX")
        return TRANSFORMER_FAMILIES[index["transformer"][1]]
    with open(os.path.join(pipeline, "unet", "config.json")) as f:
        text_time = json.load(f).get("addition_embed_type") == "text_time"
    return "sdxl" if "text_encoder_2" in index and text_time else "sd15"


def eval_prompts(num_prompts, held_out):
    """Captions of held-out scenes: held_out 'any' (the world's mix, held-out pairs included) or 'only'."""
    offset = 0 if held_out == "any" else 10**6
    return [world.caption(world.sample_scene(EVAL_SEED + offset + i, held_out)) for i in range(num_prompts)]


def score(checks):
    """Fraction correct per metric over the prompts that ask for it: {metric: (fraction, count)}."""
    out = {}
    for m in METRICS:
        values = [c[m] for c in checks if c[m] is not None]
        out[m] = (float(np.mean(values)) if values else float("nan"), len(values))
    return out


@torch.no_grad()
def generate(pipe, prompts, guidance_scale, steps, seed, max_sequence_length=None, batch_size=64):
    """Images (N, H, W, 3) in [0, 1]; max_sequence_length: T5 tokens (SD3, FLUX), None for the pipeline's default or
    a pipeline without that argument (SD1.5, SDXL)."""
    text = {} if max_sequence_length is None else dict(max_sequence_length=max_sequence_length)
    images = []
    for i in range(0, len(prompts), batch_size):
        generator = torch.Generator().manual_seed(seed + i)
        out = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=generator, height=world.RESOLUTION, width=world.RESOLUTION, output_type="np", **text)
        images.append(out.images)
    return np.concatenate(images)


def evaluate(pipeline, samplers=None, num_prompts=200, num_held_out=60, guidance_scale=5.0, steps=20, seed=0,
             grid=None, max_sequence_length=None):
    """{sampler/set: score} for the pipeline folder; samplers None: the family's (SAMPLERS); max_sequence_length
    None: 77 for an SD3 pipeline without T5, else the pipeline's default."""
    import diffusers
    from diffusers import DDIMScheduler, DDPMScheduler

    index = model_index(pipeline)
    family = model_family(pipeline, index)
    samplers = samplers or SAMPLERS[family]
    if any(sampler not in SAMPLERS[family] for sampler in samplers):
        raise UsageError(f"--samplers {','.join(samplers)}: {PIPELINES[family]} samples with "
                         f"{' or '.join(SAMPLERS[family])}")
    if max_sequence_length is not None and family in ("sd15", "sdxl"):
        raise UsageError(f"--max_sequence_length: {PIPELINES[family]} takes 77 CLIP tokens; the T5 length is for "
                         f"SD3 and FLUX")
    if max_sequence_length is not None and not 1 <= max_sequence_length <= 512:
        raise UsageError(f"--max_sequence_length must be in 1..512 (the pipelines' T5 limit), got "
                         f"{max_sequence_length}")
    kwargs = dict(safety_checker=None, requires_safety_checker=False) if family == "sd15" else {}
    if family == "sd3" and index.get("text_encoder_3") == [None, None]:
        # diffusers loads an SD3 folder without T5 only when told so; it was trained with 77 zero T5 tokens
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
        if max_sequence_length is None:
            max_sequence_length = 77
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(pipeline, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    sets = dict(mixed=eval_prompts(num_prompts, "any"), held_out=eval_prompts(num_held_out, "only"))
    results = {}
    for sampler in samplers:
        if sampler != "euler":
            cls = dict(ddpm=DDPMScheduler, ddim=DDIMScheduler)[sampler]
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
        for name, prompts in sets.items():
            if not prompts:
                continue
            start = time.process_time()
            images = generate(pipe, prompts, guidance_scale, steps, seed, max_sequence_length)
            results[f"{sampler}/{name}"] = dict(score([world.check(im, p) for im, p in zip(images, prompts)]),
                                                cpu_seconds=time.process_time() - start)
            if grid and name == "mixed":
                save_grid(images[:32], prompts[:32], f"{grid}-{sampler}.png")
    return results


def save_grid(images, prompts, path, cols=8, scale=3):
    from PIL import Image

    r = world.RESOLUTION
    rows = -(-len(images) // cols)
    canvas = np.full((rows * r, cols * r, 3), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = divmod(i, cols)
        canvas[y * r:(y + 1) * r, x * r:(x + 1) * r] = (image * 255).round().astype(np.uint8)
    Image.fromarray(canvas).resize((cols * r * scale, rows * r * scale), Image.NEAREST).save(path)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write("\n".join(prompts) + "\n")


def table(results, guidance_scale, steps):
    lines = [f"| sampler ({steps} steps, CFG {guidance_scale:g}) | prompts | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for key, row in results.items():
        cells = [f"{row[m][0]:.0%} (n={row[m][1]})" if row[m][1] else "-" for m in METRICS]
        lines.append(f"| {key.split('/')[0].upper()} | {key.split('/')[1].replace('_', '-')} | " + " | ".join(cells) + " |")
    lines.append("| target | | " + " | ".join(f">= {TARGETS[m]:.0%}" for m in METRICS) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=os.path.join(HERE, "world-sd15"))
    parser.add_argument("--samplers", default=None,
                        help="comma-separated; default: ddpm,ddim (SD1.5, SDXL), euler (SD3, FLUX: the pipeline's own)")
    parser.add_argument("--num_prompts", type=int, default=200)
    parser.add_argument("--num_held_out", type=int, default=60)
    parser.add_argument("--guidance_scale", type=float, default=5.0,
                        help="the world draws best at 1.5-5; at 6 DDPM misses two held-out targets (README)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max_sequence_length", type=int, default=None,
                        help="T5 tokens (SD3, FLUX); default: 77 for an SD3 pipeline without T5 (the SD3 world, as "
                             "trained), else the pipeline's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="save the first 32 images per sampler as PREFIX-SAMPLER.png")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    samplers = None if args.samplers is None else args.samplers.split(",")
    try:
        results = evaluate(args.pipeline, samplers, args.num_prompts, args.num_held_out, args.guidance_scale,
                           args.steps, args.seed, args.grid, args.max_sequence_length)
    except UsageError as error:
        parser.exit(2, f"check_world.py: error: {error}\n")
    print(table(results, args.guidance_scale, args.steps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), results=results), f, indent=2)


if __name__ == "__main__":
    main()
