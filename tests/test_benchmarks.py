"""benchmarks/: the full-size configs have the published sizes, and each benchmark's --quick runs end to end in
seconds, as a user runs it (python -m benchmarks.<name>)."""
import itertools
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from benchmarks import common, flow_grpo_peer, full_size, peers


def run_benchmark(name, *flags, timeout=300):
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("name,unet,vae,text_encoders", [
    ("sd15", 859.52e6, 83.65e6, [123.06e6]),
    ("sdxl", 2567.46e6, 83.65e6, [123.06e6, 694.66e6]),
], ids=["sd15", "sdxl"])
def test_full_size_configs_have_the_published_parameter_counts(name, unet, vae, text_encoders):
    """SD1.5 UNet 859.5 M and SDXL UNet 2.567 B (TRAPS.md), built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        models = full_size.full_size_models(name)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(models["unet"]) == pytest.approx(unet, rel=1e-5)
    assert count(models["vae"]) == pytest.approx(vae, rel=1e-4)
    assert [count(m) for m in models["text_encoders"]] == pytest.approx(text_encoders, rel=1e-4)
    assert all(m.config.vocab_size == 49408 for m in models["text_encoders"])
    assert models["unet"].config.cross_attention_dim == (768 if name == "sd15" else 2048)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_full_size_refuses_cpu_without_allow_cpu():
    result = run_benchmark("sweep", "--full_size", "sdxl", timeout=120)
    assert result.returncode != 0 and "needs a GPU" in result.stderr and "--allow_cpu" in result.stderr


def table_cells(stdout, first_header_cell):
    """Rows (lists of cells) of the first table printed whose header starts with first_header_cell."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} |"))
    return [[c.strip() for c in line.strip("|").split("|")] for line in
            itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2:])]


def table_rows(stdout):
    """{(method, T, K): cells} of the iterations table that benchmarks.sweep prints."""
    return {(cells[0], int(cells[1]), cells[2]): cells for cells in table_cells(stdout, "method")}


def markdown_rows(stdout, first_header_cell):
    """{first cell: cells} of the first table printed whose header starts with first_header_cell."""
    return {cells[0]: cells for cells in table_cells(stdout, first_header_cell)}


def test_quick_run_prints_the_table_and_writes_the_report(tmp_path):
    result = run_benchmark("sweep", "--quick", "--methods", "DRTune", "full backprop", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    expected = {("DRTune", T, str(K)) for T in (2, 4) for K in (1, 2)} | {("full backprop", T, "—") for T in (2, 4)}
    assert set(rows) == expected
    # passes counted by hooks: DRTune with t_min = 1 runs T - K no-grad and K grad passes; full backprop T grad passes
    assert rows["DRTune", 4, "1"][3] == "3 / 1" and rows["DRTune", 4, "2"][3] == "2 / 2"
    assert rows["full backprop", 4, "—"][3] == "0 / 4"
    for cells in rows.values():
        seconds, ratio, memory = float(cells[4]), float(cells[6]), float(cells[7])
        assert seconds > 0 and 0 < ratio < float("inf") and memory >= 0
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin tiny -->" in report and "| DRTune | 4 | 2 |" in report and "full_size_sdxl" in report
    assert (tmp_path / "bench_drtune.png").stat().st_size > 0


def test_fig7_quick_prints_grad_norms_for_each_K_and_state_and_writes_its_section(tmp_path):
    result = run_benchmark("fig7", "--quick", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = markdown_rows(result.stdout, "K")
    assert set(rows) == {"1", "2", "4"}
    for cells in rows.values():  # K, then (no stop-grad, stop-grad, ratio) for the base and the trained state
        norms = [float(cells[i].split()[0]) for i in (1, 2, 4, 5)]
        assert all(n > 0 for n in norms)
        assert float(cells[3]) == pytest.approx(norms[0] / norms[1], rel=0.01)
    # K = 1: the one trained call's input carries no gradient, so stop-gradient changes nothing, in both states;
    # the trained LoRA (B != 0) changes the gradient
    assert rows["1"][1] == rows["1"][2] and rows["1"][4] == rows["1"][5] and rows["1"][1] != rows["1"][4]
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin fig7 -->" in report and "| 4 |" in report and "after 2 DRTune steps" in report
    assert (tmp_path / "bench_fig7.png").stat().st_size > 0


def test_table1_quick_trains_every_method_and_writes_its_section(tmp_path):
    result = run_benchmark("table1", "--quick", "--output_dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = markdown_rows(result.stdout, "method")
    assert set(rows) == {"base model (step 0)", "DRTune", "ReFL", "DRaFT-LV", "DRaFT-K", "AlignProp",
                         "AlignProp + sg", "DRaFT-T", "DRaFT-T + sg"}
    value = lambda cell: float(cell.split(" ± ")[0])  # noqa: E731
    for label, cells in rows.items():
        assert value(cells[3]) == value(cells[3])  # the eval reward: a number, not NaN
        assert value(cells[5]) >= 0 and value(cells[6]) > 0 and 0 <= value(cells[7]) <= 1  # symmetry, JPEG, drawn
        if label != "base model (step 0)":
            assert float(cells[1]) > 0 and int(cells[2]) >= 1
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin table1 -->" in report and "| DRTune |" in report and "world-eval-prompts" in report
    assert (tmp_path / "bench_table1.png").stat().st_size > 0


def test_drtune_ablation_quick_sweeps_k_and_m_and_shares_the_demo_setting(tmp_path):
    result = run_benchmark("drtune_ablation", "--quick", "--output_dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tables = [{cells[0]: cells for cells in table_cells(text, "setting")}
              for text in result.stdout.split("\n\n") if text.startswith("| setting |")]
    assert [list(t) for t in tables] == [["K=1", "K=2", "K=3"], ["m=1", "m=2", "m=4", "m=6"]]  # T = 10: halved
    assert tables[0]["K=2"][2:] == tables[1]["m=4"][2:]  # K = 2, m = 4 ran once and serves both tables
    assert all(float(t[s][1]) == int(s.split("=")[1]) / 10 for t in tables for s in t)
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin drtune_ablation -->" in report and (tmp_path / "bench_drtune_ablation.png").exists()


def test_gallery_quick_runs_the_demos_and_composes_one_row_per_method(tmp_path):
    from PIL import Image
    result = run_benchmark("gallery", "--quick", "--output_dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = markdown_rows(result.stdout, "method (row, top to bottom)")
    assert list(rows) == ["DRTune", "SPO"]
    assert rows["SPO"][2] == "DDIM, eta 1, 1.5" and rows["DRTune"][2] == "DDPM, 6"  # each demo's own sampler
    with Image.open(tmp_path / "docs" / "gallery.png") as image:  # 2 rows of 8 + 8 images of 32 px, 3x, 4 px gaps
        assert image.size == (3 * (16 * 32 + 4), 3 * (2 * 32 + 4))
    assert "<!-- begin gallery -->" in (tmp_path / "BENCHMARKS.md").read_text()


def test_dpo_quick_times_each_batch_and_runs_policy_and_reference_on_one_unet(tmp_path):
    result = run_benchmark("preference", "--dpo", "--quick", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {(cells[0], int(cells[1])): cells for cells in table_cells(result.stdout, "model")}
    assert set(rows) == {(model, B) for model in ("SD1.5", "SDXL") for B in (1, 2)}
    for (model, B), cells in rows.items():
        step, per_pair, data, encode, train = map(float, cells[2:7])
        assert min(step, data, encode, train) > 0 and per_pair == pytest.approx(step / B, rel=0.01)
        assert data + encode + train == pytest.approx(step, rel=0.02)  # the parts make up the step
        # a hook counts UNet rows: winners and losers through the policy, then through the reference (LoRA off)
        assert int(cells[7]) == 4 * B
        assert float(cells[8]) >= 0
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin dpo -->" in report and "| SDXL | 2 |" in report and "<!-- begin spo -->" in report


def test_spo_quick_counts_unet_rows_and_pairs_per_trajectory(tmp_path):
    result = run_benchmark("preference", "--spo", "--quick", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {(cells[0], int(cells[1])): cells for cells in table_cells(result.stdout, "model")}
    sd, xl = "SD1.5, k=4", "SDXL, k=2, 3 inner steps"
    assert set(rows) == {(model, B) for model in (sd, xl) for B in (1, 2)}
    T, W = 6, 2  # --quick
    for (model, B), cells in rows.items():
        k = 4 if model == sd else 2
        assert cells[5] == f"{(W + 1) + k * (T - W - 1)} ({(W + 1) + k * (T - W - 1)})"  # counted (formula)
        # threshold 0: every compared step's pair is kept, and with set_alpha_to_one False every step has a density;
        # with 3 inner steps the T - W = 4 steps form one branch whose 4 steps are all pairs
        assert int(cells[6]) == B * (T - W)
        step, sampling, plain, per_pair = float(cells[2]), float(cells[3]), float(cells[4]), float(cells[7])
        assert min(step, sampling, plain, per_pair) > 0 and sampling * B < step
        assert float(cells[8]) >= 0 and float(cells[9]) >= 0
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin spo -->" in report and f"| {xl} | 2 |" in report


def test_step_preference_quick_correlates_step_and_final_scores_per_cfg(tmp_path):
    """At the last branching step the scored x_0 prediction (at t = 1) is nearly the final image, so the step's
    ranking of the candidates must be the final one (correlation near 1) at every CFG; every cell is a correlation."""
    result = run_benchmark("step_preference", "--quick", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = markdown_rows(result.stdout, "step")
    assert list(rows) == ["0", "1", "2", "3", "4"]  # T = 6: every step but the last branches
    for cells in rows.values():
        assert len(cells) == 2 + 2 * 2 and all(-1 <= float(c) <= 1 for c in cells[2:] if c != "—")
    assert all(float(c) > 0.9 for c in rows["4"][2:])
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin step_preference -->" in report and (tmp_path / "bench_step_preference.png").exists()


def test_spo_labels_quick_trains_spo_with_each_label_set_from_the_same_start(tmp_path):
    """Each label set trains spo.py from the same base model and noise, so the grids' brightness before training,
    read from the pixels, is the same; the world's check finds every prompt drawn there; the section is written."""
    result = run_benchmark("spo_labels", "--quick", "--output_dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_cells(result.stdout, "CFG")
    assert [(cells[0], cells[1], cells[2]) for cells in rows] == [("3", "right", "`brightness`"),
                                                                   ("3", "random", "`random_scores`")]
    assert [cells[3] for cells in rows] == ["0.1", "0.1"]  # the demo's ratio clamp
    assert rows[0][4] == rows[1][4] and 0 < float(rows[0][4]) < 1
    assert all(cells[7].startswith("8/8 →") for cells in rows)
    assert "<!-- begin spo_labels -->" in (tmp_path / "BENCHMARKS.md").read_text()


def test_world_preference_quick_trains_each_method_from_one_step_zero_and_writes_its_section(tmp_path):
    """Every method runs its script's main() within the budget; at step 0 all of them sample the same images from
    the same noise (one sampler for all), so the step-0 reward and the step-0 symmetry error agree across rows."""
    result = run_benchmark("world_preference", "--quick", "--output_dir", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = markdown_rows(result.stdout, "method")
    assert list(rows) == ["DPO offline", "DPO online, frozen ref", "DPO online, EMA ref 0.1",
                          "DPO online, EMA ref 0.5", "SPO"]
    number = lambda cell: float(cell.split(" ± ")[0])  # noqa: E731
    for cells in rows.values():
        assert len(cells) == 10 and int(cells[1]) >= 1 and number(cells[2]) > 0
        final, base, gain = number(cells[4]), number(cells[3]), number(cells[5])
        assert gain == pytest.approx(final - base, abs=2e-4)  # the cells round to 4 and 3 significant digits
        before, after = cells[8].split(" -> ")
        assert 0 < number(before) and 0 < number(after)
        assert all(0 <= number(x) <= 1 for x in cells[9].split(" -> "))
    assert len({cells[3] for cells in rows.values()}) == 1
    assert len({cells[8].split(" -> ")[0] for cells in rows.values()}) == 1
    assert "SPO's claim of faster convergence" in result.stdout
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin world_preference -->" in report and "| DPO online, EMA ref 0.5 |" in report
    assert (tmp_path / "bench_world_preference.png").stat().st_size > 0


def test_checkpointing_quick_reports_memory_per_trained_step_for_each_granularity(tmp_path):
    result = run_benchmark("checkpointing", "--quick", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_cells(result.stdout, "granularity")
    assert {(cells[0], cells[1]) for cells in rows} == {
        (g, m) for g in ("off", "call", "block", "both") for m in ("full backprop", "DRTune, K=1")}
    for cells in rows:
        assert float(cells[4]) > 0 and cells[3] == (cells[2] if cells[1] == "full backprop" else "1")
        assert cells[6] != "—" if cells[1] == "full backprop" else cells[6] == "—"
    assert float(rows[0][7]) == pytest.approx(2 * 4 * 8 * 8 * 4 / 2 ** 20, rel=0.05)  # B C h w fp32 (tiny VAE: 32 px / 4)
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin checkpointing -->" in report and "| both | full backprop | 4 |" in report


def test_peers_harness_times_our_side_between_optimizer_steps(tmp_path):
    """benchmarks.peers runs each side's own loop in a fresh process and times it between optimizer steps; without
    the peers it says which are missing and how to get them."""
    model = os.path.join(ROOT, "tiny_models", "sd15")
    job = dict(side="ours", script="alignprop", python=sys.executable, warmup=1, iters=2, argv=[
        "--pretrained_model_name_or_path", model, "--resolution", "32", "--train_batch_size", "1", "--rank", "4",
        "--num_inference_steps", "2", "--sampler", "ddim", "--report_to", "none", "--gradient_checkpointing",
        "--reward", "symmetry",
        "--validation_steps", "100", "--checkpointing_steps", "100", "--num_eval_prompts", "1",
        "--max_train_steps", "100"])
    out = peers.run_peer_job(job, str(tmp_path / "ours"))
    assert out["status"] == "ok", out
    assert len(out["seconds"]) == 2 and min(out["seconds"]) > 0 and out["peak_mb"] >= out["start_mb"] > 0
    # a peer interpreter that cannot import TRL, whether or not this one can: trl shadowed by a failing package
    hidden = tmp_path / "no_trl" / "trl"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    peer = tmp_path / "peer_python"
    peer.write_text(f'#!/bin/sh\nPYTHONPATH={hidden.parent} exec {sys.executable} "$@"\n')
    peer.chmod(0o755)
    result = run_benchmark("peers", "--output_dir", str(tmp_path), "--peer_python", str(peer), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TRL is not importable" in result.stdout and "pip install trl==0.23.1" in result.stdout
    assert "no --peer_dpo_script" in result.stdout


def test_flow_grpo_peer_quick_times_our_side_per_trained_image_and_skips_a_missing_peer(tmp_path):
    """benchmarks.flow_grpo_peer --quick runs grpo.py's own loop on the tiny SD3 pipeline in a fresh process, timed
    between optimizer steps (one warm-up round, one timed round of 2 updates); with no Flow-GRPO copy the peer side
    is skipped in one line that says how to get it (no network, no peer install here)."""
    result = run_benchmark("flow_grpo_peer", "--quick", "--peer_root", str(tmp_path / "no_flow_grpo"),
                           "--output_dir", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    skipped = [line for line in result.stdout.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "Flow-GRPO is not installed" in skipped[0] and "git clone" in skipped[0]
    rows = markdown_rows(result.stdout, "side")
    assert set(rows) == {"ours: grpo.py"}
    cells = rows["ours: grpo.py"]
    assert float(cells[1].split()[0]) > 0 and cells[2] == "—"  # CPU s per trained image; no ratio without a peer
    assert float(cells[3]) >= float(cells[5]) > 0 and cells[-1] == "1"  # peak RSS, above its imports; one run
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin flow_grpo_peer -->" in report and "not run: Flow-GRPO is not installed" in report
    assert flow_grpo_peer.settings(True)["G"] == 2 and flow_grpo_peer.settings(False)["T"] == 10


def test_the_report_reads_back_unchanged(tmp_path):
    """BENCHMARKS.md is what write_section writes: its header is HEADER, and rewriting a section with its own body
    changes nothing (so a run replaces only its section)."""
    with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith(common.HEADER)
    copy = tmp_path / "BENCHMARKS.md"
    copy.write_text(text, encoding="utf-8")
    for key in common.SECTIONS:
        body = re.search(rf"<!-- begin {key} -->\n(.*?)<!-- end {key} -->", text, re.S).group(1)
        common.write_section(str(copy), key, body)
    assert copy.read_text(encoding="utf-8") == text
