"""Does a step-level win carry to the final image? SPO's premise, measured on the trained tiny world.

SPO trains each sampling step toward the candidate x_{t-1} whose x_0 prediction (made at the next step) scores best.
That helps only where the candidate that wins at its step also tends to end as the better final image. Protocol
(fixed before the first run): the world pipeline, DDIM eta 1, T steps, B training prompts, k candidates. For every
step i < T - 1 and every CFG scale: k candidates x_{t-1} are drawn around the one DDIM mean of a shared x_t (the
chain is followed along candidate 0), each is scored as spo.py scores it (the decoded x_0 prediction of the UNet
call at the next step), then each runs to the end with noise shared across the k (so they differ only by where
they branched) and its final image is scored. Two scores from pixels alone, no model: brightness (mean pixel) and
symmetry (minus eq. 6's |x - mirror(x)| / std(x)). Reported per step: the Pearson correlation between step score
and final score over the k candidates, averaged over the B prompts, and the final score of the step's best minus
the step's worst candidate. One fresh one-thread process per CFG scale; the sampling functions are spo.py's own.

    python -m benchmarks.step_preference                              # 16 prompts, CFG 1, 1.5, 3, 6: a few CPU minutes
    python -m benchmarks.step_preference --quick --output_dir /tmp/b  # seconds: T=6, 4 prompts, CFG 1 and 6
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

if not __package__:  # python benchmarks/step_preference.py: the repo root on the path, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common

SCORES = {  # images (N, 3, H, W) in [0, 1] -> (N,), higher is better
    "brightness": lambda x: x.mean(dim=(1, 2, 3)),
    "symmetry": lambda x: -(x - x.flip(-1)).abs().mean(dim=(1, 2, 3)) / (x.var(dim=(1, 2, 3)) + 1e-6).sqrt(),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.path.join(common.ROOT, "tiny_models", "world-sd15"), help="pipeline")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 1.5, 3.0, 6.0])
    parser.add_argument("--num_inference_steps", type=int, default=20, help="T")
    parser.add_argument("--num_prompts", type=int, default=16, help="B: the first B of the world's training prompts")
    parser.add_argument("--num_candidates", type=int, default=4, help="k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help="T=6, 4 prompts, CFG 1 and 6: a seconds-long smoke")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md and bench_step_preference.png (default: the repo; --quick "
                             "writes files only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "step_preference", argv)
    if args.quick:
        args.num_inference_steps, args.num_prompts, args.guidance_scales = 6, 4, [1.0, 6.0]
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


@torch.no_grad()
def carry(job):
    """Worker: per step, the correlation of step score and final score over the candidates (mean over prompts) and
    the final score of the step's best minus its worst candidate (mean over prompts), for each score."""
    import spo
    args = spo.parse_args(["--preset", "demo", "--pretrained_model_name_or_path", job["model"],
                           "--guidance_scale", str(job["guidance_scale"]), "--num_inference_steps", str(job["T"]), "--warm_steps", "0",
                           "--output_dir", os.path.join(tempfile.gettempdir(), "step_preference")])
    info = spo.check_arguments(args)
    device = torch.device("cpu")
    models = spo.load_models(args, info, device, torch.float32)
    scheduler, unet = spo.make_scheduler(args), models.unet
    prompts, k, gs = args.train_prompt_list[:job["num_prompts"]], job["k"], job["guidance_scale"]
    B = len(prompts)
    scheduler.set_timesteps(job["T"], device=device)
    timesteps = scheduler.timesteps.tolist()
    cond, pool_cond = (spo.encode_prompts(models, p, args.resolution) for p in (prompts, prompts * k))
    generator = torch.Generator().manual_seed(job["seed"])
    scores = lambda latents: {n: f(spo.decode(models.vae, latents).float()).view(k, B) for n, f in SCORES.items()}
    latents, rows = spo.initial_latents(models, args, B, generator, device), []
    for i in range(len(timesteps) - 1):
        out = spo.predict_noise(unet, latents, timesteps[i], cond, gs)
        mean = spo.sampler_step(scheduler, out, timesteps[i], latents, None, args.eta)
        sigma = spo.step_std(scheduler, timesteps[i], args.eta)
        branches = spo.draw_candidates(mean, sigma, k, generator).flatten(0, 1)  # row j B + b
        out = spo.predict_noise(unet, branches, timesteps[i + 1], pool_cond, gs)  # spo.py's scoring call
        step = scores(spo.predict_x0_eps(scheduler, out, timesteps[i + 1], branches)[0])
        x, shared = branches, torch.Generator().manual_seed(job["seed"] + 1 + i)
        for j in range(i + 1, len(timesteps)):
            if j > i + 1:
                out = spo.predict_noise(unet, x, timesteps[j], pool_cond, gs)
            noise = torch.randn((1, B, *x.shape[1:]), generator=shared).expand(k, -1, -1, -1, -1).flatten(0, 1)
            x = spo.sampler_step(scheduler, out, timesteps[j], x, noise, args.eta)
        final = scores(x)
        row = dict(step=i, t=timesteps[i])
        for name in SCORES:
            s, f = step[name].numpy(), final[name].numpy()
            corr = [np.corrcoef(s[:, b], f[:, b])[0, 1] for b in range(B) if s[:, b].std() > 0 and f[:, b].std() > 0]
            best, worst = s.argmax(0), s.argmin(0)
            row[f"corr_{name}"] = float(np.mean(corr)) if corr else None
            row[f"gain_{name}"] = float((f[best, np.arange(B)] - f[worst, np.arange(B)]).mean())
        rows.append(row)
        latents = spo.pick(branches, torch.zeros(B, dtype=torch.long))  # follow candidate 0
    return dict(rows=rows)


def sign_flips(values):
    """Fraction of consecutive steps whose correlations have opposite signs."""
    signs = [np.sign(v) for v in values if v is not None]
    return float(np.mean([a != b for a, b in zip(signs, signs[1:])])) if len(signs) > 1 else None


def reading(results, args):
    lines = []
    for gs, rows in results.items():
        parts = []
        for name in SCORES:
            values = [r[f"corr_{name}"] for r in rows]
            positive = sum(v is not None and v > 0 for v in values)
            late = [v for r, v in zip(rows, values) if v is not None and r["step"] >= len(rows) // 3]
            parts.append(f"{name}: positive at {positive} of {len(values)} steps, mean {np.mean(late):+.2f} over the "
                         f"last two thirds, sign flips between consecutive steps {sign_flips(values):.0%}")
        lines.append(f"- CFG {gs:g}: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def plot(results, path):
    with common.figure(path, 1, len(SCORES), figsize=(5 * len(SCORES), 3.6)) as (fig, axes):
        for ax, name in zip(np.atleast_1d(axes), SCORES):
            for gs, rows in results.items():
                ax.plot([r["step"] for r in rows], [np.nan if r[f"corr_{name}"] is None else r[f"corr_{name}"]
                                                    for r in rows], marker="o", ms=3, label=f"CFG {gs:g}")
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_xlabel("step index i (0 = noisiest)")
            ax.set_ylabel(f"corr(step score, final score), {name}")
            ax.legend(fontsize=8)


def main(args):
    start = time.time()
    context = common.fork_context(["spo"])
    jobs = [dict(model=args.model, guidance_scale=gs, T=args.num_inference_steps, num_prompts=args.num_prompts,
                 k=args.num_candidates, seed=args.seed, num_threads=args.num_threads) for gs in args.guidance_scales]
    results = {}
    for job, result in zip(jobs, common.run_parallel(context, carry, jobs, args.jobs)):
        if result["status"] != "ok":
            common.error(f"CFG {job['guidance_scale']:g}: {result['reason']}")
        results[job["guidance_scale"]] = result["rows"]
    head = ["step", "t"] + [f"CFG {gs:g}: {name}" for gs in results for name in SCORES]
    table = common.markdown_table(head, [
        [str(r["step"]), str(r["t"])] + [common.fmt(results[gs][i][f"corr_{name}"], 2) for gs in results
                                         for name in SCORES]
        for i, r in enumerate(next(iter(results.values())))])
    text = reading(results, args)
    print(table + "\n\n" + text)
    if args.output_dir is None:
        return results
    os.makedirs(args.output_dir, exist_ok=True)
    png = os.path.join(args.output_dir, "bench_step_preference.png")
    plot(results, png)
    body = "\n".join([
        "## Does a step-level win carry to the final image? (SPO's premise, on the tiny world)", "",
        *common.header_lines(args, time.time() - start, "CPU"), "",
        f"DDIM eta 1, T={args.num_inference_steps}, the first {args.num_prompts} training prompts of the world, "
        f"k={args.num_candidates} candidates branched at every step (see the module docstring). Each cell: the "
        f"correlation between a candidate's score at its step (its x_0 prediction one step later, as spo.py scores "
        f"it) and the score of its final image, over the k candidates, mean over prompts (— where the candidates "
        f"could not be told apart).", "", table, "", "Reading (computed from the table):", "", text, "",
        f"![step preference]({os.path.basename(png)})", ""])
    common.write_report(args.output_dir, "step_preference", body)
    return results


if __name__ == "__main__":
    main(parse_args())
