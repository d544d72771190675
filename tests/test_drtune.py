"""DRTune and the scaffold, checked against diffusers (scheduler.step, pipelines), autograd and Alg. 1."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT, TINY_SD, TINY_SDXL, lora_effect, read_metrics, run_cli, tiny_argv, two_process_loras
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

import drtune

CPU = torch.device("cpu")
DRTUNE = dict(num_trained_steps=2, early_stop_max=2)  # small enough for 4 sampling steps


def setup(model, **overrides):
    args = drtune.parse_args(tiny_argv(model, "unused", **dict(DRTUNE, **overrides)))
    info = drtune.check_arguments(args)
    return args, drtune.load_models(args, info, CPU, torch.float32), drtune.make_scheduler(args)


# --- the sampler ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,eta,prediction_type", [("ddpm", 0.0, "epsilon"), ("ddim", 0.0, "epsilon"),
                                                          ("ddim", 1.0, "epsilon"), ("ddim", 0.5, "v_prediction"),
                                                          ("ddpm", 0.0, "v_prediction")])
def test_sampler_step_matches_scheduler_step(sampler, eta, prediction_type):
    args = drtune.parse_args(tiny_argv(TINY_SD, "unused", sampler=sampler, eta=eta, num_inference_steps=25))
    ours = drtune.make_scheduler(args)
    ours.register_to_config(prediction_type=prediction_type)
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    # the reference: the SD1.5 scheduler config turned into diffusers' scheduler with its defaults spelled out
    reference = cls.from_pretrained(TINY_SD, subfolder="scheduler", clip_sample=False, prediction_type=prediction_type)
    for s in (ours, reference):
        s.set_timesteps(25)
    assert torch.equal(ours.timesteps, reference.timesteps)
    x, model_output = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8)
    for t in reference.timesteps:
        kwargs = dict(eta=eta) if sampler == "ddim" else {}
        expected = reference.step(model_output, t, x, generator=torch.Generator().manual_seed(int(t)), **kwargs)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        got = drtune.sampler_step(ours, model_output, t, x, noise, eta)
        torch.testing.assert_close(got, expected.prev_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler,eta,prediction_type", [("ddpm", 0.0, "epsilon"), ("ddim", 0.7, "epsilon"),
                                                          ("ddim", 1.0, "v_prediction")])
def test_per_sample_timesteps_match_scheduler_step_row_by_row(sampler, eta, prediction_type):
    """sampler_step and predict_x0_eps take one timestep per sample (DPO, SPO): row i equals diffusers'
    scheduler.step at t_i, the last step's conventions included."""
    args = drtune.parse_args(tiny_argv(TINY_SD, "unused", sampler=sampler, eta=eta, num_inference_steps=25))
    ours = drtune.make_scheduler(args)
    ours.register_to_config(prediction_type=prediction_type)
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    reference = cls.from_pretrained(TINY_SD, subfolder="scheduler", clip_sample=False, prediction_type=prediction_type)
    for s in (ours, reference):
        s.set_timesteps(25)
    t = reference.timesteps[[0, 24, 7, 24, 13]]  # the last step twice
    x, model_output = torch.randn(5, 4, 8, 8) * 3, torch.randn(5, 4, 8, 8)
    noise = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)])
    got = drtune.sampler_step(ours, model_output, t, x, noise, eta)
    x0 = drtune.predict_x0_eps(ours, model_output, t, x)[0]
    for i, t_i in enumerate(t):
        kwargs = dict(eta=eta) if sampler == "ddim" else {}
        expected = reference.step(model_output[i:i + 1], t_i, x[i:i + 1], generator=torch.Generator().manual_seed(i),
                                  **kwargs)
        torch.testing.assert_close(got[i:i + 1], expected.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x0[i:i + 1], expected.pred_original_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(drtune.sampler_step(ours, model_output[i:i + 1], int(t_i), x[i:i + 1],
                                                       noise[i:i + 1], eta), got[i:i + 1])  # scalar t as before


def rows_of(cond, rows):
    """The rows of a conditioning dict (tensors and SDXL's added_cond_kwargs)."""
    return {k: v[rows] if torch.is_tensor(v) else {n: x[rows] for n, x in v.items()} for k, v in cond.items()}


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_predict_noise_takes_one_timestep_per_sample(tiny_model, guidance):
    args, models, _ = setup(tiny_model)
    cond = drtune.encode_prompts(models, ["a cat", "a red bicycle"], args.resolution)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([901, 341])
    got = drtune.predict_noise(models.unet, x, t, cond, guidance)
    for i in range(2):
        expected = drtune.predict_noise(models.unet, x[i:i + 1], t[i], rows_of(cond, [i, 2 + i]), guidance)
        torch.testing.assert_close(got[i:i + 1], expected, atol=1e-5, rtol=1e-5)


# --- prompt encoding ---------------------------------------------------------------------------------

def encoder_rows(models):
    """Rows each text encoder call receives, in call order."""
    rows = []
    for encoder in models.text_encoders:
        encoder.register_forward_pre_hook(lambda module, inputs: rows.append(len(inputs[0])))
    return rows


def test_prompts_encoded_once_per_batch_and_the_negative_once_per_run(tiny_model):
    args, models, _ = setup(tiny_model)
    rows = encoder_rows(models)
    prompts = ["a cat", "a red bicycle", "a cat"]
    cond = drtune.encode_prompts(models, prompts, args.resolution)
    again = drtune.encode_prompts(models, prompts, args.resolution)
    n = len(models.text_encoders)
    if tiny_model == TINY_SD:  # two distinct prompts, then the negative "" once for the run
        assert rows == [2, 1, 2]
    else:  # SDXL's negatives are zeros (force_zeros_for_empty_prompt): no negative is encoded
        assert rows == [2] * n * 2
    assert cond["encoder_hidden_states"].shape[0] == 6
    torch.testing.assert_close(cond, again)
    torch.testing.assert_close(rows_of(cond, [3]), rows_of(cond, [5]))  # a repeated prompt, the same row


def test_cached_prompt_embeds_equal_encoding_without_text_encoders(tiny_model):
    args, models, _ = setup(tiny_model)
    prompts = ["a cat", "a red bicycle"]
    expected = drtune.encode_prompts(models, prompts, args.resolution)
    models.prompt_cache.clear()
    size = drtune.cache_prompt_embeds(models, prompts + ["a dog", "a cat"])
    assert set(models.prompt_cache) == {"", "a cat", "a red bicycle", "a dog"} and size > 0
    rows = encoder_rows(models)
    torch.testing.assert_close(drtune.encode_prompts(models, prompts, args.resolution), expected)
    assert rows == []  # the text encoders are not run again


@pytest.mark.parametrize("sampler,eta,guidance", [("ddpm", 0.0, 5.0), ("ddim", 0.0, 5.0), ("ddim", 1.0, 5.0),
                                                  ("dpmpp", 0.0, 5.0), ("ddim", 0.0, 1.0)])
def test_sampling_reproduces_diffusers_pipeline(tiny_model, sampler, eta, guidance):
    """With a zero LoRA (peft's init), the script's sampling gives the pipeline's images for the same seed."""
    args, models, scheduler = setup(tiny_model, sampler=sampler, eta=eta, num_inference_steps=6, guidance_scale=guidance)
    drtune.add_lora(models.unet, args)
    prompts = ["a cat", "a red bicycle"]
    ours = drtune.generate(models, scheduler, models.unet, prompts, args, seed=3)
    cls = StableDiffusionXLPipeline if tiny_model == TINY_SDXL else StableDiffusionPipeline
    pipe = cls.from_pretrained(tiny_model, scheduler=drtune.make_scheduler(args))
    expected = pipe(prompts, num_inference_steps=6, guidance_scale=guidance, height=32, width=32, eta=eta,
                    generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_vae_kept_in_fp32_is_not_autocast_to_half():
    """SDXL's VAE stays fp32 under fp16 training because it overflows in half precision: autocast must not undo it."""
    _, models, _ = setup(TINY_SDXL)
    latents = torch.randn(1, 4, 8, 8)
    expected = drtune.decode(models.vae, latents)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(drtune.decode(models.vae, latents), expected)


@pytest.mark.parametrize("model,dtype", [(TINY_SD, torch.bfloat16), (TINY_SDXL, torch.float16)])
def test_first_param_has_the_device_and_dtype_diffusers_reports(model, dtype):
    """first_param stands for diffusers' .device and .dtype (which walk every module at each access): the same for
    the UNet with its fp32 LoRA and for a VAE kept in fp32 (SDXL's under fp16) or in the weight dtype."""
    args = drtune.parse_args(tiny_argv(model, "unused", **DRTUNE))
    models = drtune.load_models(args, drtune.check_arguments(args), CPU, dtype)
    drtune.add_lora(models.unet, args)
    for module in (models.unet, models.vae):
        weight = drtune.first_param(module)
        assert (weight.device, weight.dtype) == (module.device, module.dtype)
    assert models.vae.dtype == (torch.float32 if model == TINY_SDXL else dtype)


# --- gradient identities (eq. 4-5) -------------------------------------------------------------------

def chain(models, scheduler, args, stop_grad_input):
    """x_T -> final latents with every UNet call under gradient."""
    cond = drtune.encode_prompts(models, ["a cat"], args.resolution)
    steps = set(range(args.num_inference_steps))
    return lambda x: drtune.rollout(models.unet, scheduler, cond, x, torch.Generator().manual_seed(0), args,
                                    grad_steps=steps, stop_grad_input=stop_grad_input)


def prod_a(scheduler, args):
    """prod_s a_s with a_s = sqrt(abar_{s-1} / abar_s) of DDIM (SPEC), from the scheduler's alphas_cumprod."""
    scheduler.set_timesteps(args.num_inference_steps)
    abar, out = scheduler.alphas_cumprod.double(), torch.tensor(1.0, dtype=torch.float64)
    for t in scheduler.timesteps:
        prev = int(t) - 1000 // args.num_inference_steps
        out = out * (scheduler.final_alpha_cumprod.double() if prev < 0 else abar[prev]).sqrt() / abar[t].sqrt()
    return out.float()


def test_stop_gradient_jacobian_is_prod_a_both_directions():
    args, models, scheduler = setup(TINY_SD, sampler="ddim", num_inference_steps=5)
    drtune.add_lora(models.unet, args)
    f = chain(models, scheduler, args, stop_grad_input=True)
    x_T = torch.randn(1, 4, 8, 8)
    v = torch.randn_like(x_T)
    scale = prod_a(scheduler, args)
    _, vjp = torch.autograd.functional.vjp(f, x_T, v)  # adjoint: grad at x_T = prod a_s * grad at x_0
    _, jvp = torch.autograd.functional.jvp(f, x_T, v)  # eq. 5 read forward: dx_0 = prod a_s dx_T
    torch.testing.assert_close(vjp, scale * v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(jvp, scale * v, atol=1e-4, rtol=1e-4)
    f_full = chain(models, scheduler, args, stop_grad_input=False)
    _, vjp_full = torch.autograd.functional.vjp(f_full, x_T, v)
    assert (vjp_full - scale * v).abs().max() > 1e-3  # without stop-gradient the UNet's Jacobian enters


def test_stop_gradient_dpmpp_jacobian_is_a_scalar():
    """DPM-Solver++ is multistep: no one-step a_t, yet with detached UNet inputs d x_0 / d x_T is c * I."""
    args, models, scheduler = setup(TINY_SD, sampler="dpmpp", num_inference_steps=5)
    f = chain(models, scheduler, args, stop_grad_input=True)
    x_T = torch.randn(1, 4, 8, 8)
    v1, v2 = torch.randn_like(x_T), torch.randn_like(x_T)
    g1, g2 = (torch.autograd.functional.vjp(f, x_T, v)[1] for v in (v1, v2))
    c = (g1 / v1).median()
    torch.testing.assert_close(g1, c * v1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g2, c * v2, atol=1e-4, rtol=1e-4)


# --- gradient checkpointing -------------------------------------------------------------------------

@pytest.mark.parametrize("granularity,stop_grad_input", [("call", False), ("call", True), ("block", False),
                                                         ("both", False)])
def test_checkpointing_gives_the_gradients_of_plain_autograd(granularity, stop_grad_input):
    """Backprop through every step of the chain and the decode (DRaFT-T, AlignProp; DRTune with stop-gradient):
    with --gradient_checkpointing the LoRA gradients and the gradient at x_T equal plain autograd's."""
    def gradients(checkpointing):
        args, models, scheduler = setup(TINY_SD, sampler="ddpm", num_inference_steps=4)  # DDPM: noise at every step
        params = drtune.add_lora(models.unet, args)
        generator = torch.Generator().manual_seed(0)
        for p in params:  # a LoRA away from its zero init, so that every LoRA weight has a gradient
            p.data = torch.randn(p.shape, generator=generator) * 0.1
        calls = Counter()
        models.unet.register_forward_pre_hook(lambda m, a: calls.update(["unet"]))
        models.vae.decoder.register_forward_pre_hook(lambda m, a: calls.update(["decode"]))
        if checkpointing:
            drtune.enable_checkpointing(models.unet, models.vae, granularity)
        cond = drtune.encode_prompts(models, ["a cat", "a red bicycle"], args.resolution)
        x_T = torch.randn(2, 4, 4, 4, generator=generator, requires_grad=True)
        x0 = drtune.rollout(models.unet, scheduler, cond, x_T, torch.Generator().manual_seed(1), args,
                            grad_steps=set(range(4)), stop_grad_input=stop_grad_input)
        reward = drtune.rewards.build_reward("symmetry")(drtune.decode(models.vae, x0), ["a cat", "a red bicycle"])
        reward.mean().backward()
        return [p.grad for p in params] + [x_T.grad], calls

    expected, plain_calls = gradients(False)
    got, calls = gradients(True)
    assert all(g.abs().sum() > 0 for g in expected)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    recomputed = 2 if granularity in ("call", "both") else 1  # a call checkpoint reruns the call in the backward
    assert plain_calls == Counter(unet=4, decode=1) and calls == Counter(unet=4 * recomputed, decode=recomputed)


def test_checkpointed_call_with_adapters_disabled_is_refused_and_runs_under_no_grad():
    """The reentrant call checkpoint cannot check its recomputation, so a call with the LoRA adapters disabled and
    gradient on is refused in one line; under no_grad (every reference forward) nothing is checkpointed."""
    args, models, scheduler = setup(TINY_SD)
    drtune.add_lora(models.unet, args)
    drtune.enable_checkpointing(models.unet, models.vae, "call")
    cond = drtune.encode_prompts(models, ["a cat"], args.resolution)
    x = torch.randn(1, 4, 4, 4)
    models.unet.disable_adapters()
    with pytest.raises(RuntimeError, match="adapters disabled: run it under torch.no_grad"):
        drtune.predict_noise(models.unet, x, 10, cond, args.guidance_scale)
    with torch.no_grad():
        reference = drtune.predict_noise(models.unet, x, 10, cond, args.guidance_scale)
    models.unet.enable_adapters()
    assert drtune.predict_noise(models.unet, x, 10, cond, args.guidance_scale).requires_grad
    assert torch.isfinite(reference).all()


def test_optimizer_is_adamw_of_the_flags():
    """make_optimizer (fused on CPU and CUDA) against AdamW written out (Loshchilov & Hutter, Alg. 2 with torch's
    lr-scaled decay): three steps with the flags' lr, betas, weight decay and eps."""
    args = drtune.parse_args(tiny_argv(TINY_SD, "unused", learning_rate=0.01, adam_beta1=0.8, adam_beta2=0.9,
                                       adam_weight_decay=0.1, adam_epsilon=1e-3))
    p = torch.nn.Parameter(torch.randn(3, 5))
    optimizer = drtune.make_optimizer([p], args, CPU)
    x, m, v = p.detach().clone(), torch.zeros(3, 5), torch.zeros(3, 5)
    for t in range(1, 4):
        g = torch.randn(3, 5)
        p.grad = g.clone()
        optimizer.step()
        x = x * (1 - 0.01 * 0.1)
        m, v = 0.8 * m + 0.2 * g, 0.9 * v + 0.1 * g * g
        x = x - 0.01 * (m / (1 - 0.8 ** t)) / ((v / (1 - 0.9 ** t)).sqrt() + 1e-3)
        torch.testing.assert_close(p.detach(), x, rtol=1e-5, atol=1e-6)


# --- Alg. 1: which steps run and which train ---------------------------------------------------------

def test_exactly_k_equally_spaced_steps_train_and_none_below_t_min():
    args, models, scheduler = setup(TINY_SD, num_inference_steps=12, num_trained_steps=3, early_stop_max=5)
    drtune.add_lora(models.unet, args)
    reward_fn = drtune.rewards.build_reward("symmetry")
    calls = []
    models.unet.register_forward_pre_hook(lambda m, a: calls.append((int(a[1]), torch.is_grad_enabled())))
    seen_offsets = set()
    for seed in range(12):
        calls.clear()
        generator = torch.Generator().manual_seed(seed)
        loss, _, extra = drtune.algorithm_loss(models, scheduler, models.unet, reward_fn, ["a cat"], generator, args)
        timesteps = [int(t) for t in scheduler.timesteps]
        ran = [timesteps.index(t) for t, _ in calls]
        trained = [i for (t, grad), i in zip(calls, ran) if grad]
        t_min = extra["t_min"]
        assert 1 <= t_min <= 5
        assert ran == list(range(12 - t_min + 1))  # steps T..t_min run, none below t_min
        assert len(trained) == 3 and len(set(trained)) == 3
        assert trained[1] - trained[0] == trained[2] - trained[1] == (12 - t_min + 1) // 3
        seen_offsets.add(trained[0])
        models.unet.zero_grad()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.unet.parameters() if p.requires_grad)
    assert len(seen_offsets) > 1  # the offset is random


def test_schedule_covers_the_executed_range():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        steps, stop = drtune.drtune_schedule(50, 5, 20, g)
        assert len(steps) == 5 and max(steps) <= stop and min(steps) >= 0
    steps = {tuple(drtune.drtune_schedule(50, 5, 1, g)[0]) for _ in range(300)}
    # t_min = 1 and K | T: the paper's {s, s + 10, ..., s + 40} for every s in 1..10
    assert steps == {tuple(sorted(50 - (s + 10 * i) for i in range(5))) for s in range(1, 11)}


# --- short runs ------------------------------------------------------------------------------------

def run(tmp_path, name, **overrides):
    out = str(tmp_path / name)
    drtune.main(drtune.parse_args(tiny_argv(TINY_SD, out, **overrides)))
    rows = read_metrics(out)
    return out, [strip(r) for r in rows]


def strip(row):  # timings vary; the short run also evaluates at its last step
    return {k: v for k, v in row.items() if k not in ("seconds", "peak_memory_mb", "eval_reward")}


def test_same_seed_same_metrics_and_resume_continues_identically(tmp_path):
    common = dict(num_trained_steps=2, early_stop_max=2, max_train_steps=4, checkpointing_steps=2)
    _, full = run(tmp_path, "a", **common)
    _, again = run(tmp_path, "b", **common)
    assert full == again and len(full) == 5 and full[-1]["reward_mean"] != full[1]["reward_mean"]
    out, _ = run(tmp_path, "c", **dict(common, max_train_steps=2))
    assert os.path.isdir(os.path.join(out, "checkpoint-2")) and not os.path.exists(os.path.join(out, "checkpoint-2.tmp"))
    drtune.main(drtune.parse_args(tiny_argv(TINY_SD, out, resume_from_checkpoint="latest", **common)))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        resumed = [strip(json.loads(line)) for line in f]
    assert resumed == full


def test_nonfinite_updates_are_skipped_then_stop_with_checkpoint_intact(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    original, calls = drtune.algorithm_loss, []

    def poisoned(*args, **kwargs):  # steps 3 and later: NaN reward
        calls.append(1)
        loss, reward, extra = original(*args, **kwargs)
        return (loss * float("nan"), reward * float("nan"), extra) if len(calls) >= 3 else (loss, reward, extra)

    monkeypatch.setattr(drtune, "algorithm_loss", poisoned)
    out = str(tmp_path / "nan")
    args = drtune.parse_args(tiny_argv(TINY_SD, out, max_train_steps=8, checkpointing_steps=2, max_nonfinite_steps=2,
                                       **DRTUNE))
    with pytest.raises(RuntimeError, match="2 updates in a row"):
        drtune.main(args)
    rows = read_metrics(out)
    assert [r.get("skipped") for r in rows[1:]] == [False, False, True, True]
    assert list(drtune.complete_checkpoints(out)) == [2]
    lora = load_file(os.path.join(out, "checkpoint-2", "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in lora.values())


def test_two_processes_end_with_identical_lora(tmp_path):
    out = str(tmp_path / "dist")
    argv = tiny_argv(TINY_SD, out, num_trained_steps=2, early_stop_max=2, max_train_steps=3, lr_scheduler="linear",
                     lr_warmup_steps=2)
    w0, w1 = two_process_loras("drtune", argv)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    # the schedule advances once per step, not once per process (accelerate's prepared scheduler would step twice)
    from diffusers.optimization import get_scheduler
    args = drtune.parse_args(argv)
    reference = get_scheduler("linear", torch.optim.SGD([torch.zeros(1)], lr=args.learning_rate), num_warmup_steps=2,
                              num_training_steps=3)
    expected = []
    for _ in range(3):
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert [r["lr"] for r in read_metrics(out)[1:]] == pytest.approx(expected)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_processes"] == 2
    assert any("lora_B" in k and w0[k].abs().sum() > 0 for k in w0), "training changed nothing"


# --- the CLI ---------------------------------------------------------------------------------------

def test_bf16_mixed_precision_with_gradient_checkpointing_and_cached_prompts_trains(tmp_path):
    """Frozen weights in bf16, trainable LoRA weights in fp32, autocast around every forward (and around its
    recomputation in the backward); prompt embeddings computed once for the run."""
    from safetensors.torch import load_file
    out = str(tmp_path / "bf16")
    row = drtune.main(drtune.parse_args(tiny_argv(TINY_SDXL, out, mixed_precision="bf16", gradient_checkpointing=True,
                                                  cache_prompt_embeds=True, **DRTUNE)))
    assert row["grad_norm"] > 0 and not row["skipped"]
    assert {t.dtype for t in load_file(os.path.join(out, "pytorch_lora_weights.safetensors")).values()} == {torch.float32}


def test_cli_writes_outputs_and_lora_loads_in_diffusers(tiny_model, tmp_path):
    out = str(tmp_path / "run")
    argv = tiny_argv(tiny_model, out, max_train_steps=2, num_trained_steps=2, early_stop_max=2, learning_rate=0.05,
                     validation_steps=1, checkpointing_steps=1, checkpoints_total_limit=1)
    rows = run_cli("drtune.py", argv, tmp_path)
    for key in ("step", "loss", "reward_mean", "reward_std", "grad_norm", "lr", "seconds", "peak_memory_mb", "t_min"):
        assert key in rows[-1], key
    assert lora_effect(tiny_model, out) > 1e-3


# --- bad input: one line, before any large model loads --------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (dict(reward="nonsense"), "nonsense"),
    (dict(reward="symmetry,jpeg_size:0.1"), "jpeg_size is not differentiable"),
    (dict(num_trained_steps=9), "num_trained_steps"),
    (dict(early_stop_max=4, num_trained_steps=2), "early_stop_max"),
    (dict(resolution=30), "not divisible by the VAE factor 4"),
    pytest.param(dict(mixed_precision="fp16"), "needs a GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for CPU-only machines")),
    (dict(pretrained_model_name_or_path="/no/such/folder"), "does not exist"),
    (dict(reward="aesthetic", reward_options="aesthetic_mlp=/no/such/file.pth"), "aesthetic_mlp"),
])
def test_bad_input_is_one_clear_error(overrides, message, tmp_path):
    args = drtune.parse_args(tiny_argv(TINY_SD, str(tmp_path), **overrides))
    with pytest.raises(drtune.UsageError, match=message):
        drtune.check_arguments(args)


def test_empty_prompt_file_and_offline_hub_id(tmp_path, monkeypatch):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(drtune.UsageError, match="holds no prompts"):
        drtune.check_arguments(drtune.parse_args(tiny_argv(TINY_SD, str(tmp_path), train_prompts=str(empty))))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = drtune.parse_args(tiny_argv("someone/not-cached-model", str(tmp_path)))
    with pytest.raises(drtune.UsageError, match="someone/not-cached-model.*--pretrained_model_name_or_path"):
        drtune.check_arguments(args)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "drtune.py"),
                             *tiny_argv(TINY_SD, str(tmp_path), num_trained_steps=9)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("drtune.py: error: --num_trained_steps")
    assert result.stderr.strip().count("\n") == 0


def test_prompts_from_text_file_and_dataset_folder(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    assert drtune.read_prompts(str(tmp_path / "p.txt"), []) == ["a cat", "a dog"]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_text("caption,other\na red car,1\na blue boat,2\n")
    assert drtune.read_prompts(str(folder), []) == ["a red car", "a blue boat"]
