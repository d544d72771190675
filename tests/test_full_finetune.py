"""--finetune full: every denoiser weight trained (fp32), sharded with FSDP2 over several processes.

One process: every script trains 2 steps on the tiny SD1.5 and SD3.5 pipelines and writes the denoiser as a diffusers
model folder that from_pretrained loads with the trained weights. Two processes (torchrun, gloo, CPU): the denoiser is
sharded (FSDP2 modules, DTensor parameters in the optimizer), the update is one process's within float tolerance,
checkpoints resume bit-identically, and a kill while a checkpoint is renamed into place leaves no torn one."""
import json
import os
import subprocess
import sys

import pytest
import numpy as np
import torch
from safetensors.torch import load_file

import alignprop
import dpo
import draft
import drtune
import grpo
import refl
import spo
from conftest import ROOT, TINY_FLUX, TINY_SD, TINY_SD3, free_port, read_metrics, tiny_argv, torchrun_env
from test_reliability import fork_context, killed  # noqa: F401 - the SIGKILL tests' forkserver fixture

FLOW = dict(max_sequence_length=16, guidance_scale=None)
FLAGS = {"drtune": (drtune, dict(num_trained_steps=2, early_stop_max=2)),
         "refl": (refl, dict(stop_range=2)),
         "draft": (draft, dict(draft_k=2)),
         "alignprop": (alignprop, {}),
         "dpo-online": (dpo, dict(online=True, images_per_prompt=2, prompts_per_round=2, steps_per_round=1,
                                  ref_update_rate=0.5)),
         "dpo-offline": (dpo, {}),  # + dataset_name: Pick-a-Pic-format pairs in a local parquet file
         "spo": (spo, dict(num_inference_steps=6, warm_steps=2, pair_threshold=0.0)),
         "grpo": (grpo, dict(group_size=2, beta=0.01))}
REFERENCE = {"dpo-online", "dpo-offline", "spo", "grpo"}  # the scripts that keep a frozen copy of the base denoiser


def full_argv(model, out, flags, **overrides):
    flags = dict(flags, finetune="full", learning_rate=1e-3, **overrides)
    if model in (TINY_SD3, TINY_FLUX):
        flags = dict(FLOW, **flags)
        if flags.get("num_inference_steps") == 6:  # SPO: the SDE step of the flow models
            flags["eta"] = 0.7
        if "group_size" in flags:
            flags.update(sampler="euler", eta=0.7)
    return tiny_argv(model, str(out), **flags)


def capture(monkeypatch, module):
    """The script's denoiser, and its frozen base copy where it keeps one (keep_base_copy)."""
    captured, add_lora = {}, module.add_lora

    def spy(unet, args):
        captured["unet"] = unet
        return add_lora(unet, args)
    monkeypatch.setattr(module, "add_lora", spy)
    return captured


@pytest.mark.parametrize("model", [TINY_SD, TINY_SD3], ids=["sd15", "sd35"])
@pytest.mark.parametrize("script", FLAGS)
def test_every_script_trains_every_weight_and_writes_a_model_folder(script, model, tmp_path, monkeypatch):
    module, flags = FLAGS[script]
    if script == "dpo-offline":
        from benchmarks.common import pairs_parquet
        pairs_parquet(str(tmp_path / "pairs.parquet"), 4, 32)
        flags = dict(dataset_name=str(tmp_path / "pairs.parquet"))
    out = tmp_path / "run"
    captured = capture(monkeypatch, module)
    module.main(module.parse_args(full_argv(model, out, flags)))
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["grad_norm"] > 0 for r in rows[1:]), rows
    unet = captured["unet"]
    assert all(p.requires_grad and p.dtype == torch.float32 for p in unet.parameters())
    assert not hasattr(unet, "peft_config")
    folder = "unet" if model == TINY_SD else "transformer"
    assert sorted(os.listdir(out / folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "lora_kohya.safetensors").exists()
    saved = load_file(str(out / folder / "diffusion_pytorch_model.safetensors"))
    trained = {k: v.detach() for k, v in unet.state_dict().items()}
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    base = load_file(os.path.join(model, folder, "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k].float(), saved[k]) for k in base), "training changed nothing"
    assert (out / "samples" / "before_after.png").exists()
    card = (out / "README.md").read_text()
    assert "full fine-tune" in card and f'subfolder="{folder}"' in card and "load_lora_weights" not in card
    copy = module._BASE_COPY.get(unet)
    assert (copy is not None) == (script in REFERENCE)
    if copy is not None:  # frozen: the base weights, except DPO's moving reference, which follows the policy
        weights = {k: v for k, v in copy.state_dict().items()}
        assert not any(p.requires_grad for p in copy.parameters())
        moved = [k for k in base if not torch.equal(base[k].float(), weights[k].float())]
        assert bool(moved) == (script == "dpo-online")


def test_the_model_folder_loads_in_the_pipeline_with_the_trained_weights(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    out = tmp_path / "run"
    captured = capture(monkeypatch, drtune)
    drtune.main(drtune.parse_args(full_argv(TINY_SD, out, FLAGS["drtune"][1])))
    unet = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    trained = dict(captured["unet"].named_parameters())
    assert all(torch.equal(p, trained[k]) for k, p in unet.named_parameters())
    kwargs = dict(num_inference_steps=4, height=32, width=32, output_type="pt")
    base = StableDiffusionPipeline.from_pretrained(TINY_SD)
    tuned = StableDiffusionPipeline.from_pretrained(TINY_SD, unet=unet)
    before = base("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    after = tuned("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (after - before).abs().max() > 1e-3


def test_bf16_with_gradient_checkpointing_keeps_fp32_master_weights_and_a_bf16_reference(tmp_path, monkeypatch):
    """Mixed precision as diffusers' full fine-tuning examples: the trained weights in fp32, the forwards under bf16
    autocast (and their recomputation in the backward), DPO's frozen base copy in bf16."""
    out = tmp_path / "run"
    captured = capture(monkeypatch, dpo)
    dpo.main(dpo.parse_args(full_argv(TINY_SD, out, FLAGS["dpo-online"][1], mixed_precision="bf16",
                                      gradient_checkpointing=True, checkpointing_granularity="both")))
    assert all(r["grad_norm"] > 0 for r in read_metrics(str(out))[1:])
    unet = captured["unet"]
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    assert all(p.dtype == torch.bfloat16 for p in dpo._BASE_COPY[unet].parameters())


@pytest.mark.parametrize("script", ["drtune", "dpo-online", "grpo"])
def test_fp16_over_several_processes_is_one_line(script, tmp_path, monkeypatch, capsys):
    """fp16's grad scaler would decide on each process's gradient shard alone: refused before anything loads, as a
    GPU machine under torchrun would see it (CUDA present, WORLD_SIZE 2); one process or LoRA passes the check."""
    module, flags = FLAGS[script]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert module.cli(full_argv(TINY_SD, tmp_path / "run", dict(flags, mixed_precision="fp16"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--mixed_precision fp16 with --finetune full over several processes" in err
    assert "bf16" in err and not (tmp_path / "run").exists()
    lora = full_argv(TINY_SD, tmp_path / "run", dict(flags, mixed_precision="fp16"))
    lora[lora.index("--finetune") + 1] = "lora"
    module.check_arguments(module.parse_args(lora))  # LoRA over several processes: the usual fp16 scaler
    monkeypatch.setenv("WORLD_SIZE", "1")
    module.check_arguments(module.parse_args(full_argv(TINY_SD, tmp_path / "run", dict(flags, mixed_precision="fp16"))))


def test_rank_and_target_modules_are_not_used(tmp_path, capsys):
    out = tmp_path / "run"
    drtune.main(drtune.parse_args(full_argv(TINY_SD, out, FLAGS["drtune"][1], max_train_steps=1, rank=8,
                                            lora_target_modules="to_q")))
    assert "--rank, --lora_target_modules and --validation_lora_scale are not used" in capsys.readouterr().out


# --- checkpoints: resume bit-identically, a kill leaves no torn checkpoint --------------------------------------


def weights(out):
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def strip(rows):
    """Rows without timings, and without the evaluation that ends a shorter run."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb", "eval_reward")} for r in rows]


@pytest.mark.parametrize("script", ["drtune", "dpo-online"])
def test_resume_is_bit_identical(script, tmp_path):
    """The full weights and AdamW state gathered into checkpoint-2 (and DPO's moving reference), resumed: the weights
    and metrics of a run never interrupted."""
    module, flags = FLAGS[script]
    flags = dict(flags, checkpointing_steps=2, steps_per_round=2) if script == "dpo-online" else \
        dict(flags, checkpointing_steps=2)
    whole, out = tmp_path / "whole", tmp_path / "resumed"
    module.main(module.parse_args(full_argv(TINY_SD, whole, flags, max_train_steps=4)))
    module.main(module.parse_args(full_argv(TINY_SD, out, flags, max_train_steps=2)))
    files = sorted(os.listdir(out / "checkpoint-2"))
    assert "denoiser.safetensors" in files and "pytorch_lora_weights.safetensors" not in files
    assert ("reference_model.safetensors" in files) == (script == "dpo-online")
    module.main(module.parse_args(full_argv(TINY_SD, out, flags, max_train_steps=4, resume_from_checkpoint="latest")))
    expected, resumed = weights(whole), weights(out)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert strip(read_metrics(str(out))) == strip(read_metrics(str(whole)))


def test_a_resume_as_lora_of_a_full_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    flags = dict(FLAGS["drtune"][1], checkpointing_steps=1)
    drtune.main(drtune.parse_args(full_argv(TINY_SD, out, flags, max_train_steps=1)))
    argv = full_argv(TINY_SD, out, flags, max_train_steps=2, resume_from_checkpoint="latest")
    argv[argv.index("--finetune") + 1] = "lora"
    assert drtune.cli(argv) == 2
    assert "--finetune lora (checkpoint: full)" in capsys.readouterr().err


def test_sigkill_while_replacing_a_full_checkpoint_then_resume_is_bit_identical(tmp_path, fork_context):  # noqa: F811
    """test_reliability's kill, with --finetune full: checkpoint-4 moved aside to be replaced and the process killed;
    the moved copy is still a complete checkpoint (`latest`), and resuming from it ends as a run never interrupted."""
    flags = dict(finetune="full", checkpointing_steps=2, learning_rate=1e-3)
    whole, out = tmp_path / "whole", tmp_path / "killed"
    drtune.main(drtune.parse_args(full_argv(TINY_SD, whole, FLAGS["drtune"][1], checkpointing_steps=2,
                                            max_train_steps=6)))
    drtune.main(drtune.parse_args(full_argv(TINY_SD, out, FLAGS["drtune"][1], checkpointing_steps=2,
                                            max_train_steps=4)))
    killed(fork_context, drtune, out, "replace", max_train_steps=6, resume_from_checkpoint=str(out / "checkpoint-2"),
           **flags)
    assert not (out / "checkpoint-4").exists() and list(drtune.complete_checkpoints(str(out))) == [2, 4]
    drtune.main(drtune.parse_args(full_argv(TINY_SD, out, FLAGS["drtune"][1], checkpointing_steps=2,
                                            max_train_steps=6, resume_from_checkpoint="latest")))
    expected, resumed = weights(whole), weights(out)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert strip(read_metrics(str(out))) == strip(read_metrics(str(whole)))


# --- two processes: FSDP2 --------------------------------------------------------------------------------------


def torchrun(script, argv, kill=None, timeout=600):
    """`script` on 2 CPU processes (gloo) through tests/dist_worker.py; returns the finished run's return code and
    output. kill: a checkpoint folder name whose rename into place SIGKILLs rank 0."""
    output_dir = argv[argv.index("--output_dir") + 1]
    env = torchrun_env(os.path.dirname(os.path.abspath(output_dir)))
    if kill:
        env["DIST_WORKER_KILL"] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "dist_worker.py"), script, *argv]
    run = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    return run.returncode, run.stdout[-2000:] + run.stderr[-4000:]


def rank_weights(out):
    w0, w1 = (torch.load(os.path.join(out, f"lora_rank{r}.pt")) for r in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)  # every rank holds the same
    for r in (0, 1):
        with open(os.path.join(out, f"sharding_rank{r}.json")) as f:
            sharding = json.load(f)
        # FSDP's layout: each rank holds half of every weight, and a block's weights are gathered at each call
        assert sharding["parameter_type"] == "DTensor" and sharding["fsdp_modules"] > 1, sharding
        assert abs(sharding["local_fraction"] - 0.5) < 0.01, sharding
        assert sharding["all_gathers"] >= sharding["calls"] * (sharding["fsdp_modules"] - 1) > 0, sharding
    return w0


# Flags under which the two processes' own work differs, or the calls are many: DRTune's early stop, ReFL's stop
# step and AlignProp's truncation drawn at random (shared_generator), SPO's pairs kept by a threshold near the tiny
# reward's gaps (each process keeps its own number), GRPO without KL (a flat group is not trained on) in
# micro-batches of one row over two updates; online DPO's moving reference, sharded beside the policy
UNEVEN = {"drtune": dict(num_trained_steps=1, early_stop_max=3),
          "refl": dict(stop_range=2, num_inference_steps=3),
          "draft": dict(draft_variant="lv", lv_n=1, num_inference_steps=3),
          "alignprop": dict(truncation_min=1, truncation_max=3, num_inference_steps=3),
          "dpo-online": dict(FLAGS["dpo-online"][1], pair_margin=0.0, steps_per_round=2),
          "spo": dict(FLAGS["spo"][1], pair_batch_size=1, train_batch_size=1, pair_threshold=0.002),
          "grpo": dict(group_size=2, beta=0.0, train_micro_batch=1, updates_per_round=2, train_batch_size=1),
          # bf16 (FSDP gathers the weights in bf16, reduces gradients in fp32) with checkpointing, a bf16 reference
          "dpo-online-bf16": dict(FLAGS["dpo-online"][1], mixed_precision="bf16", gradient_checkpointing=True),
          # the transformers: SD3.5's and FLUX's blocks sharded, the call recomputed block by block
          "drtune-sd35": dict(num_trained_steps=1, early_stop_max=3, gradient_checkpointing=True,
                              checkpointing_granularity="both"),
          "grpo-flux": dict(group_size=2, beta=0.01, train_micro_batch=1, updates_per_round=2, train_batch_size=1)}
MODELS = {"drtune-sd35": TINY_SD3, "grpo-flux": TINY_FLUX}  # the others: TINY_SD


@pytest.mark.parametrize("script", UNEVEN)
def test_every_script_runs_sharded_on_two_processes(script, tmp_path):
    """FSDP2 per-call gathering on 2 processes (gloo) where each process's own work differs (UNEVEN): the run
    ends (no process waits for a collective the other never makes), each rank holds half of every weight and
    gathers each block at every call, both ranks end with the same trained weights, different from the base, and
    the model folder holds them; DPO's moving reference goes into its checkpoint."""
    flags, model = dict(UNEVEN[script], max_train_steps=2, checkpointing_steps=2), MODELS.get(script, TINY_SD)
    out, folder = tmp_path / "run", "unet" if model == TINY_SD else "transformer"
    code, output = torchrun(script.split("-")[0], full_argv(model, out, flags), timeout=300)
    assert code == 0, output
    trained = rank_weights(str(out))
    base = load_file(os.path.join(model, folder, "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k].float(), trained[k]) for k in base), "training changed nothing"
    saved = load_file(str(out / folder / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[k], trained[k]) for k in trained)  # (SD3's saved positional table is a buffer)
    assert [r["step"] for r in read_metrics(str(out))] == [0, 1, 2]
    assert (out / "samples" / "before_after.png").exists()
    if script in ("spo", "grpo"):  # the uneven work was there: micro-batches of weight 0 kept the calls in step
        assert sum(r["padded_micro_batches"] for r in read_metrics(str(out))[1:]) > 0
    if script.startswith("dpo-online"):
        reference = load_file(str(out / "checkpoint-2" / "reference_model.safetensors"))
        assert reference.keys() == base.keys()
        moved = [k for k in base if not torch.equal(base[k].to(reference[k].dtype), reference[k])]
        assert moved  # toward the policy


def test_the_sharded_evaluation_grid_is_the_one_process_grid(tmp_path):
    """2 processes draw 2 + 1 of 3 evaluation images (the last row repeated on the second), each with the noise it
    gets in one batch (DDPM: fresh noise at every step): the step-0 grid is one process's generate() of the base
    model, to float rounding of the other batch sizes."""
    from PIL import Image
    flags = dict(UNEVEN["drtune"], max_train_steps=1, num_eval_prompts=3, sampler="ddpm")
    out = tmp_path / "run"
    code, output = torchrun("drtune", full_argv(TINY_SD, out, flags), timeout=300)
    assert code == 0, output
    args = drtune.parse_args(full_argv(TINY_SD, tmp_path / "one", flags))
    models = drtune.load_models(args, drtune.check_arguments(args), torch.device("cpu"), torch.float32)
    assert len(args.eval_prompt_list) == 3
    images = drtune.generate(models, drtune.make_scheduler(args), models.unet, args.eval_prompt_list, args, args.seed)
    expected = (torch.cat(list(images), dim=2).permute(1, 2, 0).numpy() * 255).round()
    grid = np.asarray(Image.open(out / "samples" / "step-000000.png").convert("RGB")).astype(np.float64)
    assert grid.shape == expected.shape
    assert np.abs(grid - expected).max() <= 1, np.abs(grid - expected).max()


def test_two_processes_make_the_update_of_one(tmp_path, monkeypatch):
    """grpo.py (its KL on: the frozen base copy beside the sharded policy): 2 processes x 1 prompt per round sample the
    images of 1 process x 2 prompts (test_grpo's LoRA test), so the sharded run's weights after 2 rounds of 2 updates
    are the single process's within float tolerance; the saved model folder holds them."""
    # Adam's epsilon at 1 (test_grpo's): its step is about lr x the momentum, float noise near a zero gradient is not
    # blown up to a step of lr
    flags = dict(FLAGS["grpo"][1], max_train_steps=2, updates_per_round=2, clip_range=0.2, sampler="ddim", eta=1.0,
                 adam_epsilon=1.0, learning_rate=1.0)
    captured = capture(monkeypatch, grpo)
    grpo.main(grpo.parse_args(full_argv(TINY_SD, tmp_path / "one", dict(flags, train_batch_size=2))))
    single = {k: v.detach() for k, v in captured["unet"].named_parameters()}
    code, output = torchrun("grpo", full_argv(TINY_SD, tmp_path / "two", dict(flags, train_batch_size=1)))
    assert code == 0, output
    sharded = rank_weights(str(tmp_path / "two"))
    assert sharded.keys() == single.keys()
    base = load_file(os.path.join(TINY_SD, "unet", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k], single[k]) for k in single), "training changed nothing"
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], atol=1e-6, rtol=1e-4)  # the forwards see other batch sizes
    moved = [(sharded[k] - base[k]).abs().max() for k in single]
    assert max(moved) > 5e-5  # 50x the tolerance
    saved = weights(tmp_path / "two")
    assert all(torch.equal(saved[k], sharded[k]) for k in saved)


def test_two_processes_resume_bit_identically_after_a_kill_during_a_sharded_checkpoint(tmp_path):
    """drtune.py on 2 processes with gradient checkpointing: a run of 4 steps; another killed (rank 0 SIGKILLed as it
    renames checkpoint-4 into place, the other rank stopped by torchrun) leaves checkpoint-2 the latest complete one
    and checkpoint-4.tmp ignored (then deleted); resumed on 2 processes it ends with the uninterrupted run's weights, bit for bit."""
    flags = dict(FLAGS["drtune"][1], checkpointing_steps=2, max_train_steps=4, gradient_checkpointing=True)
    whole, out = tmp_path / "whole", tmp_path / "killed"
    code, output = torchrun("drtune", full_argv(TINY_SD, whole, flags))
    assert code == 0, output
    code, output = torchrun("drtune", full_argv(TINY_SD, out, flags), kill="checkpoint-4")
    assert code != 0
    assert list(drtune.complete_checkpoints(str(out))) == [2] and not (out / "checkpoint-4").exists()
    assert (out / "checkpoint-4.tmp").exists()  # written whole but never renamed into place: not a checkpoint
    code, output = torchrun("drtune", full_argv(TINY_SD, out, flags, resume_from_checkpoint="latest"))
    assert code == 0, output
    assert not (out / "checkpoint-4.tmp").exists()
    expected, resumed = rank_weights(str(whole)), rank_weights(str(out))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert strip(read_metrics(str(out))) == strip(read_metrics(str(whole)))
    with open(out / "config.json") as f:
        assert json.load(f)["num_processes"] == 2
