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


def two_process_loras(script, argv, port=None):
    """Train `script` with torchrun on 2 CPU processes (gloo) and return each rank's final LoRA state dict."""
    import subprocess
    import sys

    import torch
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(port or free_port()), os.path.join(ROOT, "tests", "dist_worker.py"), script, *argv]
    run = subprocess.run(cmd, env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    output_dir = argv[argv.index("--output_dir") + 1]
    return [torch.load(os.path.join(output_dir, f"lora_rank{r}.pt")) for r in (0, 1)]
