"""Side by side with the public implementations: alignprop.py next to TRL's AlignPropTrainer and dpo.py next to
diffusers' train_diffusion_dpo.py, on the same tiny model and settings; time and peak memory per update.

Each side runs its own training loop, unmodified, in a fresh process of the interpreter that has the peers
installed (--peer_python; both sides run on it, so on the same libraries), timed between optimizer steps by a global
optimizer-step hook (CPU time, one torch thread); repetitions alternate which side runs first. Settings whose peer
is not available are skipped with the reason. Writes the peers section of BENCHMARKS.md.

    # the peers (PEER_VERSIONS) in a venv that also sees this repo's requirements:
    python -m benchmarks.peers --peer_python /tmp/peers/bin/python --peer_dpo_script /tmp/peers/train_diffusion_dpo.py
    # or next to this repo's venv: the peers in folders put on PYTHONPATH by a wrapper script used as --peer_python
    pip install --no-deps --target /tmp/peers/lib trl==0.23.1   # and wandb's packages the venv lacks, for the DPO script
"""

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

if not __package__:  # python benchmarks/peers.py: the repo root on the path instead of benchmarks/, as with -m
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common
from benchmarks.common import fmt

# The peers, pinned: TRL 0.23.1 (its AlignPropTrainer, deprecated there, removed in later releases; `pip install
# trl==0.23.1` into the interpreter given by --peer_python) and diffusers' examples/research_projects/diffusion_dpo/
# train_diffusion_dpo.py as of diffusers commit c9c82173068d628b0569ccb6d656adfa37a389e8 (its last change, 2025-08-11;
# a copy anywhere outside this repo, passed with --peer_dpo_script; it imports wandb and torchvision). Neither is
# copied here: the benchmark runs them unmodified and only sets their flags or config fields.
PEER_VERSIONS = dict(trl="0.23.1", diffusion_dpo="c9c82173068d628b0569ccb6d656adfa37a389e8")
# (key, label, our script, peer, T, trained steps per update): the AlignProp settings take T and the trained steps
PEER_SETTINGS = [
    ("alignprop_all", "AlignProp T=50, every step trained, gradient checkpointing", "alignprop", "trl", 50, 50),
    ("alignprop_last", "AlignProp T=50, last step only, gradient checkpointing", "alignprop", "trl", 50, 1),
    ("dpo", "Diffusion-DPO, offline pairs", "dpo", "diffusion_dpo", None, None),
    ("dpo_checkpointing", "Diffusion-DPO, offline pairs, gradient checkpointing", "dpo", "diffusion_dpo", None, None),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--peer_python", default=sys.executable,
                        help="the interpreter with the peers installed (trl==0.23.1; wandb and torchvision for the "
                             "DPO script) and this repo's requirements; both sides run on it")
    parser.add_argument("--peer_dpo_script", default=None,
                        help="path of diffusers' examples/research_projects/diffusion_dpo/train_diffusion_dpo.py "
                             "(outside this repo); without it the DPO comparison is skipped")
    parser.add_argument("--peer_settings", nargs="+", default=None, choices=[s[0] for s in PEER_SETTINGS],
                        help="only these settings (default: all)")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions of each side, alternating")
    parser.add_argument("--peer_iters", type=int, default=None,
                        help="timed updates per run (default: AlignProp 3, DPO 20)")
    parser.add_argument("--output_dir", default=common.ROOT, help="folder of BENCHMARKS.md")
    return common.finish_args(parser.parse_args(argv), "peers", argv)


# ---------------------------------------------------------------------------------------------
# One side of one setting, in a fresh process of --peer_python (this file with --peer_job)
# ---------------------------------------------------------------------------------------------


class StopTiming(Exception):
    """Raised by the optimizer-step hook after the last timed update: it ends the run being measured."""


# Where an update's time goes, the same on both sides: (part, classes or modules, method names) timed by wrapping
# the method on its class (or module), so that both sides' own loops run unmodified
PARTS = [("UNet forward", ["diffusers:UNet2DConditionModel"], ["forward"]),
         ("backward", ["torch.autograd"], ["backward"]),
         ("VAE", ["diffusers:AutoencoderKL"], ["encode", "decode"]),
         ("text encoders", ["transformers:CLIPTextModel", "transformers:CLIPTextModelWithProjection"], ["forward"])]
PART_NAMES = [name for name, _, _ in PARTS] + ["optimizer step", "the rest"]


class PartTimer:
    """Exclusive CPU time per part: time inside a nested part counts for the inner one only (a checkpoint's
    recomputation in the backward counts as UNet forward, not as backward)."""

    def __init__(self):
        self.totals, self.stack = dict.fromkeys(PART_NAMES, 0.0), []

    def enter(self, part):
        now = time.process_time()
        if self.stack:
            self.totals[self.stack[-1][0]] += now - self.stack[-1][1]
        self.stack.append([part, now])

    def exit(self):
        now = time.process_time()
        part, since = self.stack.pop()
        self.totals[part] += now - since
        if self.stack:
            self.stack[-1][1] = now

    def wrap(self, owner, name, part):
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self.enter(part)
            try:
                return original(*args, **kwargs)
            finally:
                self.exit()
        setattr(owner, name, timed)

    def install(self):
        for part, owners, methods in PARTS:
            for owner in owners:
                module, _, attr = owner.partition(":")
                target = importlib.import_module(module)
                target = getattr(target, attr) if attr else target
                for method in methods:
                    self.wrap(target, method, part)


def peer_job(job):
    """One side of one setting in this (fresh) process: the script's own training loop (ours: main(); TRL:
    AlignPropTrainer.train(); diffusers: the example's main()), timed between optimizer steps by a global
    optimizer-step hook (CPU time of the process, one torch thread): the warm-up updates, then `iters` timed ones.
    Peak memory: VmHWM reset at the end of the warm-up (after malloc_trim) and read after the last timed update;
    `start_mb` is the resident set at that reset (models, optimizer state, everything loaded)."""
    torch.set_num_threads(1)
    device, state, timer = torch.device("cpu"), dict(steps=0, seconds=[]), PartTimer()
    timer.install()

    def hook(optimizer, args, kwargs):
        timer.exit()  # the optimizer step, entered by the pre-hook
        state["steps"] += 1
        now = time.process_time()
        if state["steps"] > job["warmup"]:
            state["seconds"].append(now - state["last"])
        if len(state["seconds"]) == job["iters"]:
            state["peak_mb"] = common.memory_mb(device, peak=True)
            state["parts"] = dict(timer.totals)
            raise StopTiming
        if state["steps"] == job["warmup"]:
            common.reset_peak_memory(device)
            state["start_mb"] = common.memory_mb(device)
            timer.totals = dict.fromkeys(PART_NAMES, 0.0)  # from here: the timed updates
        state["last"] = time.process_time()

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: timer.enter("optimizer step"))
    register_optimizer_step_post_hook(hook)
    run = {"ours": run_ours, "trl": run_trl_alignprop, "diffusion_dpo": run_diffusers_dpo}[job["side"]]
    with open(os.path.join(job["folder"], "log.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            run(job)
        except StopTiming:
            pass
    if "peak_mb" not in state:
        raise RuntimeError(f"{job['side']}: the run ended after {state['steps']} optimizer steps, before the timed "
                           f"ones")
    parts = {k: v / job["iters"] for k, v in state["parts"].items()}  # mean CPU s per timed update
    parts["the rest"] = sum(state["seconds"]) / job["iters"] - sum(parts.values())
    return dict(seconds=state["seconds"], start_mb=state["start_mb"], peak_mb=state["peak_mb"], parts=parts)


def run_ours(job):
    script = importlib.import_module(job["script"])
    script.main(script.parse_args(job["argv"]))


def run_trl_alignprop(job):
    """TRL's AlignPropTrainer with its DefaultDDPOStableDiffusionPipeline (LoRA rank 4, gradient checkpointing of
    every UNet call, always on), our symmetry reward and prompts."""
    import random

    import trl
    from accelerate import PartialState

    import rewards
    PartialState()  # TRL's pipeline logs through accelerate's logger before its trainer makes the Accelerator
    symmetry = rewards.build_reward("symmetry")
    prompts, rng = importlib.import_module("alignprop").DEFAULT_PROMPTS, random.Random(0)
    pipeline = trl.DefaultDDPOStableDiffusionPipeline(job["model"], use_lora=True)
    # TRL samples at the UNet config's sample_size (the tiny model says 16, 128 px): set it to our resolution
    pipeline.unet.register_to_config(sample_size=job["resolution"] // pipeline.sd_pipeline.vae_scale_factor)
    T, trained = job["T"], job["trained"]
    config = trl.AlignPropConfig(
        num_epochs=10 ** 6, sample_num_steps=T, sample_eta=1.0, sample_guidance_scale=5.0, train_batch_size=2,
        train_learning_rate=1e-3, train_max_grad_norm=1.0, mixed_precision="no", seed=0, log_with=None,
        truncated_backprop_rand=False, truncated_backprop_timestep=T - trained, save_freq=10 ** 9,
        project_kwargs=dict(project_dir=job["folder"], logging_dir=os.path.join(job["folder"], "logs")))
    trainer = trl.AlignPropTrainer(config, lambda images, p, metadata: (symmetry(images, list(p)), {}),
                                   lambda: (rng.choice(prompts), {}), pipeline)
    trainer.train()


def run_diffusers_dpo(job):
    """diffusers' train_diffusion_dpo.py, unmodified, loaded from its path, its main() with its own flags."""
    spec = importlib.util.spec_from_file_location("train_diffusion_dpo", job["peer_script"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(module.parse_args(job["argv"]))


def run_peer_job(job, folder):
    """Run one job in a fresh process of job["python"] (the interpreter that has the peers installed); both sides
    use it, so that both run on the same libraries."""
    os.makedirs(folder, exist_ok=True)
    job = dict(job, folder=folder)
    if "argv" in job:
        job["argv"] = job["argv"] + ["--output_dir", os.path.join(folder, "out")]
    result_path = os.path.join(folder, "result.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled")
    done = subprocess.run([job["python"], os.path.abspath(__file__), "--peer_job", json.dumps(job), result_path],
                          env=env, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.exists(result_path):
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        log = os.path.join(folder, "log.txt")
        if os.path.exists(log):
            tail += " | log: " + " ".join(open(log).read().strip().splitlines()[-3:])[-300:]
        return dict(status="failed", reason=tail)
    with open(result_path) as f:
        return dict(status="ok", **json.load(f))


# ---------------------------------------------------------------------------------------------
# The plan: the jobs of both sides for each setting whose peer is available
# ---------------------------------------------------------------------------------------------


def peer_plan(args, folder):
    """(setting, job of the peer, job of ours) for each setting whose peer is available; and the reasons of the
    others. Every job: B = 2, 32 px, LoRA rank 4, fp32, one torch thread."""
    model = os.path.join(common.ROOT, "tiny_models", "sd15")
    check = subprocess.run([args.peer_python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                           text=True)
    trl_version = check.stdout.strip() if check.returncode == 0 else None
    shared = dict(model=model, resolution=32, python=args.peer_python)
    plans, missing = [], []
    for key, label, script, peer, T, trained in PEER_SETTINGS:
        if args.peer_settings and key not in args.peer_settings:
            continue
        if peer == "trl" and trl_version is None:
            missing.append(f"{label}: TRL is not importable by {args.peer_python} "
                           f"(`pip install trl=={PEER_VERSIONS['trl']}` into it, or pass --peer_python)")
            continue
        if peer == "diffusion_dpo" and not (args.peer_dpo_script and os.path.isfile(args.peer_dpo_script)):
            missing.append(f"{label}: no --peer_dpo_script (diffusers' examples/research_projects/diffusion_dpo/"
                           f"train_diffusion_dpo.py, commit {PEER_VERSIONS['diffusion_dpo'][:8]})")
            continue
        ours = ["--pretrained_model_name_or_path", model, "--resolution", "32", "--train_batch_size", "2",
                "--rank", "4", "--mixed_precision", "no", "--report_to", "none", "--seed", "0",
                "--validation_steps", "1000000", "--checkpointing_steps", "1000000", "--logging_steps", "1000000",
                "--max_train_steps", "1000", "--num_eval_prompts", "1"]
        if peer == "trl":
            warmup, iters = 1, args.peer_iters or 3
            ours += ["--num_inference_steps", str(T), "--sampler", "ddim", "--eta", "1.0", "--guidance_scale", "5.0",
                     "--truncation_min", str(trained), "--truncation_max", str(trained), "--gradient_checkpointing",
                     "--reward", "symmetry", "--learning_rate", "1e-3", "--max_grad_norm", "1.0",
                     "--adam_weight_decay", "1e-4"]
            theirs_job = dict(shared, side="trl", T=T, trained=trained, version=trl_version)
        else:
            warmup, iters = 2, args.peer_iters or 20
            ours += ["--dataset_name", os.path.join(folder, "pairs"), "--beta_dpo", "5000", "--learning_rate", "1e-5",
                     "--num_inference_steps", "2", "--reward", "symmetry"]
            theirs = ["--pretrained_model_name_or_path", model, "--dataset_name", os.path.join(folder, "pairs"),
                      "--dataset_split_name", "train", "--resolution", "32", "--train_batch_size", "2", "--rank", "4",
                      "--mixed_precision", "no", "--max_train_steps", "1000", "--learning_rate", "1e-5",
                      "--beta_dpo", "2500", "--seed", "0", "--checkpointing_steps", "1000000", "--no_hflip",
                      "--report_to", "tensorboard"]
            if key.endswith("_checkpointing"):  # both sides' own flag
                ours, theirs = ours + ["--gradient_checkpointing"], theirs + ["--gradient_checkpointing"]
            theirs_job = dict(shared, side="diffusion_dpo", argv=theirs, peer_script=args.peer_dpo_script)
        ours_job = dict(shared, side="ours", script=script, argv=ours)
        plans.append(dict(key=key, label=label, warmup=warmup, iters=iters,
                          jobs=dict(peer=dict(theirs_job, warmup=warmup, iters=iters),
                                    ours=dict(ours_job, warmup=warmup, iters=iters))))
    return plans, missing, trl_version


# ---------------------------------------------------------------------------------------------
# Results: the table and the section
# ---------------------------------------------------------------------------------------------


def peer_summary(results):
    """Median over repetitions of each run's median s/update, peak RSS and peak over the start of the timing."""
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return None
    return dict(seconds=statistics.median(statistics.median(r["seconds"]) for r in ok),
                peak_mb=statistics.median(r["peak_mb"] for r in ok),
                over_mb=statistics.median(r["peak_mb"] - r["start_mb"] for r in ok), runs=len(ok),
                parts={k: statistics.median(r["parts"][k] for r in ok) for k in PART_NAMES})


def parts_table(rows):
    """Where an update's time goes on each side: the median over runs of each part's mean CPU s per update."""
    head = ["setting", "side", *PART_NAMES, "sum"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for side in ("peer", "ours"):
            if r[side] is not None:
                parts = r[side]["parts"]
                lines.append("| " + " | ".join([r["label"], side, *(fmt(parts[k]) for k in PART_NAMES),
                                                fmt(sum(parts.values()))]) + " |")
    return "\n".join(lines)


def peers_reading(rows):
    """One line per setting, from the numbers: the ratios, and which parts make the difference in time."""
    lines = []
    for r in rows:
        p, o = r["peer"], r["ours"]
        if p is None or o is None:
            continue
        diff = {k: o["parts"][k] - p["parts"][k] for k in PART_NAMES}
        saved = sorted((k for k in PART_NAMES if diff[k] < 0), key=lambda k: diff[k])
        same = p["parts"]["UNet forward"] + p["parts"]["backward"]
        lines.append(
            f"- {r['label']}: {o['seconds'] / p['seconds']:.2f}x the peer's time, {o['peak_mb'] / p['peak_mb']:.2f}x "
            f"its peak resident set and {o['over_mb'] / max(p['over_mb'], 1e-9):.2f}x its peak over the start. UNet "
            f"forwards and backward: {(o['parts']['UNet forward'] + o['parts']['backward']) / same:.2f}x the peer's "
            f"({same / sum(p['parts'].values()):.0%} of its update); the difference per update comes from "
            + ", ".join(f"{k} ({diff[k] * 1e3:+.1f} ms)" for k in saved[:4]) + ".")
    return lines


def peers_table(rows):
    head = ["setting", "peer s / update", "ours", "ratio", "peer peak RSS (MiB)", "ours", "ratio",
            "peer peak over the start of timing (MiB)", "ours", "ratio", "runs (peer / ours)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p, o = r["peer"], r["ours"]
        if p is None or o is None:
            lines.append(f"| {r['label']} | failed: {r['reason']} |" + " |" * (len(head) - 2))
            continue
        lines.append("| " + " | ".join([
            r["label"], fmt(p["seconds"]), fmt(o["seconds"]), f"{o['seconds'] / p['seconds']:.2f}",
            fmt(p["peak_mb"]), fmt(o["peak_mb"]), f"{o['peak_mb'] / p['peak_mb']:.2f}",
            fmt(p["over_mb"]), fmt(o["over_mb"]), f"{o['over_mb'] / max(p['over_mb'], 1e-9):.2f}",
            f"{p['runs']} / {o['runs']}"]) + " |")
    return "\n".join(lines)


PEER_DIFFERENCES = """\
- Both sides run in fresh processes of the same interpreter (the one with the peers installed), on the same
  libraries, tiny SD1.5 (`tiny_models/sd15`), 32 px, batch 2, LoRA rank 4 (alpha 4, gaussian init, to_q/k/v/out.0),
  fp32, one torch thread, AdamW, clipping 1.0; repetitions alternate which side runs first. Our AdamW is fused
  (one kernel over the LoRA tensors), the peers' torch's default (a loop over the tensors on CPU, foreach on
  CUDA): the same update to float rounding.
- AlignProp: both sample DDIM eta 1.0, CFG 5.0, T=50 and score with the same symmetry reward; TRL's loss is
  10 - reward, ours -reward (the same gradient). TRL samples at its UNet config's sample_size, set to 32 px here.
  TRL checkpoints every UNet call (always) and runs every call with gradient, detaching the model output of the
  untrained steps; ours runs untrained steps under no_grad and checkpoints each trained call and the decode
  (`--gradient_checkpointing`, granularity call). Our truncation is contiguous (`--truncation_min/max` = the trained
  steps), TRL's fixed truncation (`truncated_backprop_rand=False`, `truncated_backprop_timestep` = T - trained)
  is the same set. TRL computes DDPO's log-probabilities at every step (unused by AlignProp); we do not.
  Our call checkpoint is reentrant (its first pass under no_grad keeps no autograd graph until the backward).
  On CPU the peak RSS also counts what a GPU's allocated memory would not: the allocator's fragmentation, which
  moves with the order in which temporaries are freed.
  TRL's weight decay 1e-4 and lr 1e-3 are passed to ours; TRL's checkpoint saving is off (save_freq 1e9), ours
  (checkpointing_steps 1e6) too. Ours evaluates a grid before training (outside the timing); TRL does not.
- DPO: the same Pick-a-Pic parquet (smooth random JPEGs at 5:4, label_0 alternating, no ties), shortest side
  resized to 32 and center-cropped by both; beta: ours 5000 with eq. 14's -beta/2, theirs 2500 with its own form
  (the same loss); the same noise and timestep for the two images of a pair in both. The diffusers script flips
  at random unless --no_hflip (passed), tokenizes in its dataset transform and logs to tensorboard (its default;
  `none` is not one of its trackers); ours logs metrics.jsonl. Ours evaluates a grid before training (outside
  the timing); theirs runs no validation (its default). Both pass `--gradient_checkpointing` in the row that says
  so: theirs checkpoints every block of the UNet (diffusers' enable_gradient_checkpointing), ours the policy's UNet
  call as one reentrant checkpoint (granularity call); neither checkpoints the reference, which runs under
  no_grad."""


def main(args):
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as folder:
        os.makedirs(os.path.join(folder, "pairs"))
        common.pairs_parquet(os.path.join(folder, "pairs", "train.parquet"), 256, 32)
        plans, missing, trl_version = peer_plan(args, folder)
        for reason in missing:
            print(f"skipped: {reason}", flush=True)
        rows = []
        for plan in plans:
            results = dict(peer=[], ours=[])
            for rep in range(args.repeats):
                for side in ("peer", "ours") if rep % 2 == 0 else ("ours", "peer"):
                    out = run_peer_job(plan["jobs"][side], os.path.join(folder, plan["key"], f"{side}-{rep}"))
                    results[side].append(out)
                    where = f"{plan['label']} [{rep + 1}/{args.repeats}] {side}"
                    if out["status"] == "ok":
                        print(f"{where}: {statistics.median(out['seconds']):.3f} s/update, peak "
                              f"{out['peak_mb']:.0f} MiB (+{out['peak_mb'] - out['start_mb']:.1f})", flush=True)
                    else:
                        print(f"{where}: failed: {out['reason']}", flush=True)
            reason = next((r["reason"] for side in results.values() for r in side if r["status"] != "ok"), "")
            rows.append(dict(key=plan["key"], label=plan["label"], reason=reason.replace("|", "/"),
                             iters=plan["iters"], warmup=plan["warmup"],
                             peer=peer_summary(results["peer"]), ours=peer_summary(results["ours"])))
    seconds = time.time() - started
    table = peers_table(rows)
    print("\n" + table + f"\n\nbenchmark time: {seconds:.0f} s")
    if args.output_dir is not None and rows:
        runs = ", ".join(f"{r['label']}: {r['warmup']} warm-up + {r['iters']} timed updates" for r in rows)
        body = ["## Side by side with the public implementations (tiny SD1.5, 32 px, batch 2, LoRA rank 4, fp32)", "",
                *[line + "  " for line in common.header_lines(args, seconds, "CPU time of each one-thread process")],
                f"Peers: TRL {trl_version} (AlignPropTrainer); diffusers' train_diffusion_dpo.py at commit "
                f"{PEER_VERSIONS['diffusion_dpo'][:8]}" + (f"; not run: {'; '.join(missing)}" if missing else ""), "",
                f"Each side trains with its own loop in a fresh process, {args.repeats} alternating repetitions; "
                f"per run {runs}, timed between optimizer steps (a global optimizer-step hook); the table gives the "
                f"median over runs of each run's median. Peak RSS: the process's peak resident set during the timed "
                f"updates (VmHWM reset after the warm-up); peak over the start: that peak minus the resident set at "
                f"the reset (what training adds to the loaded models and optimizer). Ratio = ours / peer: below 1 "
                f"we are faster or smaller.", "",
                common.CPU_NOTE, "", table, "",
                "Where an update's time goes (CPU s per update, each part's mean over a run's timed updates, the median "
                "over runs; a part nested in another counts for the inner one only, so a checkpoint's recomputation is "
                "UNet forward; the rest: data, sampler arithmetic, rewards, adapter switches, logging):", "",
                parts_table(rows), "", "Reading (computed from the numbers above):", "", *peers_reading(rows), "",
                "Settings, and every difference that remains:", "", PEER_DIFFERENCES, ""]
        common.write_report(args.output_dir, "peers", "\n".join(body))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peer_job"]:  # one side of one setting, in a fresh process of --peer_python
        with open(sys.argv[3], "w") as result:
            json.dump(peer_job(json.loads(sys.argv[2])), result)
    else:
        main(parse_args())
