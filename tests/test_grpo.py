"""grpo.py: the transition densities against torch.distributions.Normal and diffusers' DDIM step, the ratio at the
first update, advantages and the clipped loss by hand, a zero update from a flat group, two processes = one, and
training on every family."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import TINY_FLUX, TINY_SD, TINY_SD3, TINY_SDXL, read_metrics, tiny_argv, two_process_loras

import grpo

GRPO = dict(group_size=3, train_batch_size=2, num_inference_steps=4, sampler="ddim", eta=1.0, learning_rate=1e-2)
FLOW = dict(GRPO, sampler="euler", eta=0.7, max_sequence_length=16, guidance_scale=None)


def setup(model, **flags):
    args = grpo.parse_args(tiny_argv(model, "/tmp/unused", **flags))
    info = grpo.check_arguments(args)
    models = grpo.load_models(args, info, torch.device("cpu"), torch.float32)
    grpo.add_lora(models.unet, args)
    return args, models, grpo.make_scheduler(args)


def lora_state(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("model,flags", [(TINY_SD, GRPO), (TINY_SD3, FLOW)], ids=["sd15-ddim", "sd35-sde"])
def test_sampled_log_probs_are_the_normal_density_of_the_drawn_transition(model, flags):
    """Every recorded transition x_i -> x_{i+1}: its log-prob is torch.distributions.Normal's log density (mean over
    dimensions) at the step's mean and std; on SD1.5 the mean and std are also diffusers' DDIMScheduler.step at
    eta = 1 (zero noise gives the mean, its variance the std), and the drawn noise (x_{i+1} - mean) / std is the
    image's own generator's (standard normal, as a resumed run redraws it)."""
    args, models, scheduler = setup(model, **flags)
    batch = grpo.sample_group(models, scheduler, models.unet, ["a cat", "a dog"], 0, 1, args)
    n, S = batch["log_probs"].shape
    assert n == 2 * args.group_size and S == args.num_inference_steps and batch["images"].shape[0] == n
    cond = grpo.encode_prompts(models, batch["prompts"], args.resolution)
    for s in range(S):
        x, x_next, t = batch["latents"][:, s], batch["next_latents"][:, s], batch["timesteps"][0, s]
        with torch.no_grad():
            out = grpo.predict_noise(models.unet, x, t, cond, args.guidance_scale)
        mean, std = grpo.step_mean_std(scheduler, out, t, x, args.eta)
        if model == TINY_SD:  # diffusers' own DDIM step
            expected = scheduler.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
            torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)
            prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
            torch.testing.assert_close(torch.as_tensor(std).float(), scheduler._get_variance(t, prev).sqrt().float(),
                                       atol=1e-6, rtol=1e-5)
        normal = torch.distributions.Normal(mean, torch.as_tensor(std).float())
        torch.testing.assert_close(batch["log_probs"][:, s], normal.log_prob(x_next).flatten(1).mean(1),
                                   atol=1e-5, rtol=1e-5)
        z = (x_next - mean) / std
        assert abs(z.mean()) < 0.2 and abs(z.std() - 1) < 0.2


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 4.0, 0.5, 0.5, 0.5, 3.0, -1.0, 0.0])
    adv, flat = grpo.group_advantages(r, 3, "group", clip=5.0)
    expected = []
    for g in r.view(3, 3).numpy().astype(np.float64):
        expected += [0.0] * 3 if np.all(g == g[0]) else list((g - g.mean()) / (g.std() + 1e-4))
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6)
    assert flat == pytest.approx(1 / 3) and (adv[3:6] == 0).all()  # a flat group: exactly zero
    adv, _ = grpo.group_advantages(r, 3, "batch", clip=1.0)  # the batch's std, then the clip
    std = r.double().numpy().std()
    expected = [0.0 if np.all(g == g[0]) else v for g in r.view(3, 3).numpy().astype(np.float64)
                for v in np.clip((g - g.mean()) / (std + 1e-4), -1, 1)]
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6)
    assert adv.abs().max() == 1.0


def test_clipped_loss_by_hand():
    """max(-A r, -A clip(r, 1 - eps, 1 + eps)) and its gradient: zero where the clipped side is the max."""
    eps = 0.1
    log_ratio = torch.tensor([0.0, 0.3, 0.3, -0.3, -0.3]).log1p()  # r = 1, 1.3, 1.3, 0.7, 0.7
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0])
    log_prob = log_ratio.clone().requires_grad_()
    loss, ratio = grpo.clipped_loss(log_prob, torch.zeros(5), adv, eps)
    r = np.array([1.0, 1.3, 1.3, 0.7, 0.7])
    a = adv.numpy()
    expected = np.maximum(-a * r, -a * np.clip(r, 1 - eps, 1 + eps))
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(ratio.numpy(), r, rtol=1e-6)
    loss.sum().backward()
    # d/dlogp of -A r = -A r where unclipped wins; 0 where clipped wins (r = 1.3 with A > 0; r = 0.7 with A < 0)
    np.testing.assert_allclose(log_prob.grad.numpy(), [-1.0, 0.0, 1.3, -0.7, 0.0], rtol=1e-6)


def test_mixgrpo_window_slides_and_clamps():
    args = grpo.parse_args(tiny_argv(TINY_SD, "/tmp/unused", **dict(GRPO, num_inference_steps=10, sde_window_size=4,
                                                                     sde_window_stride=2, sde_window_every=3)))
    starts = [grpo.sde_window(args, step)[0] for step in range(1, 20)]
    assert starts == [0] * 3 + [2] * 3 + [4] * 3 + [6] * 10  # moves by s every tau rounds, stops at T - W


@pytest.mark.parametrize("flags", [dict(train_micro_batch=4), dict(train_micro_batch=5, updates_per_round=3),
                                   dict(train_micro_batch=2, num_inner_epochs=2, gradient_accumulation_steps=2,
                                        train_batch_size=1)])
def test_the_ratio_is_one_whatever_the_split_while_the_policy_has_not_moved(tmp_path, flags, monkeypatch):
    """At learning rate 0 every update's policy is the sampling one: each ratio must be exactly 1 (nothing clipped,
    approx KL 0) however the round is cut into updates and micro-batches, which a ratio against the sampling
    forward's log-prob is only at batch size 1. At a real learning rate the first update's ratios are exactly 1
    too and later updates move them."""
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:  # a learning rate of 0 (the command line refuses one)
        m.setattr(grpo, "make_optimizer", lambda params, args, device: torch.optim.SGD(params, lr=0.0))
        grpo.main(grpo.parse_args(tiny_argv(TINY_SD, out, **dict(GRPO, timestep_fraction=0.5, max_train_steps=1,
                                                                 **flags))))
    row = read_metrics(out)[-1]
    assert row["ratio_mean"] == 1.0 and row["clipped_fraction"] == 0.0 and row["approx_kl"] == 0.0, row
    assert row["logp_mismatch"] < 1e-4  # the sampling forward's value: close, not necessarily bit-equal
    out = str(tmp_path / "moving")
    grpo.main(grpo.parse_args(tiny_argv(TINY_SD, out, **dict(GRPO, learning_rate=0.1, max_train_steps=1,
                                                             updates_per_round=2, clip_range=1e-4))))
    row = read_metrics(out)[-1]
    assert row["ratio_mean"] != 1.0 and row["clipped_fraction"] > 0, row


def test_equal_rewards_in_every_group_make_no_update(tmp_path, monkeypatch):
    """A plug-in reward that scores every image the same: every advantage is exactly 0, so with beta 0 no image is
    trained on and the LoRA stays its initialization, bit for bit."""
    plugin = tmp_path / "flat.py"
    plugin.write_text("import torch\n\ndef reward(images, prompts):\n    return torch.full((len(images),), 0.3)\n")
    from peft.utils import get_peft_model_state_dict
    initial, add_lora = {}, grpo.add_lora

    def keep_initial(unet, args):
        params = add_lora(unet, args)
        initial.update({k: v.clone() for k, v in get_peft_model_state_dict(unet).items()})
        initial["unet"] = unet
        return params
    monkeypatch.setattr(grpo, "add_lora", keep_initial)
    out = str(tmp_path / "run")
    grpo.main(grpo.parse_args(tiny_argv(TINY_SD, out, **dict(GRPO, reward=f"{plugin}:reward", max_train_steps=2))))
    rows = read_metrics(out)
    assert all(r["flat_groups"] == 1.0 and r["trained_images"] == 0 for r in rows[1:]), rows
    final = get_peft_model_state_dict(initial.pop("unet"))
    assert final.keys() == initial.keys() and all(torch.equal(final[k], initial[k]) for k in final)


def test_two_processes_make_the_updates_of_one(tmp_path, monkeypatch):
    """Prompts and each image's noise are functions of (seed, round, image): 2 processes x 1 prompt per round
    sample the images of 1 process x 2 prompts, share the advantages and average the loss over all rows, so the
    LoRA after 2 rounds (2 updates each, the KL on) is the same within float tolerance (the forwards see other
    batch sizes); both ranks agree exactly."""
    # Adam's epsilon at 1: its step is then about lr x the momentum, so the float noise of the other batch sizes is
    # not blown up where a gradient is near 0 (at the default 1e-8 one such weight can move by lr either way)
    flags = dict(GRPO, max_train_steps=2, updates_per_round=2, beta=0.01, clip_range=0.2, learning_rate=1e-2,
                 adam_epsilon=1.0)
    from peft.utils import get_peft_model_state_dict
    captured, add_lora = {}, grpo.add_lora
    monkeypatch.setattr(grpo, "add_lora", lambda unet, args: captured.setdefault("unet", unet) and add_lora(unet, args))
    grpo.main(grpo.parse_args(tiny_argv(TINY_SD, str(tmp_path / "one"), **dict(flags, train_batch_size=2))))
    single = get_peft_model_state_dict(captured["unet"])
    w0, w1 = two_process_loras("grpo", tiny_argv(TINY_SD, str(tmp_path / "two"), **dict(flags, train_batch_size=1)))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert w0.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(w0[k], single[k], atol=1e-7, rtol=1e-4)
    assert any((v != 0).any() for k, v in single.items() if "lora_B" in k)  # it did train


@pytest.mark.parametrize("model,flags", [(TINY_SD, GRPO), (TINY_SDXL, GRPO), (TINY_SD3, FLOW), (TINY_FLUX, FLOW),
                                         (TINY_SD3, dict(FLOW, sde_window_size=2, beta=0.04))],
                         ids=["sd15", "sdxl", "sd35", "flux", "sd35-mixgrpo-kl"])
def test_trains_on_every_family(model, flags, tmp_path):
    out = str(tmp_path / "run")
    row = grpo.main(grpo.parse_args(tiny_argv(model, out, **dict(flags, max_train_steps=2))))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and row["eval_reward"] is not None
    assert all(r["grad_norm"] > 0 and r["transitions"] > 0 for r in rows[1:]), rows
    if flags.get("sde_window_size"):
        assert all(r["transitions"] == 2 * 3 * 2 for r in rows[1:])  # 6 images x the window's 2 steps
    if flags.get("beta"):
        assert rows[-1]["kl"] > 0
    assert os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["script"] == "grpo.py"


def test_resume_is_bit_identical(tmp_path):
    flags = dict(GRPO, checkpointing_steps=2, updates_per_round=2)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    grpo.main(grpo.parse_args(tiny_argv(TINY_SD, full, **dict(flags, max_train_steps=3))))
    grpo.main(grpo.parse_args(tiny_argv(TINY_SD, cut, **dict(flags, max_train_steps=2))))
    grpo.main(grpo.parse_args(tiny_argv(TINY_SD, cut, **dict(flags, max_train_steps=3,
                                                             resume_from_checkpoint="latest"))))
    a, b = lora_state(full), lora_state(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model,flags", [(TINY_SD, GRPO), (TINY_SD3, FLOW)], ids=["sd15", "sd35"])
def test_cached_prompt_embeddings_train_as_the_per_round_cache(model, flags, tmp_path):
    """--cache_prompt_embeds (every prompt encoded once, text encoders moved off) makes the rounds the per-round
    cache makes: the same rewards and LoRA, to the float rounding of the encoders' other batch sizes."""
    # Adam's epsilon at 1 (the two-process test's): float noise near a zero gradient is not blown up to a step of lr
    flags = dict(flags, max_train_steps=2, updates_per_round=2, adam_epsilon=1.0, learning_rate=1.0)
    plain, cached = str(tmp_path / "plain"), str(tmp_path / "cached")
    grpo.main(grpo.parse_args(tiny_argv(model, plain, **flags)))
    grpo.main(grpo.parse_args(tiny_argv(model, cached, **dict(flags, cache_prompt_embeds=True))))
    for a, b in zip(read_metrics(plain)[1:], read_metrics(cached)[1:], strict=True):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-5)
    a, b = lora_state(plain), lora_state(cached)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("flags,message", [
    (dict(sampler="ddim", eta=0.0), "--sampler ddim with --eta > 0"),
    (dict(group_size=1), "--group_size 1 must be >= 2"),
    (dict(clip_range=0.0), "--clip_range 0.0 must be in (0, 1)"),
    (dict(timestep_fraction=1.5), "--timestep_fraction 1.5"),
    (dict(sde_window_size=9), "--sde_window_size 9 must be in [0, 4]"),
    (dict(sampler="ddpm", sde_window_size=2), "use --sampler ddim"),
    (dict(updates_per_round=7), "--updates_per_round 7 is more than the 6 images"),
    (dict(beta=-1.0), "--beta -1.0"),
])
def test_bad_grpo_input_is_one_line(flags, message, tmp_path):
    with pytest.raises(grpo.UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        grpo.check_arguments(grpo.parse_args(tiny_argv(TINY_SD, str(tmp_path / "x"), **dict(GRPO, **flags))))
