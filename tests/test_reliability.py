"""Reliability: bad input is one line on stderr (exit code 2) before any model loads; a run that cannot go on stops
with one line (exit code 1) that names the checkpoint to resume from; a checkpoint is never torn and never
unpickled; a resume that would mix two runs is refused, and any other resume is bit-identical to a run never
interrupted, even after a SIGKILL while a checkpoint is being replaced or a metrics row written."""
import importlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import types

import pytest
import torch
from conftest import TINY_SD, read_metrics, tiny_argv
from safetensors.torch import load_file

import alignprop
import dpo
import draft
import drtune
import grpo
import refl
import spo

# flags that make each script valid on the tiny pipeline with 4 sampling steps
VALID = {drtune: dict(num_trained_steps=2, early_stop_max=2), refl: dict(stop_range=2), draft: dict(draft_k=2),
         alignprop: {}, dpo: dict(online=True, images_per_prompt=2, prompts_per_round=2),
         spo: dict(num_inference_steps=6, warm_steps=2, pair_threshold=0.0), grpo: dict(group_size=2)}
SCRIPTS = list(VALID)


def argv_of(module, output_dir, **overrides):
    return tiny_argv(TINY_SD, str(output_dir), **dict(VALID[module], **overrides))


@pytest.fixture
def no_models(monkeypatch):
    """A model load fails the test (the checks must come first); no progress bars on stderr."""
    import datasets
    for module in SCRIPTS:
        monkeypatch.setattr(module, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def cli_error(module, argv, capsys, before_models=True):
    """Run the script's command line; return (exit code, its one line on stderr): the only line there before the
    models load, else the last line below the progress bars."""
    try:
        code = module.cli(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    ours = [line for line in lines if line.startswith(f"{module.__name__}.py: ")]
    assert not any("Traceback" in line for line in lines) and ours == lines[-1:], lines
    assert len(lines) == 1 or not before_models, lines
    return code, ours[0]


# --- bad input: exit code 2, one line naming the flag, no model loaded --------------------------------------

NUMBERS = [("resolution", "0"), ("resolution", "-8"), ("seed", "-1"), ("seed", "4294967296"), ("seed", "abc"),
           ("num_eval_prompts", "0"), ("reward_resolution", "0"), ("learning_rate", "-1"), ("learning_rate", "0"),
           ("learning_rate", "nan"), ("lr_scheduler", "cosine_annealing"), ("lr_scheduler", "piecewise_constant"),
           ("gradient_accumulation_steps", "0"), ("train_batch_size", "0"), ("max_grad_norm", "-1"),
           ("max_grad_norm", "0"), ("checkpoints_total_limit", "-1"), ("checkpoints_total_limit", "0"),
           ("guidance_scale", "nan"), ("guidance_scale", "inf"), ("eta", "5"), ("eta", "-0.5"),
           ("max_nonfinite_steps", "0"), ("adam_beta2", "1"), ("adam_epsilon", "0"), ("lr_warmup_steps", "-1"),
           ("resume_changes", "rank")]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("flag,value", NUMBERS, ids=[f"{f}={v}" for f, v in NUMBERS])
def test_bad_numbers_are_one_line_before_any_model(module, flag, value, tmp_path, capsys, no_models):
    code, line = cli_error(module, argv_of(module, tmp_path / "out") + [f"--{flag}", value], capsys)
    assert code == 2 and line.startswith(f"{module.__name__}.py: error: ") and f"--{flag}" in line


@pytest.mark.parametrize("options,name", [("jpeg_quality=0", "jpeg_quality"), ("jpeg_quality=500", "jpeg_quality"),
                                          ("symmetry_clip_weight=nan", "symmetry_clip_weight")])
def test_bad_reward_options_are_one_line(options, name, tmp_path, capsys, no_models):
    reward = "compressibility" if "jpeg" in options else "symmetry"
    code, line = cli_error(drtune, argv_of(drtune, tmp_path, reward=reward, reward_options=options), capsys)
    assert code == 2 and "--reward" in line and name in line


def bad_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "prompts.lst").write_text("a cat\n")
    (tmp_path / "columns.csv").write_text("name,score\na cat,1\n")
    checkpointless = tmp_path / "checkpoint-3"
    checkpointless.mkdir()
    (checkpointless / "pytorch_lora_weights.safetensors").write_text("")
    return [
        (dict(output_dir=tmp_path / "file"), "--output_dir", "is a file"),
        (dict(output_dir=tmp_path / "file" / "out"), "--output_dir", "is a file"),
        (dict(train_prompts="missing/prompts.txt"), "--train_prompts", "no such file"),
        (dict(train_prompts=tmp_path / "missing.csv"), "--train_prompts", "no such file"),
        (dict(train_prompts=tmp_path / "empty"), "--train_prompts", "empty folder"),
        (dict(train_prompts=tmp_path / "prompts.lst"), "--train_prompts", "give a .txt file"),
        (dict(train_prompts=tmp_path / "columns.csv"), "--train_prompts", "no 'prompt', 'caption' or 'text' column"),
        (dict(eval_prompts=tmp_path / "missing.txt"), "--eval_prompts", "no such file"),
        (dict(resume_from_checkpoint=tmp_path / "checkpoint-9"), "--resume_from_checkpoint", "no such folder"),
        (dict(resume_from_checkpoint=checkpointless), "--resume_from_checkpoint", "not a complete checkpoint"),
    ]


@pytest.mark.parametrize("case", range(10))
@pytest.mark.parametrize("module", [drtune, dpo], ids=lambda m: m.__name__)
def test_bad_paths_are_one_line_before_any_model(module, case, tmp_path, capsys, no_models):
    flags, flag, message = bad_paths(tmp_path)[case]
    argv = argv_of(module, tmp_path / "out")
    for key, value in flags.items():
        argv += [f"--{key}", str(value)] if key != "output_dir" else []
    if "output_dir" in flags:
        argv[argv.index("--output_dir") + 1] = str(flags["output_dir"])
    code, line = cli_error(module, argv, capsys)
    assert code == 2 and flag in line and message in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_output_dir_is_one_line(tmp_path, capsys, no_models):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, line = cli_error(drtune, argv_of(drtune, locked / "out"), capsys)
    finally:
        locked.chmod(0o755)
    assert code == 2 and "--output_dir" in line and "not writable" in line


def write_pairs(path, labels, images):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"jpg_0": pa.array(images, pa.binary()), "jpg_1": pa.array(images, pa.binary()),
                             "label_0": labels, "caption": ["a"] * len(labels)}), path)
    return str(path)


def png_bytes():
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_dpo_data_errors_are_one_line_before_any_model(tmp_path, capsys, no_models):
    good = write_pairs(tmp_path / "good.parquet", [1.0], [png_bytes()])
    strings = write_pairs(tmp_path / "strings.parquet", ["1", "0"], [png_bytes()] * 2)
    unreadable = write_pairs(tmp_path / "unreadable.parquet", [1.0, 0.0], [b"not an image", png_bytes()[:30]])
    cases = [(["--preset", "demo", "--dataset_name", good], "--offline"),
             (["--offline", "--dataset_name", strings], "label_0 holds string values"),
             (["--offline", "--dataset_name", unreadable], "no readable pair")]
    for extra, message in cases:
        code, line = cli_error(dpo, tiny_argv(TINY_SD, str(tmp_path / "out")) + extra, capsys)
        assert code == 2 and "--dataset_name" in line and message in line
    args = dpo.parse_args(["--preset", "demo", "--offline", "--dataset_name", good, "--ref_update_rate", "0"])
    dpo.check_algorithm_arguments(args)  # the explicit switch: offline on the pairs
    assert not args.online and args.dataset_name == good


def test_prompt_files_in_every_format(tmp_path):
    import pandas as pd
    frame = pd.DataFrame({"caption": ["a red car", None, "  a blue boat "], "n": [1, 2, 3]})
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_json(tmp_path / "p.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "p.parquet")
    for name in ("p.csv", "p.jsonl", "p.parquet"):
        assert drtune.read_prompts(str(tmp_path / name), []) == ["a red car", "a blue boat"], name


# --- checkpoints: marker written last, no pickle, never torn, pruning only our own ----------------------------


def run(module, output_dir, **overrides):
    from accelerate.state import AcceleratorState
    row = module.main(module.parse_args(argv_of(module, output_dir, **overrides)))
    AcceleratorState._reset_state(reset_partial_state=True)  # the next main() in this test starts afresh
    return row


def lora(output_dir):
    return load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))


def strip(rows):  # timings vary; a short run also evaluates at its last step
    return [{k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb", "eval_reward")} for r in rows]


class Boom:
    """A pickle that runs code when loaded: it creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_planted_pickle_is_never_loaded(tmp_path, monkeypatch):
    """Online DPO with a moving reference (the state accelerate used to pickle): every file accelerate's
    load_state would read is planted with a pickle that runs code, and no loader of pickles may run at all."""
    out, sentinel = str(tmp_path / "run"), str(tmp_path / "pwned")
    flags = dict(ref_update_rate=0.5, steps_per_round=1, checkpointing_steps=2, num_eval_prompts=1)
    run(dpo, out, max_train_steps=2, **flags)
    checkpoint = os.path.join(out, "checkpoint-2")
    assert not [name for name in os.listdir(checkpoint) if name.endswith((".pkl", ".bin", ".pt"))]
    assert "reference_lora.safetensors" in os.listdir(checkpoint)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "scaler.pt",
                 "pytorch_lora_weights.bin"):
        with open(os.path.join(checkpoint, name), "wb") as f:
            pickle.dump(Boom(sentinel), f)
    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, lambda *a, **k: pytest.fail("a pickle was loaded"))
    row = run(dpo, out, max_train_steps=3, resume_from_checkpoint="latest", **flags)
    assert row["step"] == 3 and not os.path.exists(sentinel)


def test_torn_and_foreign_checkpoints_are_never_latest_nor_pruned(tmp_path):
    out = tmp_path / "run"
    run(drtune, out, max_train_steps=2, checkpointing_steps=2)
    ours = out / "checkpoint-2"
    torn = out / "checkpoint-6"  # the old way to tear one: its LoRA file deleted, the rest left
    shutil.copytree(ours, torn)
    (torn / "pytorch_lora_weights.safetensors").unlink()
    foreign = out / "checkpoint-1"  # another run's complete checkpoint
    shutil.copytree(ours, foreign)
    marker = json.loads((foreign / "checkpoint.json").read_text())
    (foreign / "checkpoint.json").write_text(json.dumps(dict(marker, step=1, run_id="another-run")))
    unmarked = out / "checkpoint-5"  # a folder we did not write
    unmarked.mkdir()
    assert list(drtune.complete_checkpoints(str(out))) == [1, 2]
    args = drtune.parse_args(argv_of(drtune, out, resume_from_checkpoint="latest"))
    drtune.check_arguments(args)
    assert drtune.resume_checkpoint(args)[0] == str(ours)
    run(drtune, out, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=1,
        resume_from_checkpoint="latest")
    assert sorted(os.listdir(out)) == sorted(["checkpoint-1", "checkpoint-4", "checkpoint-5", "checkpoint-6",
                                              "README.md", "config.json", "lora_kohya.safetensors", "metrics.jsonl",
                                              "pytorch_lora_weights.safetensors", "reward_curve.png", "samples"])


def test_no_checkpoint_with_a_non_finite_lora_weight(tmp_path):
    unet = torch.nn.Module()
    unet.lora_A = torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    printed = []
    accelerator = types.SimpleNamespace(print=printed.append)
    args = types.SimpleNamespace(output_dir=str(tmp_path), finetune="lora")
    guard = drtune.NonfiniteGuard(types.SimpleNamespace(max_nonfinite_steps=3))
    drtune.save_checkpoint(accelerator, unet, None, None, None, args, 4, guard)
    assert os.listdir(tmp_path) == [] and "no checkpoint" in printed[0]


def test_metrics_keep_one_row_per_step_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [dict(step=s, loss=float(s)) for s in (0, 1, 2, 1, 3, 4, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # cut short by a crash
    accelerator = types.SimpleNamespace(is_main_process=True)
    log = drtune.MetricsLog(accelerator, str(path), 3)
    assert [r["step"] for r in log.rows] == [0, 1, 2, 3] and read_metrics(str(tmp_path)) == log.rows
    drtune.MetricsLog(accelerator, str(path), 0)  # a fresh run starts an empty file
    assert path.read_text() == ""


# --- resume: what may change and what is refused --------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A drtune run with checkpoint-2 (lr 1e-3, seed 0, rank 4)."""
    from accelerate.state import AcceleratorState
    out = tmp_path_factory.mktemp("resume") / "run"
    run(drtune, out, max_train_steps=2, checkpointing_steps=2)
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


@pytest.mark.parametrize("flags,message", [
    (dict(learning_rate=1e-2, seed=1), r"--learning_rate 0.01 \(checkpoint: 0.001\), --seed 1 \(checkpoint: 0\)"),
    (dict(rank=8), r"--rank 8 \(checkpoint: 4\); resume with the checkpoint's values"),
    (dict(reward="compressibility"), r"--reward compressibility \(checkpoint: symmetry\)"),
    (dict(train_batch_size=3), r"--train_batch_size 3 \(checkpoint: 2\)"),
    (dict(learning_rate=1e-2), "or apply the new value from here with --resume_changes learning_rate"),
    (dict(resume_from_checkpoint=None), "already holds checkpoint-2 of an earlier run"),
])
def test_a_resume_that_would_mix_two_runs_is_refused(checkpointed, flags, message, capsys, no_models):
    argv = argv_of(drtune, checkpointed, **dict(dict(resume_from_checkpoint="latest"), **flags))
    code, line = cli_error(drtune, argv, capsys)
    assert code == 2 and line.startswith("drtune.py: error: ")
    assert len(line) < 600 and __import__("re").search(message, line), line


def test_a_checkpoint_of_another_script_is_refused(checkpointed):
    args = refl.parse_args(argv_of(refl, checkpointed, resume_from_checkpoint=str(checkpointed / "checkpoint-2")))
    with pytest.raises(refl.UsageError, match="a checkpoint of drtune.py, not of refl.py"):
        refl.check_arguments(args)


def test_length_logging_and_saving_may_change_on_resume(checkpointed):
    args = drtune.parse_args(argv_of(drtune, checkpointed, resume_from_checkpoint="latest", max_train_steps=50,
                                     validation_steps=7, logging_steps=3, checkpointing_steps=9, report_to="none",
                                     num_eval_prompts=1, checkpoints_total_limit=2, gradient_checkpointing=True))
    drtune.check_arguments(args)


def test_resume_changes_applies_a_new_learning_rate(checkpointed, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(checkpointed, out)
    run(drtune, out, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-2, resume_from_checkpoint="latest",
        resume_changes="learning_rate")
    assert [r.get("lr") for r in read_metrics(str(out))] == [None, 1e-3, 1e-3, 1e-2, 1e-2]
    marker = json.loads((out / "checkpoint-4" / "checkpoint.json").read_text())
    assert marker["run"]["learning_rate"] == 1e-2 and marker["lr_scheduler"]["base_lrs"] == [1e-2]


# --- a run that cannot go on: one line, exit code 1, the checkpoint to resume from --------------------------


def poison(monkeypatch, module, nan_steps):
    """algorithm_loss gives a NaN loss and reward at the given steps (one call per step)."""
    original, calls = module.algorithm_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, reward, extra = original(*args, **kwargs)
        return (loss * float("nan"), reward * float("nan"), extra) if len(calls) in nan_steps else (loss, reward, extra)

    monkeypatch.setattr(module, "algorithm_loss", poisoned)


def test_nonfinite_stop_is_one_line_naming_the_last_clean_checkpoint(tmp_path, monkeypatch, capsys):
    """Step 3 skipped, step 4 finite (checkpoint-4 written, not clean), steps 5-6 skipped: the stop names
    checkpoint-2, which pruning kept beside checkpoint-4."""
    poison(monkeypatch, drtune, {3, 5, 6, 7, 8})
    out = tmp_path / "nan"
    argv = argv_of(drtune, out, max_train_steps=8, checkpointing_steps=2, checkpoints_total_limit=1,
                   max_nonfinite_steps=2)
    code, line = cli_error(drtune, argv, capsys, before_models=False)
    assert code == 1 and line.startswith("drtune.py: stopped at step 6: 2 updates in a row (from step 5)")
    assert f"resume from {out / 'checkpoint-2'}" in line and "--resume_changes learning_rate" in line
    assert list(drtune.complete_checkpoints(str(out))) == [2, 4]
    markers = {s: json.loads((out / f"checkpoint-{s}" / "checkpoint.json").read_text()) for s in (2, 4)}
    assert markers[2]["clean"] and not markers[4]["clean"]
    assert [r["skipped"] for r in read_metrics(str(out))[1:]] == [False, False, True, False, True, True]


def test_nonfinite_stop_without_a_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, drtune, {1, 2})
    argv = argv_of(drtune, tmp_path / "nan", max_train_steps=4, max_nonfinite_steps=2)
    code, line = cli_error(drtune, argv, capsys, before_models=False)
    assert code == 1 and "no checkpoint was written before them" in line


# --- SIGKILL while a checkpoint is replaced or a metrics row written, then a bit-identical resume ------------


def killed_run(script, argv, kill):
    """In a child process: run the script and SIGKILL it at `kill`: 'replace' (checkpoint-4 moved aside to be
    replaced, the new one not yet in place), 'delete' (the replaced checkpoint-4 half deleted) or 'metrics' (half of
    step 5's row written)."""
    # a forkserver child inherits the forkserver start method: the DataLoader's workers (dpo-offline) would come from
    # a new server of this process, which outlives the SIGKILL below with them; forked workers exit with their parent
    multiprocessing.set_start_method("fork", force=True)
    module = importlib.import_module(script)
    replace, rmtree, log = os.replace, shutil.rmtree, module.MetricsLog.log

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def replace_then_die(src, dst):
        replace(src, dst)
        if kill == "replace" and dst.endswith("checkpoint-4.old"):
            die()

    def rmtree_halfway(path, *args, **kwargs):
        if kill == "delete" and str(path).endswith("checkpoint-4.old") and os.path.exists(path):
            os.remove(os.path.join(path, "pytorch_lora_weights.safetensors"))
            die()
        rmtree(path, *args, **kwargs)

    def log_halfway(self, row):
        if kill == "metrics" and row["step"] == 5:
            with open(self.path, "a") as f:
                f.write(json.dumps(row)[:25])
            die()
        log(self, row)

    os.replace, shutil.rmtree, module.MetricsLog.log = replace_then_die, rmtree_halfway, log_halfway
    module.main(module.parse_args(argv))


@pytest.fixture(scope="module")
def fork_context():
    """Fresh processes forked from a server that has imported the libraries and scripts (no import per child)."""
    import multiprocessing.forkserver as forkserver
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "accelerate", "diffusers", "transformers", "peft", "datasets", "drtune",
                                    "dpo", "spo", "conftest", "test_reliability"])
    forkserver.ensure_running()  # started here, so that it is the fixture's process, not a test's
    yield context
    forkserver._forkserver._stop()  # the server lives until pytest exits otherwise (conftest: nothing_left_running)


def killed(context, module, output_dir, kill, **flags):
    child = context.Process(target=killed_run, args=(module.__name__, argv_of(module, output_dir, **flags), kill))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, child.exitcode


def pairs_file(tmp_path):
    """Pairs with a tie and an unreadable row, so that resuming also has to pass over the rows a run skipped."""
    from PIL import Image

    def png(color):
        import io
        buffer = io.BytesIO()
        Image.new("RGB", (40, 32), color).save(buffer, format="PNG")
        return buffer.getvalue()
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [png(c) for c in colors] + [b"not an image"]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"jpg_0": pa.array(images, pa.binary()), "jpg_1": pa.array(images[::-1], pa.binary()),
                             "label_0": [1.0, 0.0, 0.5, 1.0, 0.0, 1.0], "caption": [f"pair {i}" for i in range(6)]}),
                   tmp_path / "pairs.parquet")
    return str(tmp_path / "pairs.parquet")


FAULTS = {"drtune": (drtune, {}),
          "dpo-offline": (dpo, dict(online=False, dataloader_num_workers=2, random_flip=True)),
          "dpo-online": (dpo, dict(steps_per_round=3, ref_update_rate=0.5, num_eval_prompts=1)),
          "spo": (spo, {})}


@pytest.mark.parametrize("case", FAULTS)
def test_sigkill_while_replacing_a_checkpoint_and_writing_metrics_then_resume_is_bit_identical(
        case, tmp_path, fork_context):
    """checkpoint-2 and -4, then a resume from checkpoint-2 killed while it replaces checkpoint-4 (moved aside, the
    new one not in place yet), then `latest` (the moved copy) killed while writing step 5's metrics row, then
    `latest` once more: the same LoRA and metrics as a run from 0 to 6 never interrupted."""
    module, flags = FAULTS[case]
    flags = dict(flags, checkpointing_steps=2, learning_rate=1e-2)
    if case == "dpo-offline":
        flags["dataset_name"] = pairs_file(tmp_path)
    full, out = tmp_path / "full", tmp_path / "killed"
    run(module, full, max_train_steps=6, **flags)
    run(module, out, max_train_steps=4, **flags)
    killed(fork_context, module, out, "replace", max_train_steps=6,
           resume_from_checkpoint=str(out / "checkpoint-2"), **flags)
    assert not (out / "checkpoint-4").exists() and list(module.complete_checkpoints(str(out))) == [2, 4]
    killed(fork_context, module, out, "metrics", max_train_steps=6, resume_from_checkpoint="latest", **flags)
    with pytest.raises(ValueError):
        json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])  # the row cut short
    run(module, out, max_train_steps=6, resume_from_checkpoint="latest", **flags)
    expected, resumed = lora(full), lora(out)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert strip(read_metrics(str(out))) == strip(read_metrics(str(full)))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == [f"checkpoint-{s}" for s in (2, 4, 6)]


def test_sigkill_while_deleting_the_replaced_checkpoint(tmp_path, fork_context):
    """The defect of old: a kill inside the delete of a replaced checkpoint left a checkpoint without its LoRA file,
    which `latest` then chose. Now the torn copy is checkpoint-4.old, never complete, never chosen."""
    out = tmp_path / "run"
    run(drtune, out, max_train_steps=4, checkpointing_steps=2)
    killed(fork_context, drtune, out, "delete", max_train_steps=4, checkpointing_steps=2,
           resume_from_checkpoint=str(out / "checkpoint-2"))
    assert (out / "checkpoint-4.old").exists() and drtune.read_marker(str(out / "checkpoint-4.old")) is None
    args = drtune.parse_args(argv_of(drtune, out, resume_from_checkpoint="latest"))
    drtune.check_arguments(args)
    assert drtune.resume_checkpoint(args)[0] == str(out / "checkpoint-4")


def reward_files(tmp_path):
    """Files that are not what their reward option says: a pickle torch.load(weights_only=True) refuses, an image, a
    folder where a checkpoint goes, a file where a model folder goes, an open_clip architecture that does not exist."""
    import argparse

    from PIL import Image
    torch.save({"state_dict": {}, "args": argparse.Namespace(a=1)}, tmp_path / "pickled.pt")
    Image.new("RGB", (8, 8)).save(tmp_path / "image.pt", format="PNG")
    return [
        ("hpsv21", f"hps_checkpoint={tmp_path / 'pickled.pt'}", "hps_checkpoint", "torch.load(weights_only=True) refuses"),
        ("hpsv21", f"hps_checkpoint={tmp_path / 'image.pt'}", "hps_checkpoint", "an image file"),
        ("aesthetic", f"aesthetic_mlp={tmp_path}", "aesthetic_mlp", "is a folder"),
        ("pickscore", f"pickscore_model={tmp_path / 'image.pt'}", "pickscore_model", "give a model folder"),
        ("clipscore", "clip_model=ViT-H-15", "clip_model", "not an open_clip architecture"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_reward_files_that_are_not_what_their_option_says_are_one_line(case, tmp_path, capsys, no_models):
    import evaluate
    reward, options, option, message = reward_files(tmp_path)[case]
    code, line = cli_error(drtune, argv_of(drtune, tmp_path / "out", reward=reward, reward_options=options), capsys)
    assert code == 2 and f"--reward {reward}" in line and option in line and message in line
    assert evaluate.cli(["--pretrained_model_name_or_path", TINY_SD, "--rewards", reward, "--reward_options", options,
                         "--prompts", "tiny_models/world-eval-prompts.txt", "--output_dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err and message in err


def test_a_reward_model_that_fails_to_load_is_one_line(tmp_path):
    """Past the cheap checks (a readable checkpoint of the wrong model): build_reward's one line names the options."""
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    import rewards
    from conftest import WORLD_REWARD_OPTIONS
    with pytest.raises(rewards.RewardLoadError, match=r"^hpsv21: could not load its model .*hps_checkpoint="):
        rewards.build_reward("hpsv21", **dict(WORLD_REWARD_OPTIONS, hps_checkpoint=str(tmp_path / "other.safetensors")))
