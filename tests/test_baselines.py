"""ReFL, DRaFT and AlignProp: which UNet calls run with gradient, whether gradients flow through the UNet inputs
(checked against autograd), the CLI on tiny SD1.5 and SDXL, and each script's own bad-input errors."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT, TINY_SD, TINY_SDXL, lora_effect, read_metrics, tiny_argv

import alignprop
import draft
import refl

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are too small for intra-op threads: on a busy 2-core machine a UNet call takes 8x longer with
    two threads than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(module, model=TINY_SD, **flags):
    args = module.parse_args(tiny_argv(model, "unused", **flags))
    info = module.check_arguments(args)
    models = module.load_models(args, info, CPU, torch.float32)
    module.add_lora(models.unet, args)
    return args, models, module.make_scheduler(args)


class UNetCalls:
    """Every UNet call: (step index, grad enabled, input requires grad, a copy of the input)."""

    def __init__(self, models, scheduler):
        self.calls, self.scheduler = [], scheduler
        models.unet.register_forward_pre_hook(self.hook)

    def hook(self, module, inputs):
        timesteps = [int(t) for t in self.scheduler.timesteps]
        x, t = inputs[0], int(inputs[1])
        self.calls.append((timesteps.index(t), torch.is_grad_enabled(), x.requires_grad, x.detach().clone()))

    def run(self, module, models, scheduler, args, seed, prompts=("a cat",)):
        self.calls.clear()
        reward_fn = module.rewards.build_reward(args.reward)
        generator = torch.Generator().manual_seed(seed)
        return module.algorithm_loss(models, scheduler, models.unet, reward_fn, list(prompts), generator, args)

    @property
    def steps(self):
        return [i for i, _, _, _ in self.calls]

    @property
    def trained(self):
        return [i for i, grad, _, _ in self.calls if grad]


def lora_grad_is_nonzero(models):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.unet.parameters() if p.requires_grad)


def input_gradient(module, monkeypatch, models, scheduler, args):
    """(d loss / d x_T, d loss / d x_0): x_T is made a leaf, x_0 is the latent the VAE decodes."""
    size = args.resolution // models.vae_scale_factor
    x_T = torch.randn(1, models.unet.config.in_channels, size, size, requires_grad=True)
    seen = {}
    decode = module.decode

    def decode_and_keep(vae, latents):
        latents.retain_grad()
        seen["x0"] = latents
        return decode(vae, latents)

    monkeypatch.setattr(module, "initial_latents", lambda *a: x_T)
    monkeypatch.setattr(module, "decode", decode_and_keep)
    loss, _, _ = UNetCalls(models, scheduler).run(module, models, scheduler, args, seed=0)
    loss.backward()
    return x_T.grad, seen["x0"].grad


def scalar_fit(a, b):
    """The c that best makes a = c * b, and the relative error of that fit."""
    c = (a / b).median()
    return c, ((a - c * b).abs().max() / a.abs().max()).item()


# --- ReFL ------------------------------------------------------------------------------------------

def test_refl_one_grad_call_at_the_stop_step_drawn_among_the_last_stop_range():
    args, models, scheduler = setup(refl, num_inference_steps=6, stop_range=3)
    unet = UNetCalls(models, scheduler)
    stops = set()
    for seed in range(10):
        loss, reward, extra = unet.run(refl, models, scheduler, args, seed)
        stop = extra["stop_index"]
        assert 3 <= stop <= 5 and extra["t_min"] == 6 - stop
        assert unet.steps == list(range(stop + 1))  # sampling ends at the stop step: no call after it
        assert unet.trained == [stop]  # exactly one call with gradient, at the stop step
        assert not any(requires_grad for _, _, requires_grad, _ in unet.calls)
        torch.testing.assert_close(loss, -reward.mean())
        stops.add(stop)
    assert stops == {3, 4, 5}
    models.unet.zero_grad()
    loss.backward()
    assert lora_grad_is_nonzero(models)


def test_refl_relu_loss_is_the_official_one():
    args, models, scheduler = setup(refl, stop_range=2, loss="relu", relu_margin=0.0, loss_scale=1e-3)
    unet = UNetCalls(models, scheduler)
    loss, reward, _ = unet.run(refl, models, scheduler, args, seed=0, prompts=("a cat", "a dog"))
    assert (reward < 0).all()  # symmetry rewards are negative
    torch.testing.assert_close(loss, torch.relu(0.0 - reward).mean() * 1e-3)
    args.relu_margin = -10.0  # every reward above the margin: the hinge is flat
    loss, _, _ = unet.run(refl, models, scheduler, args, seed=0)
    assert loss.item() == 0.0


# --- DRaFT -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop_grad", [False, True])
def test_draft_k_trains_exactly_the_last_k_steps(stop_grad):
    args, models, scheduler = setup(draft, num_inference_steps=6, draft_k=3, stop_grad_unet_input=stop_grad)
    unet = UNetCalls(models, scheduler)
    loss, _, extra = unet.run(draft, models, scheduler, args, seed=0)
    assert unet.steps == list(range(6))
    assert unet.trained == [3, 4, 5] and extra == dict(num_trained_steps=3, first_trained_step=3)
    # full backpropagation: the inputs of the trained calls after the first depend on the LoRA weights
    assert [requires_grad for _, _, requires_grad, _ in unet.calls] == [False] * 4 + [not stop_grad] * 2
    models.unet.zero_grad()
    loss.backward()
    assert lora_grad_is_nonzero(models)


def test_draft_t_trains_every_step():
    args, models, scheduler = setup(draft, num_inference_steps=5, draft_variant="t")
    unet = UNetCalls(models, scheduler)
    _, _, extra = unet.run(draft, models, scheduler, args, seed=0)
    assert unet.trained == unet.steps == list(range(5)) and extra["num_trained_steps"] == 5


@pytest.mark.parametrize("module,flags", [(draft, dict(draft_variant="t")),
                                          (alignprop, dict(truncation_min=4, truncation_max=4))],
                         ids=["draft-t", "alignprop"])
def test_stop_grad_unet_input_leaves_only_the_linear_path(module, flags, monkeypatch):
    """With detached UNet inputs, d loss / d x_T = prod a_s * d loss / d x_0 (a scalar times the identity, DRTune
    eq. 4-5); with full backpropagation the UNet's Jacobians enter and it is not."""
    common = dict(sampler="ddim", num_inference_steps=4, **flags)
    for stop_grad in (True, False):
        args, models, scheduler = setup(module, stop_grad_unet_input=stop_grad, **common)
        grad_T, grad_0 = input_gradient(module, monkeypatch, models, scheduler, args)
        c, error = scalar_fit(grad_T, grad_0)
        if stop_grad:
            # DDIM: prod_s sqrt(abar_prev(s) / abar_s) telescopes to sqrt(abar_final / abar_first)
            abar = scheduler.alphas_cumprod
            prod_a = (scheduler.final_alpha_cumprod / abar[scheduler.timesteps[0]]).sqrt()
            assert error < 1e-4 and c.item() == pytest.approx(prod_a.item(), rel=1e-4)
        else:
            assert error > 1e-2


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp"])
def test_draft_lv_n_grad_calls_at_the_last_timestep_on_differently_noised_inputs(sampler):
    args, models, scheduler = setup(draft, sampler=sampler, num_inference_steps=5, draft_variant="lv", lv_n=3)
    unet = UNetCalls(models, scheduler)
    loss, reward, extra = unet.run(draft, models, scheduler, args, seed=0, prompts=("a cat", "a dog"))
    assert unet.steps == [0, 1, 2, 3, 4] + [4] * 3  # x_0 without gradient, then n calls at the last timestep
    assert unet.trained == [4] * 3 and extra == dict(num_trained_steps=3, first_trained_step=4)
    inputs = [x for _, grad, _, x in unet.calls if grad]
    assert all(not torch.allclose(a, b) for i, a in enumerate(inputs) for b in inputs[i + 1:])
    # the re-noised copies sit close to x_0 (t = 1): far closer to one another than to fresh noise
    assert (inputs[0] - inputs[1]).abs().max() < 0.2 * inputs[0].abs().max()
    assert reward.shape == (2,)
    torch.testing.assert_close(loss, -3 * reward.mean())  # the n rewards are summed
    models.unet.zero_grad()
    loss.backward()
    assert lora_grad_is_nonzero(models)


def test_draft_lv_last_step_is_the_samplers_own():
    """final_step from the last timestep equals the scheduler's own last step (DDPM, DDIM, DPM-Solver++)."""
    for sampler in ("ddpm", "ddim", "dpmpp"):
        args, models, scheduler = setup(draft, sampler=sampler, num_inference_steps=5, draft_variant="lv")
        scheduler.set_timesteps(5)
        for t in scheduler.timesteps:  # DPM-Solver++ is stateful: walk it to its last step
            x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
            expected = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        got = draft.final_step(scheduler, eps, t, x, torch.Generator().manual_seed(0), args)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if sampler != "ddim":  # DDIM stops at SD's final_alpha_cumprod = abar_0 < 1, just short of x_0
            torch.testing.assert_close(got, draft.predict_x0_eps(scheduler, eps, t, x)[0], atol=1e-5, rtol=1e-5)


# --- AlignProp -------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop_grad", [False, True])
def test_alignprop_trains_a_contiguous_suffix_drawn_once_per_trajectory(stop_grad):
    args, models, scheduler = setup(alignprop, num_inference_steps=5, stop_grad_unet_input=stop_grad)
    unet = UNetCalls(models, scheduler)
    counts = set()
    for seed in range(6):
        loss, _, extra = unet.run(alignprop, models, scheduler, args, seed)
        r = extra["num_trained_steps"]
        assert unet.steps == list(range(5))
        assert unet.trained == list(range(5 - r, 5)) and extra["first_trained_step"] == 5 - r  # contiguous, to the end
        requires_grad = [rg for _, _, rg, _ in unet.calls]
        assert requires_grad == [False] * (6 - r) + [not stop_grad] * (r - 1)
        counts.add(r)
    assert len(counts) >= 3  # drawn anew for each trajectory
    models.unet.zero_grad()
    loss.backward()
    assert lora_grad_is_nonzero(models)


def test_alignprop_steps_near_the_output_are_trained_more_often():
    generator, T, draws = torch.Generator().manual_seed(0), 8, 4000
    counts = Counter(i for _ in range(draws) for i in alignprop.truncation_schedule(T, 1, T, generator))
    frequency = [counts[i] / draws for i in range(T)]
    expected = [(i + 1) / T for i in range(T)]  # step i trained iff r >= T - i, r uniform in [1, T]
    assert max(abs(f - e) for f, e in zip(frequency, expected)) < 0.03
    assert frequency[-1] == 1.0
    bounded = {len(alignprop.truncation_schedule(T, 2, 3, generator)) for _ in range(200)}
    assert bounded == {2, 3}


# --- presets and bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("module", [refl, draft, alignprop])
def test_presets_pass_their_own_checks(module):
    for name in module.PRESETS:
        args = module.parse_args(["--preset", name])
        module.check_algorithm_arguments(args)
    # the demo: symmetry with the CLIPScore regularizer, as the paper always has it
    assert module.PRESETS["demo"]["reward"] == "symmetry:1,clipscore:1"


@pytest.mark.parametrize("module,flags,message", [
    (refl, dict(stop_range=0), "stop_range"),
    (refl, dict(stop_range=5), "stop_range"),
    (refl, dict(stop_range=2, loss_scale=0), "loss_scale"),
    (draft, dict(draft_k=5), "draft_k"),
    (draft, dict(draft_k=0), "draft_k"),
    (draft, dict(draft_variant="lv", lv_n=0), "lv_n"),
    (alignprop, dict(truncation_min=0), "truncation_min"),
    (alignprop, dict(truncation_max=5), "truncation_max"),
    (alignprop, dict(truncation_min=3, truncation_max=2), "truncation_min"),
    (draft, dict(reward="jpeg_size"), "not differentiable"),
])
def test_bad_input_is_one_clear_error(module, flags, message, tmp_path):
    args = module.parse_args(tiny_argv(TINY_SD, str(tmp_path), **flags))  # 4 sampling steps
    with pytest.raises(module.UsageError, match=message):
        module.check_arguments(args)


# --- the CLI ---------------------------------------------------------------------------------------

CLI = {"refl-sd15": ("refl.py", TINY_SD, dict(stop_range=2)),
       "draft-lv-sd15": ("draft.py", TINY_SD, dict(draft_variant="lv")),
       "alignprop-sd15": ("alignprop.py", TINY_SD, dict(stop_grad_unet_input=True)),
       "refl-sdxl": ("refl.py", TINY_SDXL, dict(stop_range=2, loss="relu", loss_scale=1e-3)),
       "draft-k-sdxl": ("draft.py", TINY_SDXL, dict(draft_k=2)),
       "alignprop-sdxl": ("alignprop.py", TINY_SDXL, {})}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """All the runs started at once, one thread each: most of a run is imports and setup, so they share the CPU
    cores better than they would one after another."""
    root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for key, (script, model, flags) in CLI.items():
        out, log = str(root / key), str(root / f"{key}.log")
        argv = tiny_argv(model, out, max_train_steps=2, learning_rate=0.05, **flags)
        with open(log, "w") as f:
            process = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=str(root), env=env,
                                       stdout=f, stderr=subprocess.STDOUT)
        runs[key] = out, log, process
    yield runs
    for _, _, process in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("key", CLI)
def test_cli_writes_outputs_and_lora_loads_in_diffusers(key, cli_runs):
    script, model, _ = CLI[key]
    out, log, process = cli_runs[key]
    if process.wait(timeout=300) != 0:
        with open(log) as f:
            pytest.fail(f"{script} failed:\n{f.read()[-3000:]}")
    for name in ("pytorch_lora_weights.safetensors", "config.json", "metrics.jsonl", "samples/step-000000.png",
                 "samples/step-000002.png"):
        assert os.path.exists(os.path.join(out, name)), name
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval_reward" in rows[-1]
    assert "num_trained_steps" in rows[-1] or "t_min" in rows[-1]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["script"] == script
    assert lora_effect(model, out) > 1e-3
