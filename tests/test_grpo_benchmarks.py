"""The GRPO benchmarks' --quick runs end to end as a user runs them (python -m benchmarks.<name>)."""
import subprocess
import sys

from conftest import ROOT
from test_benchmarks import markdown_rows


def run_benchmark(name, *flags, timeout=600):
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_grpo_backprop_quick_trains_each_method_from_one_step_zero(tmp_path):
    """GRPO, DRTune and ReFL on one reward, sampler and budget: the same images at step 0 (one noise, one sampler),
    a row per method, the claim read off, the section and figure written."""
    result = run_benchmark("grpo_backprop", "--quick", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = markdown_rows(result.stdout, "method")
    assert list(rows) == ["DRTune", "ReFL", "GRPO"]
    assert len({cells[3] for cells in rows.values()}) == 1  # eval reward at step 0
    assert all(int(cells[1]) >= 1 and float(cells[2].split(" ± ")[0]) > 0 for cells in rows.values())
    assert "The paper's claim that RL converges slower" in result.stdout
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin grpo_backprop -->" in report and (tmp_path / "bench_grpo_backprop.png").stat().st_size > 0


def test_grpo_world_quick_reads_placements_with_the_plain_pipeline(tmp_path):
    """Two rounds of the demo, then base and run read back by the world's checker with the plain pipeline at each
    sampler and CFG: fractions in [0, 1], one row per model."""
    result = run_benchmark("grpo_world", "--quick", "--seeds", "0", "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- begin grpo_world -->" in report
    rows = markdown_rows(report, "model")
    assert list(rows) == ["base", "seed 0"]
    for cells in rows.values():
        assert len(cells) == 5  # ddpm/ddim x CFG 3/5
        for cell in cells[1:]:
            values = [float(v.strip(" %")) for part in cell.split(";") for v in part.split("/")]
            assert len(values) == 8 and all(0 <= v <= 100 for v in values if v == v)  # nan: no such caption
