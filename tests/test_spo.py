"""SPO: the step log-density, the candidate pool, the compare rule, the loss and its clamp, the UNet call count,
the continuation, and short runs on the tiny SD and SDXL pipelines."""
import json
import math
import os

import pytest
import torch
from conftest import TINY_SD, TINY_SDXL, read_metrics, run_cli, tiny_argv, two_process_loras
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

import spo

CPU = torch.device("cpu")
SPO = dict(num_inference_steps=6, warm_steps=2, num_candidates=4, pair_threshold=0.0, preference_temperature=0.01)


def setup(model=TINY_SD, **overrides):
    args = spo.parse_args(tiny_argv(model, "unused", **dict(SPO, **overrides)))
    info = spo.check_arguments(args)
    models = spo.load_models(args, info, CPU, torch.float32)
    spo.add_lora(models.unet, args)
    preference_model = spo.build_preference_model(spo.rewards.build_reward("symmetry"), args)
    return args, models, spo.make_scheduler(args), preference_model


def sample(args, models, scheduler, preference_model, prompts=("a cat", "a red bicycle"), seed=0):
    return spo.sample_pairs(models, scheduler, models.unet, preference_model, list(prompts),
                            torch.Generator().manual_seed(seed), args)


@pytest.fixture(scope="module")
def sd():
    """Tiny SD with a fresh (zero) LoRA and one round of pairs; no test may train it."""
    args, models, scheduler, preference_model = setup()
    pairs, stats = sample(args, models, scheduler, preference_model)
    return args, models, scheduler, preference_model, pairs, stats


# --- the step and its density ------------------------------------------------------------------------

def test_log_density_is_the_mean_of_normal_log_prob():
    x, mean = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sigma = torch.tensor([0.05, 0.3, 1.7])
    expected = torch.distributions.Normal(mean, sigma.view(-1, 1, 1, 1)).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(spo.gaussian_log_density(x, mean, sigma), expected)
    torch.testing.assert_close(spo.gaussian_log_density(x, mean, 0.3),
                               torch.distributions.Normal(mean, 0.3).log_prob(x).mean(dim=(1, 2, 3)))


def test_candidates_are_ddim_eta1_steps_from_one_mean():
    """mean + sigma z_j is diffusers' DDIM step with eta 1 and the same noise; the pool shares the mean."""
    args = spo.parse_args(tiny_argv(TINY_SD, "unused", num_inference_steps=20))
    ours = spo.make_scheduler(args)
    reference = DDIMScheduler.from_pretrained(TINY_SD, subfolder="scheduler", clip_sample=False)
    for s in (ours, reference):
        s.set_timesteps(20)
    x, model_output = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8)
    for t in reference.timesteps[[0, 7, 19]]:
        mean = spo.sampler_step(ours, model_output, t, x, None, 1.0)
        sigma = spo.step_std(ours, int(t), 1.0)
        pool = spo.draw_candidates(mean, sigma, 3, torch.Generator().manual_seed(1))
        noise = torch.randn((3, *x.shape), generator=torch.Generator().manual_seed(1))
        for j in range(3):
            expected = reference.step(model_output, t, x, eta=1.0, variance_noise=noise[j]).prev_sample
            torch.testing.assert_close(pool[j], expected, atol=1e-5, rtol=1e-5)
    # per-sample timesteps (spo_loss): each row's mean and sigma equal the scalar step's of that row
    timesteps = reference.timesteps[[3, 11]]
    got = spo.sampler_step(ours, model_output, timesteps, x, None, 1.0)
    sigmas = spo.step_std(ours, timesteps, 1.0)
    for i, t in enumerate(timesteps):
        torch.testing.assert_close(got[i], spo.sampler_step(ours, model_output[i:i + 1], t, x[i:i + 1], None, 1.0)[0])
        torch.testing.assert_close(sigmas[i], spo.step_std(ours, int(t), 1.0))


def test_pool_shares_x_t_and_the_step_mean(sd):
    """Every kept pair (no inner steps) has one x_t, and both of its x_{t-1} are that x_t's DDIM mean plus
    sigma times standard normal noise."""
    args, models, scheduler, _, pairs, _ = sd
    assert len(pairs["timesteps"]) > 0
    torch.testing.assert_close(pairs["latents"][:, 0], pairs["latents"][:, 1], rtol=0, atol=0)
    cond = spo.encode_prompts(models, pairs["prompts"], args.resolution)
    x_t, t = pairs["latents"][:, 0], pairs["timesteps"]
    with torch.no_grad():
        model_output = spo.predict_noise(models.unet, x_t, t, cond, args.guidance_scale)
    mean = torch.cat([spo.sampler_step(scheduler, model_output[i:i + 1], s, x_t[i:i + 1], None, args.eta)
                      for i, s in enumerate(t.tolist())])  # row by row, each at its own timestep
    sigma = torch.stack([spo.step_std(scheduler, s, args.eta) for s in t.tolist()]).view(-1, 1, 1, 1)
    z = (pairs["next_latents"] - mean.unsqueeze(1)) / sigma.unsqueeze(1)  # (P, 2, C, h, w)
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    assert (z[:, 0] - z[:, 1]).abs().amax(dim=(1, 2, 3)).min() > 0.5  # winner and loser: different noise


# --- the compare rule ----------------------------------------------------------------------------------

def test_pair_is_kept_only_above_the_threshold():
    scores = torch.tensor([[0.0, 5.0, 1.0, 2.0],
                           [1.0, 5.0, 1.2, 1.0],
                           [0.5, 5.0, 1.1, 3.0]])  # (k = 3, B = 4)
    best, worst, gap, keep = spo.select_pair(scores, threshold=0.3)
    assert best.tolist() == [1, 0, 1, 2] and worst.tolist() == [0, 0, 0, 1]
    d = torch.tensor([1.0, 0.0, 0.2, 2.0])  # best - worst
    torch.testing.assert_close(gap, torch.sigmoid(d) - torch.sigmoid(-d))  # softmax over (best, worst) only
    assert keep.tolist() == [True, False, False, True]
    threshold = float(gap[0])  # strictly above
    assert not spo.select_pair(scores, threshold)[3][0]
    # the temperature divides the scores: small differences pass with a small temperature
    assert spo.select_pair(scores, 0.3, temperature=0.1)[3].tolist() == [True, False, True, True]


def test_kept_pairs_follow_the_threshold_in_sampling():
    args, models, scheduler, preference_model = setup(num_candidates=3, pair_threshold=0.5)
    pairs, stats = sample(args, models, scheduler, preference_model, prompts=["a cat", "a dog", "a boat"])
    assert stats["gaps"].shape == (3 * (6 - 2),)
    assert stats["kept"] == int((stats["gaps"] > 0.5).sum()) == len(pairs["timesteps"])
    assert 0 < stats["kept"] < len(stats["gaps"])  # this seed has gaps on both sides of 0.5


# --- the loss ------------------------------------------------------------------------------------------

def test_loss_is_log2_at_init_and_trains_the_lora(sd):
    args, models, scheduler, _, pairs, _ = sd
    loss, clamped, log_ratio = spo.spo_loss(models, scheduler, models.unet, pairs, args)
    torch.testing.assert_close(loss, torch.full_like(loss, math.log(2)))  # peft's LoRA starts at zero: p = p_ref
    assert not clamped.any() and log_ratio.abs().max() == 0
    models.unet.zero_grad()
    loss.mean().backward()
    lora_b = [p.grad for n, p in models.unet.named_parameters() if "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in lora_b)
    models.unet.zero_grad(set_to_none=True)
    assert all(p.requires_grad for n, p in models.unet.named_parameters() if "lora_" in n)  # adapters back on


def test_gradient_vanishes_when_a_ratio_leaves_the_clamp():
    beta, eps = 10.0, 0.1
    inside, outside = 0.05, 0.5  # log-ratios; the clamp range is [log 0.9, log 1.1] = [-0.105, 0.095]
    logp_ref = torch.zeros(3, 2)
    logp = torch.tensor([[inside, -inside], [outside, -inside], [inside, -outside]], requires_grad=True)
    loss, clamped = spo.pair_loss(logp, logp_ref, beta, eps)
    loss.sum().backward()
    assert clamped.tolist() == [[False, False], [True, False], [False, True]]
    g = logp.grad
    assert g[0, 0] < 0 < g[0, 1]  # inside: raise the winner's density, lower the loser's
    assert g[1, 0] == 0 and g[1, 1] > 0  # the winner's ratio left the range: only the loser still moves
    assert g[2, 0] < 0 and g[2, 1] == 0
    # the value uses log of the clamped ratio
    torch.testing.assert_close(loss[1], -torch.nn.functional.logsigmoid(torch.tensor(beta * (math.log(1.1) + inside))))


def test_a_deterministic_last_step_gives_no_pair():
    """With set_alpha_to_one (diffusers' default for a config without the key) DDIM's last step goes to abar = 1:
    sigma 0, no density, so that step yields no pair; every other compared step does (threshold 0)."""
    from diffusers import DDIMScheduler
    args, models, scheduler, preference_model = setup(num_candidates=2)
    scheduler = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True)
    pairs, stats = sample(args, models, scheduler, preference_model)
    last = int(scheduler.timesteps[-1])
    assert spo.step_std(scheduler, last, 1.0) == 0
    assert last not in pairs["timesteps"].tolist()
    assert len(pairs["timesteps"]) == 2 * (args.num_inference_steps - args.warm_steps - 1)  # B = 2 prompts
    assert len(stats["gaps"]) == 2 * (args.num_inference_steps - args.warm_steps)  # the last step is still compared


def test_loss_matches_a_forward_per_side_with_inner_steps():
    """With inner steps the two sides of a pair start from different x_t; one UNet row per distinct x_t must give
    the log-densities of running each side on its own."""
    args, models, scheduler, preference_model = setup(TINY_SDXL, num_candidates=2, num_inner_steps=1)
    pairs, _ = sample(args, models, scheduler, preference_model)
    shared = (pairs["latents"][:, 0] == pairs["latents"][:, 1]).flatten(1).all(1)
    assert shared.any() and not shared.all()
    # SDXL's config sets set_alpha_to_one False: DDIM's last step stops at abar_0 < 1 and stays stochastic, a pair
    assert spo.step_std(scheduler, int(scheduler.timesteps[-1]), 1.0) > 0
    assert int(scheduler.timesteps[-1]) in pairs["timesteps"].tolist()
    with torch.no_grad():
        for p in models.unet.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))  # policy != reference
        loss, _, log_ratio = spo.spo_loss(models, scheduler, models.unet, pairs, args)
        cond = spo.encode_prompts(models, pairs["prompts"], args.resolution)
        t, expected = pairs["timesteps"], []
        for side in (0, 1):
            x_t, logps = pairs["latents"][:, side], []
            for adapters in (True, False):
                (models.unet.enable_adapters if adapters else models.unet.disable_adapters)()
                out = spo.predict_noise(models.unet, x_t, t, cond, args.guidance_scale)
                mean = torch.cat([spo.sampler_step(scheduler, out[i:i + 1], s, x_t[i:i + 1], None, args.eta)
                                  for i, s in enumerate(t.tolist())])  # row by row
                sigma = torch.stack([spo.step_std(scheduler, s, args.eta) for s in t.tolist()])
                logps.append(spo.gaussian_log_density(pairs["next_latents"][:, side], mean, sigma))
            models.unet.enable_adapters()
            expected.append(logps[0] - logps[1])
        torch.testing.assert_close(log_ratio, torch.stack(expected, 1), atol=1e-4, rtol=1e-4)
        assert log_ratio.abs().max() > 1e-3


# --- sampling: the continuation and the UNet calls --------------------------------------------------------

def test_continuation_is_one_of_the_candidates():
    """k = 2 and threshold 0: every comparison is kept, so each pool's two candidates are stored; the next pool's
    x_t must be one of them, and both get picked."""
    args, models, scheduler, preference_model = setup(num_candidates=2)
    prompts = ["a cat", "a dog", "a boat", "a tree"]
    pairs, stats = sample(args, models, scheduler, preference_model, prompts=prompts)
    steps, B = 6 - 2, len(prompts)
    assert len(pairs["timesteps"]) == steps * B  # no ties
    x_t = pairs["latents"].view(steps, B, 2, -1)
    x_prev = pairs["next_latents"].view(steps, B, 2, -1)
    picked = []
    for s in range(steps - 1):
        for b in range(B):
            match = [torch.equal(x_t[s + 1, b, 0], x_prev[s, b, j]) for j in (0, 1)]
            assert sum(match) == 1
            picked.append(match.index(True))
    assert set(picked) == {0, 1}  # the winner and the loser both get continued from: a random choice


@pytest.mark.parametrize("model,k,inner", [(TINY_SD, 4, 0), (TINY_SDXL, 2, 2)], ids=["sd15", "sdxl-inner2"])
def test_unet_calls_per_trajectory(model, k, inner):
    """One UNet call per step: batch B for the W warm steps and the first branching step, k B for every later
    one (they both score the candidates' x_0 predictions and continue the chain): (W + 1) B + k B (T - W - 1)."""
    T, W, B = 7, 2, 2
    args, models, scheduler, preference_model = setup(model, num_inference_steps=T, warm_steps=W, num_candidates=k,
                                                      num_inner_steps=inner)
    batches = []
    handle = models.unet.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0] // 2))  # CFG: 2x
    try:
        _, stats = sample(args, models, scheduler, preference_model)
    finally:
        handle.remove()
    assert batches == [B] * (W + 1) + [k * B] * (T - W - 1)
    assert sum(batches) == (W + 1) * B + k * B * (T - W - 1)
    assert len(stats["gaps"]) == B * math.ceil((T - W) / (inner + 1))  # comparisons


# --- short runs ------------------------------------------------------------------------------------------

def test_cli_trains_and_lora_loads_in_diffusers(tiny_model, tmp_path):
    out = str(tmp_path / "run")
    argv = tiny_argv(tiny_model, out, **dict(SPO, learning_rate=0.05, checkpointing_steps=1, checkpoints_total_limit=1))
    rows = run_cli("spo.py", argv, tmp_path)
    for key in ("loss", "reward_mean", "grad_norm", "pairs", "pairs_per_prompt", "kept_fraction", "score_gap",
                "clamped_fraction", "ratio_win", "ratio_lose", "eval_reward", "seconds", "peak_memory_mb"):
        assert key in rows[-1], key
    assert rows[1]["pairs"] > 0 and rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[1]["grad_norm"] > 0
    cls = StableDiffusionXLPipeline if tiny_model == TINY_SDXL else StableDiffusionPipeline
    pipe = cls.from_pretrained(tiny_model)
    kwargs = dict(num_inference_steps=4, height=32, width=32, output_type="pt")
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(out)
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (after - before).abs().max() > 1e-3


def run(out, **overrides):
    spo.main(spo.parse_args(tiny_argv(TINY_SD, out, **dict(SPO, learning_rate=0.05, **overrides))))
    with open(os.path.join(out, "metrics.jsonl")) as f:  # timings vary; a short run also evaluates at its end
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "peak_memory_mb", "eval_reward")}
                for line in f]


def test_resume_continues_identically(tmp_path):
    full = run(str(tmp_path / "full"), max_train_steps=3, checkpointing_steps=2)
    assert len(full) == 4 and full[-1]["reward_mean"] != full[1]["reward_mean"]
    out = str(tmp_path / "resumed")
    run(out, max_train_steps=2, checkpointing_steps=2)
    assert list(spo.complete_checkpoints(out)) == [2]
    assert run(out, max_train_steps=3, checkpointing_steps=2, resume_from_checkpoint="latest") == full


def test_nonfinite_reward_skips_updates_then_stops(tmp_path, monkeypatch):
    original = spo.build_preference_model

    def poisoned(reward_fn, args):
        score = original(reward_fn, args)
        return lambda images, prompts, t: score(images, prompts, t) * float("nan")

    monkeypatch.setattr(spo, "build_preference_model", poisoned)
    out = str(tmp_path / "nan")
    args = spo.parse_args(tiny_argv(TINY_SD, out, max_train_steps=5, max_nonfinite_steps=2, **SPO))
    with pytest.raises(RuntimeError, match="2 updates in a row"):
        spo.main(args)
    rows = read_metrics(out)
    assert [r["skipped"] for r in rows[1:]] == [True, True]


def test_two_processes_gather_pairs_and_end_with_identical_lora(tmp_path):
    out = str(tmp_path / "dist")
    argv = tiny_argv(TINY_SD, out, **dict(SPO, max_train_steps=2, learning_rate=0.05, pair_threshold=0.3))
    w0, w1 = two_process_loras("spo", argv)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any("lora_B" in k and w0[k].abs().sum() > 0 for k in w0), "training changed nothing"
    rows = read_metrics(out)
    # the gathered pairs are exactly those each process kept: 2 processes x 2 prompts x 4 compared steps
    for row in rows[1:]:
        assert row["pairs"] == round(row["kept_fraction"] * 16) and row["pairs_per_prompt"] == row["pairs"] / 4
    assert any(0 < row["pairs"] < 16 for row in rows[1:])


# --- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (dict(sampler="ddpm"), "--sampler ddim"),
    (dict(eta=0.0), "--eta > 0"),
    (dict(num_candidates=1), "num_candidates"),
    (dict(warm_steps=6), "warm_steps"),
    (dict(pair_threshold=1.0), "pair_threshold"),
    (dict(clip_eps=1.0), "clip_eps"),
    (dict(reward="nonsense"), "nonsense"),
])
def test_bad_input_is_one_clear_error(overrides, message, tmp_path):
    args = spo.parse_args(tiny_argv(TINY_SD, str(tmp_path), **dict(SPO, **overrides)))
    with pytest.raises(spo.UsageError, match=message):
        spo.check_arguments(args)


def test_defaults_are_the_papers():
    args = spo.parse_args([])
    # the sampler is the family's stochastic one (check_arguments: DDIM for SD1.5/SDXL, the flow SDE for SD3/FLUX);
    # CFG the family's pipeline's, the paper's 5 in its presets
    assert (args.sampler, args.eta, args.num_inference_steps) == (None, 1.0, 20)
    assert spo.NEEDS_STOCHASTIC_STEPS and spo.FAMILIES["sd15"]["stochastic_sampler"] == "ddim"
    assert spo.parse_args(["--preset", "sd15-paper"]).guidance_scale == 5.0
    assert (args.num_candidates, args.pair_threshold, args.warm_steps, args.beta, args.clip_eps) == (4, 0.3, 4, 10, 0.1)
    assert args.reward == "pickscore" and not spo.NEEDS_DIFFERENTIABLE_REWARD
    sdxl = spo.parse_args(["--preset", "sdxl-paper"])
    assert (sdxl.num_candidates, sdxl.pair_threshold, sdxl.num_inner_steps) == (2, 0.4, 3)
