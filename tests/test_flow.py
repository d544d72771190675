"""Flow-matching families (SD3/SD3.5, FLUX) in the shared scaffold, checked against what we did not write: diffusers'
StableDiffusion3Pipeline / FluxPipeline images and FlowMatchEulerDiscreteScheduler, autograd, torch.distributions,
the score form of Flow-GRPO's SDE, and the pipelines' load_lora_weights; plus every script training on both tiny
pipelines and the bad inputs of these families."""
import json
import math
import os
import shutil

import pytest
import torch
from conftest import ROOT, TINY_FLUX, TINY_SD3, read_metrics, tiny_argv
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

import alignprop
import dpo
import draft
import drtune
import refl
import spo

CPU = torch.device("cpu")
PIPELINES = {TINY_SD3: StableDiffusion3Pipeline, TINY_FLUX: FluxPipeline}
FLOW = dict(resolution=32, max_sequence_length=16, num_inference_steps=4, guidance_scale=None)
DRTUNE = dict(num_trained_steps=2, early_stop_max=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[TINY_SD3, TINY_FLUX], ids=["sd35", "flux"])
def flow_model(request):
    return request.param


def setup(model, module=drtune, **flags):
    flags = dict(DRTUNE, **flags) if module is drtune else flags
    args = module.parse_args(tiny_argv(model, "unused", **dict(FLOW, **flags)))
    info = module.check_arguments(args)
    return args, module.load_models(args, info, CPU, torch.float32), module.make_scheduler(args)


def pipeline_images(model, args, prompts, seed, lora=None, **call):
    pipe = PIPELINES[model].from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    if model == TINY_FLUX:
        call.setdefault("guidance_scale", args.guidance_embedding)
    else:
        call.setdefault("guidance_scale", args.guidance_scale)
    return pipe(prompts, num_inference_steps=args.num_inference_steps, height=args.resolution, width=args.resolution,
                max_sequence_length=args.max_sequence_length, generator=torch.Generator().manual_seed(seed),
                output_type="pt", **call).images


# --- the sampler: exactly the pipelines' ---------------------------------------------------------------------

@pytest.mark.parametrize("guidance", ["default", "off"])
def test_sampling_reproduces_diffusers_pipeline(flow_model, guidance):
    """Our rollout and decode give the pipeline's images for the same seed: SD3 with its CFG (7, or none), FLUX.1-dev
    with its guidance embedding (3.5) and no CFG, or true CFG with the empty negative prompt."""
    flags = dict(guidance_scale=1.0) if guidance == "off" else {}
    if flow_model == TINY_FLUX and guidance == "off":
        flags = dict(true_cfg=True, guidance_scale=4.0)  # FLUX: the true-CFG option instead
    args, models, scheduler = setup(flow_model, **flags)
    drtune.add_lora(models.unet, args)  # peft's init: zero weight change
    prompts = ["a cat", "a red bicycle"]
    ours = drtune.generate(models, scheduler, models.unet, prompts, args, seed=3)
    call = {}
    if flow_model == TINY_FLUX and args.true_cfg:
        call = dict(true_cfg_scale=args.guidance_scale, negative_prompt="")
    elif flow_model == TINY_SD3:
        call = dict(guidance_scale=args.guidance_scale)
    expected = pipeline_images(flow_model, args, prompts, 3, **call)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_flux_mu_follows_the_resolution():
    """FLUX's sigmas: linspace(1, 1/n, n) shifted by mu of the image's token count, as FluxPipeline computes it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    sigmas = {}
    for resolution in (32, 64):
        args, _, scheduler = setup(TINY_FLUX, resolution=resolution)
        scheduler.set_timesteps(4)
        sigmas[resolution] = scheduler.sigmas
        reference = FlowMatchEulerDiscreteScheduler.from_pretrained(TINY_FLUX, subfolder="scheduler")
        tokens = (resolution // 4 // 2) ** 2
        reference.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15))
        torch.testing.assert_close(scheduler.sigmas, reference.sigmas)
    assert not torch.allclose(sigmas[32], sigmas[64])


@pytest.mark.parametrize("model", [TINY_SD3, TINY_FLUX])
def test_ode_step_matches_scheduler_step(model):
    """Our differentiable step (the scheduler's state untouched) against diffusers' FlowMatchEulerDiscreteScheduler.step
    over the pipeline's schedule, for one timestep and one per sample."""
    _, _, scheduler = setup(model)
    scheduler.set_timesteps(5)
    x, v = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    for t in scheduler.timesteps:
        expected = scheduler.step(v, t, x).prev_sample  # stateful: one call per step, in order
        torch.testing.assert_close(drtune.sampler_step(scheduler, v, t, x, None, 0.0), expected)
        per_sample = drtune.sampler_step(scheduler, v, t.repeat(2), x, None, 0.0)  # one timestep per sample
        torch.testing.assert_close(per_sample, expected)


def test_sde_step_is_flow_grpos_score_form_and_its_density_is_normals():
    """eta = a > 0: mean = x + (v + sigma_t^2 / (2 sigma) eps_hat) dt (the reverse SDE with the score -eps_hat / sigma
    of the linear path), std = sigma_t sqrt(-dt), sigma_t = a sqrt(sigma / (1 - sigma)); SPO's log-density is
    torch.distributions.Normal's, averaged over dimensions; a -> 0 gives the ODE step."""
    _, _, scheduler = setup(TINY_SD3)
    scheduler.set_timesteps(6)
    x, v = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    a = 0.7
    for i, t in enumerate(scheduler.timesteps):
        sigma, sigma_next = scheduler.sigmas[i].double(), scheduler.sigmas[i + 1].double()
        dt = sigma_next - sigma
        sigma_below_one = scheduler.sigmas[1].double() if sigma == 1 else sigma
        sigma_t = a * math.sqrt(sigma / (1 - sigma_below_one))
        eps_hat = x.double() + (1 - sigma) * v.double()
        expected_mean = x.double() + (v.double() + sigma_t ** 2 / (2 * sigma) * eps_hat) * dt
        mean, std = drtune.step_mean_std(scheduler, v, t, x, a)
        torch.testing.assert_close(mean.double(), expected_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(float(std), sigma_t * math.sqrt(-dt), atol=1e-6, rtol=1e-5)
        sample = mean + std * torch.randn_like(x)
        expected = torch.distributions.Normal(mean, std).log_prob(sample).flatten(1).mean(1)
        torch.testing.assert_close(spo.gaussian_log_density(sample, mean, std), expected, atol=1e-5, rtol=1e-5)
        ode = drtune.sampler_step(scheduler, v, t, x, None, 0.0)
        tiny_mean, tiny_std = drtune.step_mean_std(scheduler, v, t, x, 1e-6)
        torch.testing.assert_close(tiny_mean, ode, atol=1e-5, rtol=0)
        assert float(tiny_std) < 1e-5


def test_forward_process_and_x0_prediction_are_the_schedulers():
    """Training noise at a flow timestep is FlowMatchEulerDiscreteScheduler.scale_noise with target noise - x_0, and
    predict_x0_eps inverts it at a sampling step."""
    reference = FlowMatchEulerDiscreteScheduler.from_pretrained(TINY_SD3, subfolder="scheduler")
    latents, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    t = reference.timesteps[[0, 400, 999]]
    noisy, target = drtune.forward_process(reference, latents, noise, t)
    torch.testing.assert_close(noisy, reference.scale_noise(latents, t, noise))
    torch.testing.assert_close(target, noise - latents)
    _, _, scheduler = setup(TINY_SD3)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1]
    x_t, _ = drtune.forward_process(scheduler, latents, noise, t.repeat(3))
    x0, eps = drtune.predict_x0_eps(scheduler, noise - latents, t, x_t)
    torch.testing.assert_close(x0, latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps, noise, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", [TINY_SD3, TINY_FLUX])
def test_training_timesteps_are_the_sd3_examples_draw(model):
    """The diffusers SD3/FLUX examples: u ~ logit-normal(0, 1), index floor(u N), the training scheduler's timestep
    at that index."""
    _, _, scheduler = setup(model)
    scheduler.set_timesteps(4)  # a sampling scheduler: its training sigmas come from the config
    ours = drtune.draw_timesteps(scheduler, 64, torch.Generator().manual_seed(1))
    u = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    reference = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    torch.testing.assert_close(ours, reference.timesteps[(u * 1000).long()])


# --- DRTune's identity on the flow path --------------------------------------------------------------------

def test_stop_gradient_jacobian_is_the_identity_both_directions(flow_model):
    """With every transformer input detached, x_{i+1} = x_i + (s_{i+1} - s_i) v(sg(x_i)): d x_0 / d x_T = I (eq. 4-5's
    product of a_s is 1), in the adjoint and the forward form, also from the early-stopped x_0 = x_t - sigma v."""
    args, models, scheduler = setup(flow_model)
    drtune.add_lora(models.unet, args)
    cond = drtune.encode_prompts(models, ["a cat"], args.resolution)
    steps = set(range(args.num_inference_steps))

    def chain(stop_grad_input, stop_index=None):
        return lambda x: drtune.rollout(models.unet, scheduler, cond, x, torch.Generator().manual_seed(0), args,
                                        grad_steps=steps, stop_index=stop_index, stop_grad_input=stop_grad_input)
    x_T, w = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    for stop_index in (None, 2):
        _, vjp = torch.autograd.functional.vjp(chain(True, stop_index), x_T, w)
        _, jvp = torch.autograd.functional.jvp(chain(True, stop_index), x_T, w)
        torch.testing.assert_close(vjp, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(jvp, w, atol=1e-5, rtol=1e-5)
    _, vjp_full = torch.autograd.functional.vjp(chain(False), x_T, w)
    assert (vjp_full - w).abs().max() > 1e-4  # without stop-gradient the transformer's Jacobian enters


# --- Diffusion-DPO's flow loss by hand -----------------------------------------------------------------------

def test_flow_dpo_loss_by_hand():
    """dpo.algorithm_loss on SD3 against the loss written out with the pipeline's own prompt encoding and the bare
    transformer: same noise and sigma for winner and loser, sigma logit-normal, target noise - x_0, velocity errors
    averaged per element, -log sigmoid(-beta/2 ((L_w - L_l) - (Lref_w - Lref_l)))."""
    args, models, scheduler = setup(TINY_SD3, dpo, online=True, reward="symmetry", beta_dpo=500.0)
    dpo.add_lora(models.unet, args)
    with torch.no_grad():  # a non-zero LoRA, so that the policy and the reference differ
        for name, p in models.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    latents = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(5))  # 2 winners, then 2 losers
    prompts = ["a cat", "a dog"]
    loss, metrics = dpo.algorithm_loss(models, scheduler, models.unet, latents, prompts, None,
                                       torch.Generator().manual_seed(7), args)

    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 16, 8, 8, generator=generator).repeat(2, 1, 1, 1)
    u = torch.sigmoid(torch.randn(2, generator=generator))
    sigma = FlowMatchEulerDiscreteScheduler.from_pretrained(TINY_SD3, subfolder="scheduler").sigmas[(u * 1000).long()]
    sigma = sigma.repeat(2).view(-1, 1, 1, 1)
    pipe = StableDiffusion3Pipeline.from_pretrained(TINY_SD3, transformer=models.unet)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                              max_sequence_length=args.max_sequence_length)
    noisy = (1 - sigma) * latents + sigma * noise
    target = noise - latents

    def errors():
        with torch.no_grad():
            v = models.unet(noisy, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds.repeat(2, 1, 1),
                            pooled_projections=pooled.repeat(2, 1)).sample
        return (v - target).square().mean((1, 2, 3))
    model_error = errors()
    models.unet.disable_adapters()
    ref_error = errors()
    models.unet.enable_adapters()
    logits = -0.5 * args.beta_dpo * ((model_error[:2] - model_error[2:]) - (ref_error[:2] - ref_error[2:]))
    torch.testing.assert_close(loss.detach(), -torch.nn.functional.logsigmoid(logits).mean(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(metrics["model_error_w"], model_error[:2].mean(), atol=1e-6, rtol=1e-5)


# --- every script trains on both families; the LoRA loads in the pipelines ---------------------------------

SCRIPTS = {
    "drtune": (drtune, dict(num_trained_steps=2, early_stop_max=2)),
    "drtune-checkpointed": (drtune, dict(num_trained_steps=2, early_stop_max=2, gradient_checkpointing=True,
                                         checkpointing_granularity="both")),
    "refl": (refl, dict(stop_range=2)),
    "draft-k": (draft, dict(draft_variant="k", draft_k=2)),
    "draft-lv": (draft, dict(draft_variant="lv")),
    "alignprop": (alignprop, {}),
    "dpo-online": (dpo, dict(online=True, images_per_prompt=2, prompts_per_round=2, steps_per_round=2)),
    "spo": (spo, dict(eta=0.7, num_candidates=2, warm_steps=1, pair_threshold=0.0)),
}


@pytest.mark.parametrize("script", [*SCRIPTS, "dpo-offline"])
def test_every_script_trains_on_flow_models(flow_model, script, tmp_path):
    if script == "dpo-offline":  # Pick-a-Pic-format pairs in a local parquet file
        from benchmarks.common import pairs_parquet
        pairs_parquet(str(tmp_path / "pairs.parquet"), 4, 32)
        module, flags = dpo, dict(dataset_name=str(tmp_path / "pairs.parquet"))
    else:
        module, flags = SCRIPTS[script]
    out = str(tmp_path / "run")
    argv = tiny_argv(flow_model, out, **dict(FLOW, learning_rate=0.05, max_train_steps=2, **flags))
    module.main(module.parse_args(argv))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["grad_norm"] > 0 for r in rows[1:]), rows
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["sampler"] == "euler"


def test_trained_lora_loads_in_the_pipeline_and_gives_our_images(flow_model, tmp_path):
    """drtune.py's LoRA, loaded with the family's pipeline.load_lora_weights, gives the images of our own sampler
    with the trained LoRA (alpha kept), and differs from the base."""
    out = str(tmp_path / "run")
    argv = tiny_argv(flow_model, out, **dict(FLOW, learning_rate=0.2, max_train_steps=2, num_trained_steps=2,
                                             early_stop_max=2, rank=4))
    args = drtune.parse_args(argv)
    drtune.main(args)
    args, models, scheduler = setup(flow_model, rank=4)
    drtune.add_lora(models.unet, args)
    drtune.load_lora(models.unet, models.family, out)
    ours = drtune.generate(models, scheduler, models.unet, ["a cat"], args, seed=1)
    expected = pipeline_images(flow_model, args, ["a cat"], 1, lora=out)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    base = pipeline_images(flow_model, args, ["a cat"], 1)
    assert (expected - base).abs().max() > 1e-3


# --- bad input: one line, before a large model loads ----------------------------------------------------

def flux_without_guidance_embedding(tmp_path):
    """A FLUX.1-schnell-like config: no guidance embedding (the checks read configs only)."""
    path = tmp_path / "schnell"
    shutil.copytree(TINY_FLUX, path)
    config_file = path / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, guidance_embeds=False)))
    return str(path)


@pytest.mark.parametrize("model,overrides,message", [
    (TINY_SD3, dict(sampler="ddim"), "--sampler ddim does not exist for SD3 models: use euler"),
    (TINY_FLUX, dict(sampler="dpmpp"), "--sampler dpmpp does not exist for FLUX"),
    (TINY_FLUX, dict(guidance_scale=5.0), "FLUX is guidance-distilled.*--true_cfg"),
    (TINY_SD3, dict(true_cfg=True), "--true_cfg is FLUX's"),
    (TINY_FLUX, dict(true_cfg=True), "--true_cfg needs a --guidance_scale above 1"),
    (TINY_SD3, dict(guidance_embedding=3.5), "no guidance embedding"),
    ("schnell", dict(guidance_embedding=3.5), "no guidance embedding"),
    (TINY_FLUX, dict(resolution=36), "not divisible by the VAE factor 4 x the FLUX patch size 2"),
    (TINY_SD3, dict(resolution=36), "not divisible by the VAE factor 4 x the SD3 patch size 2"),
    (TINY_SD3, dict(resolution=256), "too large for this SD3 transformer"),
    (TINY_SD3, dict(lora_target_modules="to_q,to_qkv"), "no module named to_qkv"),
    (TINY_FLUX, dict(eta=0.0), "SPO trains on the Gaussian density"),
])
def test_bad_flow_input_is_one_clear_error(model, overrides, message, tmp_path):
    model = flux_without_guidance_embedding(tmp_path) if model == "schnell" else model
    module = spo if "eta" in overrides else drtune
    flags = dict(FLOW, **overrides) if module is spo else dict(FLOW, **DRTUNE, **overrides)
    args = module.parse_args(tiny_argv(model, str(tmp_path / "out"), **flags))
    with pytest.raises(module.UsageError, match=message):
        module.check_arguments(args)


def test_schnell_runs_without_guidance_and_true_cfg_works(tmp_path):
    """A FLUX without a guidance embedding samples with none (no flag needed) and takes --true_cfg."""
    model = flux_without_guidance_embedding(tmp_path)
    args = drtune.parse_args(tiny_argv(model, str(tmp_path / "out"), **FLOW, **DRTUNE))
    drtune.check_arguments(args)
    assert args.guidance_embedding is None and args.guidance_scale == 1.0
    args = drtune.parse_args(tiny_argv(model, str(tmp_path / "out"), **dict(FLOW, true_cfg=True, guidance_scale=3.0),
                                       **DRTUNE))
    drtune.check_arguments(args)
    assert args.guidance_scale == 3.0


@pytest.mark.parametrize("script", ["drtune", "spo"])
def test_resume_continues_identically_on_flux(script, tmp_path):
    """Checkpoints and resume keep their rules on a flow family: a run stopped at step 2 and resumed from
    checkpoint-2 ends with the LoRA and the metrics of a run never interrupted."""
    from safetensors.torch import load_file
    module, flags = SCRIPTS[script]
    common = dict(FLOW, learning_rate=0.05, max_train_steps=4, checkpointing_steps=2, **flags)

    def timeless(rows):  # the cut run also evaluated at its last step, 2
        return [{k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb") and
                 (k != "eval_reward" or r["step"] != 2)} for r in rows]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    module.main(module.parse_args(tiny_argv(TINY_FLUX, full, **common)))
    module.main(module.parse_args(tiny_argv(TINY_FLUX, cut, **dict(common, max_train_steps=2))))
    assert os.path.isdir(os.path.join(cut, "checkpoint-2"))
    module.main(module.parse_args(tiny_argv(TINY_FLUX, cut, resume_from_checkpoint="latest", **common)))
    assert timeless(read_metrics(cut)) == timeless(read_metrics(full))
    lora = [load_file(os.path.join(d, "pytorch_lora_weights.safetensors")) for d in (full, cut)]
    for key in lora[0]:
        torch.testing.assert_close(lora[1][key], lora[0][key], atol=0, rtol=0)
