import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SD = os.path.join(ROOT, "tiny_models", "sd15")
TINY_SDXL = os.path.join(ROOT, "tiny_models", "sdxl")
TINY_SD3 = os.path.join(ROOT, "tiny_models", "sd35")
TINY_FLUX = os.path.join(ROOT, "tiny_models", "flux")
# The trained tiny world (tiny_models/build_world.py) and its reward models
WORLD_SD = os.path.join(ROOT, "tiny_models", "world-sd15")
WORLD_SD3 = os.path.join(ROOT, "tiny_models", "world-sd3")  # the SD3-format world (build_world.py sd3 phase)
WORLD_CLIP = os.path.join(ROOT, "tiny_models", "world-clip")


def _world_reward_options():
    """The reward options every --preset demo passes (WORLD_DEMO), as build_reward keyword arguments."""
    import drtune
    import rewards
    return rewards.parse_options(drtune.WORLD_DEMO["reward_options"])


WORLD_REWARD_OPTIONS = _world_reward_options()


def tiny_argv(model, output_dir, **overrides):
    """Command-line arguments for a seconds-long run of any algorithm script on a tiny pipeline."""
    flags = dict(pretrained_model_name_or_path=model, output_dir=output_dir, resolution=32, num_inference_steps=4,
                 guidance_scale=3.0, reward="symmetry", train_batch_size=2, max_train_steps=2, learning_rate=1e-3,
                 rank=4, validation_steps=100, checkpointing_steps=100, report_to="none", mixed_precision="no",
                 num_eval_prompts=2)
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


STYLES = ("anime", "concept-art", "paintings", "photo")  # the HPS v2 benchmark's


@pytest.fixture(scope="session")
def hpdv2(tmp_path_factory):
    """A tiny copy of zhwang/HPDv2's JSON files: benchmark/{style}.json (lists of 120 prompts, not 800) and
    train.json (one record per image pair, so prompts repeat; other fields as HPS v2's annotations have)."""
    root = tmp_path_factory.mktemp("HPDv2")
    (root / "benchmark").mkdir()
    for style in STYLES:
        (root / "benchmark" / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(120)]))
    records = [dict(prompt=p, human_preference=[1, 0], file_path=["a.jpg", "b.jpg"], user_hash="u")
               for p in [" a cat ", "a dog", "a cat", "a red car", "a dog"]]
    (root / "train.json").write_text(json.dumps(records))
    (root / "test.json").write_text(json.dumps([dict(prompt="a test prompt", image_path=["x.jpg"], rank=[1])]))
    return root


@pytest.fixture(params=[TINY_SD, TINY_SDXL], ids=["sd15", "sdxl"])
def tiny_model(request):
    return request.param


def _our_children():
    """The live processes this pytest process started, directly or below (zombies are dead: left out)."""
    import psutil
    out = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                out[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    return out


def _our_listening_ports():
    import psutil
    return {c.laddr.port for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


@pytest.fixture(scope="session", autouse=True)
def scratch_tmpdir(tmp_path_factory):
    """TMPDIR (and tempfile's) for the session: an empty folder of pytest's, so that a temporary file or folder a
    test or the scripts it runs leave behind is seen (nothing_left_running) and never piles up in /tmp."""
    import multiprocessing.util
    import tempfile
    multiprocessing.util.get_temp_dir()  # this process's pymp- folder where multiprocessing removes it at exit
    scratch = tmp_path_factory.getbasetemp() / "tmpdir"
    scratch.mkdir()
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"], tempfile.tempdir = str(scratch), None
    yield scratch
    if saved is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None


@pytest.fixture(autouse=True)
def nothing_left_running(scratch_tmpdir):
    """A test fails if a process it started (a child of pytest, at any depth) is still alive after it (10 s of grace
    to exit), if pytest itself still listens on a port the test opened, or if the test left a file or folder in
    TMPDIR; what was left is then ended or removed, so that the next tests start clean. Processes, ports and
    temporary files of broader fixtures (module or session scope: the forkserver of test_reliability) were there before this fixture and are theirs to end; torch's compile cache (torchinductor_USER, made once
    per process) stays."""
    import shutil
    import time

    import psutil
    before, ports, entries = set(_our_children()), _our_listening_ports(), set(os.listdir(scratch_tmpdir))
    yield
    deadline = time.monotonic() + 10
    while True:
        left = {pid: p for pid, p in _our_children().items() if pid not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    described = []
    for process in left.values():
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(left.values()), timeout=10)
    open_ports = sorted(_our_listening_ports() - ports)
    files = sorted(n for n in set(os.listdir(scratch_tmpdir)) - entries if not n.startswith("torchinductor_"))
    for name in files:
        path = scratch_tmpdir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()
    problems = ([f"processes still running (killed now): {'; '.join(described)}"] if described else []) + \
               ([f"ports still listening: {open_ports}"] if open_ports else []) + \
               ([f"left in TMPDIR (removed now): {', '.join(files[:10])}"] if files else [])
    if problems:
        pytest.fail("the test left things behind: " + " | ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one global state per process; a script runs once per process, tests run main() many times."""
    yield
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def lora_effect(model, lora_dir):
    """Max pixel change that the saved LoRA makes once loaded into a plain diffusers pipeline (the user's path)."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    pipe = (StableDiffusionXLPipeline if model == TINY_SDXL else StableDiffusionPipeline).from_pretrained(model)
    kwargs = dict(num_inference_steps=4, height=32, width=32, output_type="pt")
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(lora_dir)
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    return (after - before).abs().max().item()


# What every script's run leaves in --output_dir (SPEC), for a 2-step run validated and checkpointed every step
# with checkpoints_total_limit=1.
RUN_OUTPUTS = ("pytorch_lora_weights.safetensors", "config.json", "metrics.jsonl", "reward_curve.png",
               "samples/step-000000.png", "samples/step-000002.png", "samples/before_after.png", "checkpoint-2")


def read_metrics(output_dir):
    """The rows of a run's metrics.jsonl."""
    import json
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_cli(script, argv, cwd):
    """Run `script` as a user would, for a 2-step run validated and checkpointed every step with
    checkpoints_total_limit=1; check that it left RUN_OUTPUTS (and no checkpoint-1) and return its metrics rows."""
    import subprocess
    import sys
    subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], check=True, cwd=str(cwd), timeout=300)
    output_dir = argv[argv.index("--output_dir") + 1]
    for name in RUN_OUTPUTS:
        assert os.path.exists(os.path.join(output_dir, name)), name
    assert not os.path.exists(os.path.join(output_dir, "checkpoint-1"))  # checkpoints_total_limit
    return read_metrics(output_dir)


def free_port():
    """A TCP port that is free on this machine right now, for torchrun's rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(folder):
    """The environment of a torchrun launch: one thread per process, and TMPDIR inside the test's own folder, where
    torchrun's torchelastic_* folder (which it leaves behind) goes away with the test's tmp_path."""
    tmp = os.path.join(folder, "torchrun-tmp")
    os.makedirs(tmp, exist_ok=True)
    return dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=tmp)


def two_process_loras(script, argv, port=None):
    """Train `script` with torchrun on 2 CPU processes (gloo) and return each rank's final LoRA state dict."""
    import subprocess
    import sys

    import torch
    output_dir = argv[argv.index("--output_dir") + 1]
    env = torchrun_env(os.path.dirname(os.path.abspath(output_dir)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(port or free_port()), os.path.join(ROOT, "tests", "dist_worker.py"), script, *argv]
    run = subprocess.run(cmd, env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return [torch.load(os.path.join(output_dir, f"lora_rank{r}.pt")) for r in (0, 1)]
