"""Fig. 8 and 9 of the DRTune paper on the trained tiny world: DRTune's final reward against K (steps trained per
iteration) and against m (the early-stop bound), for the same CPU budget per run.

Protocol (fixed before the first run), that of benchmarks/table1.py: drtune.py's own main() with --preset demo on
the world (DDPM T=20, CFG 6, batch 4, lr 3e-3, LoRA rank 8) and the reward `symmetry:1,clipscore:1`, the same CPU
budget of training per run (probe, then max_train_steps = budget / seconds per step), 3 seeds, the 8 held-out
prompts with each seed's fixed noise; the eval reward gain, the eq. 6 symmetry error computed with numpy and the
prompts still drawn. Fig. 8: K in 1, 2, 4, 6 (K/T = 0.05 to 0.3) at m = 8; Fig. 9: m in 1, 4, 8, 12 (m/T = 0.05 to
0.6) at K = 2. The paper (T = 20 to 50 on SD1.5) finds the best K near 0.1 T and the best m near 0.4 T; the demo's
K = 2, m = 8 are those ratios at T = 20. Only T = 20 here (the paper also varies T).

    python -m benchmarks.drtune_ablation                              # 7 settings x 3 seeds at 20 CPU s: 10 min
    python -m benchmarks.drtune_ablation --quick --output_dir /tmp/b  # seconds
"""

import argparse
import os
import sys
import tempfile
import time

if not __package__:  # python benchmarks/drtune_ablation.py: the repo root on the path, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common, fig7, table1

REWARD = "symmetry:1,clipscore:1"
T = 20
K_VALUES, M_VALUES, K_DEMO, M_DEMO = [1, 2, 4, 6], [1, 4, 8, 12], 2, 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=os.path.join(table1.WORLD, "world-sd15"), help="pipeline")
    parser.add_argument("--budget", type=float, default=20.0, help="CPU seconds of training per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="processes run in parallel")
    parser.add_argument("--num_threads", type=int, default=None, help=common.NUM_THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help="T=10, batch 2, budget 0.5 s, one seed: seconds")
    parser.add_argument("--output_dir", default=None,
                        help="folder of BENCHMARKS.md and bench_drtune_ablation.png (default: the repo; --quick "
                             "writes files only when it is given)")
    args = common.finish_args(parser.parse_args(argv), "drtune_ablation", argv)
    args.methods = None
    if args.quick:
        args.budget, args.seeds = 0.5, [0]
    if args.output_dir is None and not args.quick:
        args.output_dir = common.ROOT
    return args


def settings(quick):
    """(label, module, flags) of each setting: the K sweep at m = 8, the m sweep at K = 2 (quick: T = 10, halved)."""
    scale = 2 if quick else 1
    ks = sorted({max(1, k // scale) for k in K_VALUES})
    ms = sorted({max(1, m // scale) for m in M_VALUES})
    k_sweep = [(f"K={k}", "drtune", ["--num_trained_steps", str(k), "--early_stop_max", str(M_DEMO // scale)])
               for k in ks]
    m_sweep = [(f"m={m}", "drtune", ["--num_trained_steps", str(K_DEMO), "--early_stop_max", str(m)]) for m in ms]
    return k_sweep, m_sweep


def sweep_table(runs, probes, methods, t):
    head = ["setting", "ratio to T", "CPU s / step (probe)", "steps", "eval reward gain", "symmetry error (numpy)",
            "prompts drawn"]
    rows = []
    for label, _, _ in methods:
        mine = table1.ok_runs(runs, label, REWARD)
        value = int(label.split("=")[1])
        rows.append([label, f"{value / t:.2f}", common.fmt(probes.get((label, REWARD))),
                     "/".join(map(str, sorted({x["max_train_steps"] for x in mine}))),
                     common.pm([x["final_reward"] - x["base_reward"] for x in mine]),
                     common.pm([x["symmetry_after"] for x in mine], 3), common.pm([x["drawn_after"] for x in mine], 2)])
    return common.markdown_table(head, rows)


def sweep_reading(runs, methods, name, t, paper_ratio):
    gains = table1.gains(runs, [label for label, *_ in methods], REWARD)
    if not gains:
        return f"- {name}: no run finished."
    best = max(gains, key=lambda m: gains[m][0])
    ratio = int(best.split("=")[1]) / t
    ordered = sorted(gains, key=lambda m: int(m.split("=")[1]))
    spread = max(g[0] for g in gains.values()) - min(g[0] for g in gains.values())
    noise = max(g[1] for g in gains.values())
    return (f"- {name}: the largest mean gain is at {best} ({name.split()[0]}/T = {ratio:.2f}; the paper's best "
            f"ratio is {paper_ratio}); gains in order of {name.split()[0]}: " +
            ", ".join(f"{m} {gains[m][0]:+.3g}" for m in ordered) +
            f". The spread between settings ({spread:.3g}) is {'larger' if spread > noise else 'smaller'} than the "
            f"largest seed std ({noise:.2g}){'' if spread > noise else ', so this run cannot rank them'}.")


def plot(runs, k_sweep, m_sweep, t, path):
    with common.figure(path, 1, 2, figsize=(9, 3.6)) as (fig, axes):
        for ax, methods, name in zip(axes, (k_sweep, m_sweep), ("K", "m")):
            gains = table1.gains(runs, [label for label, *_ in methods], REWARD)
            xs = [int(label.split("=")[1]) / t for label in gains]
            ax.errorbar(xs, [g[0] for g in gains.values()], yerr=[g[1] for g in gains.values()], marker="o",
                        capsize=3)
            ax.set_xlabel(f"{name} / T (T = {t})")
            ax.set_ylabel("eval reward gain over step 0")
            ax.set_title(f"DRTune against {name} ({'m = 8' if name == 'K' else 'K = 2'} at T = 20)")


def main(args):
    started = time.time()
    t = 10 if args.quick else T
    k_sweep, m_sweep = settings(args.quick)
    methods = k_sweep + [s for s in m_sweep if s[2] not in [f for _, _, f in k_sweep]]
    context = common.fork_context(["drtune"])
    with tempfile.TemporaryDirectory(prefix="bench-drtune-ablation-") as folder:
        runs, probes = table1.run_methods(args, methods, [REWARD], context, folder)
    # a setting in both sweeps (K=2, m=8) ran once: it appears in both tables under its own label
    same = {f"K={K_DEMO}": f"m={M_DEMO // (2 if args.quick else 1)}"}
    for label, twin in same.items():
        runs += [dict(x, method=twin) for x in runs if x["method"] == label]
        probes.update({(twin, r): p for (m, r), p in list(probes.items()) if m == label})
    seconds = time.time() - started
    tables = [sweep_table(runs, probes, k_sweep, t), sweep_table(runs, probes, m_sweep, t)]
    text = "\n".join([sweep_reading(runs, k_sweep, "K (Fig. 8)", t, "0.1"),
                      sweep_reading(runs, m_sweep, "m (Fig. 9)", t, "0.4")])
    print("\n" + "\n\n".join(tables) + "\n\n" + text)
    if args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        tag = common.model_tag(args.model)  # the SD3 world's run gets its own section and figure
        plot(runs, k_sweep, m_sweep, t, os.path.join(args.output_dir, f"bench_drtune_ablation{tag}.png"))
        body = "\n".join([
            f"## DRTune against K and m on the tiny {'SD3 ' if tag else ''}world (Fig. 8 and 9)", "",
            *common.header_lines(args, seconds, "CPU time of each one-thread process"), "",
            f"Protocol (the module docstring): drtune.py `--preset demo` on the world "
            f"(`{os.path.relpath(args.model, common.ROOT)}`: {fig7.demo_sampling(tag)}), reward `{REWARD}`, "
            f"{args.budget:g} CPU s of training per run, seeds {', '.join(map(str, args.seeds))}, the 8 held-out "
            f"prompts with fixed noise; mean ± std over seeds. The K = {K_DEMO}, m = {M_DEMO} runs serve both "
            f"tables.", "", "Fig. 8, K at m = 8:", "", tables[0], "", "Fig. 9, m at K = 2:", "", tables[1], "",
            "Reading (computed from the tables):", "", text, "",
            f"![DRTune against K and m](bench_drtune_ablation{tag}.png)", ""])
        common.write_report(args.output_dir, f"drtune_ablation{tag}", body)
    if any(x["status"] != "ok" for x in runs):
        sys.exit(1)
    return runs


if __name__ == "__main__":
    main(parse_args())
