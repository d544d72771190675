"""Diffusion-DPO: the loss against a hand computation, the reference (the same UNet with its adapters off), the
Pick-a-Pic data path on a tiny parquet made here, SDXL time ids, online self-rewarding rounds and the moving
reference, and the CLI on tiny SD and SDXL with the LoRA reloaded in diffusers."""
import io
import itertools
import json
import math
import os

import pytest
import torch
from conftest import TINY_SD, TINY_SDXL, lora_effect, read_metrics, run_cli, tiny_argv
from diffusers import UNet2DConditionModel

import dpo

CPU = torch.device("cpu")
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def png(color, size=(48, 40)):
    """Encoded image bytes, as Pick-a-Pic stores them; size is (width, height)."""
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Two pairs with a preference (one each way), a tie, an undecodable and a truncated image."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [
        dict(jpg_0=png(RED), jpg_1=png(GREEN), label_0=1.0, caption="red beats green"),
        dict(jpg_0=png(YELLOW), jpg_1=png(BLUE), label_0=0.0, caption="blue beats yellow"),
        dict(jpg_0=png(RED), jpg_1=png(BLUE), label_0=0.5, caption="a tie"),
        dict(jpg_0=b"not an image", jpg_1=png(BLUE), label_0=1.0, caption="corrupt"),
        dict(jpg_0=png(RED), jpg_1=png(GREEN)[:60], label_0=0.0, caption="truncated"),
    ]
    table = pa.table({"jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
                      "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
                      "label_0": [r["label_0"] for r in rows], "caption": [r["caption"] for r in rows],
                      "url": ["u"] * len(rows)})  # Pick-a-Pic has more columns; they are dropped
    path = tmp_path_factory.mktemp("pairs") / "train.parquet"
    pq.write_table(table, path)
    return str(path)


def setup(model, pairs_file, **overrides):
    args = dpo.parse_args(tiny_argv(model, "unused", **dict(dict(dataset_name=pairs_file), **overrides)))
    info = dpo.check_arguments(args)
    models = dpo.load_models(args, info, CPU, torch.float32)
    dpo.add_lora(models.unet, args)
    return args, models


def noise_scheduler(model):
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_pretrained(model, subfolder="scheduler")


def lora_params(unet, adapter="default"):
    return {n: p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter}." in n}


# --- the loss ----------------------------------------------------------------------------------------

def with_mean_square(value, shape=(4, 8, 8), seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return x / x.square().mean().sqrt() * math.sqrt(value)


def test_loss_matches_hand_computation():
    """Errors averaged per pixel, then -log sigmoid(-beta/2 ((L_w - L_l) - (Lref_w - Lref_l))) per pair."""
    model = [0.30, 0.50, 0.40, 0.20]  # L_w of pairs 1, 2, then L_l of pairs 1, 2
    ref = [0.35, 0.45, 0.38, 0.25]
    target = torch.randn(4, 4, 8, 8)
    model_pred = target + torch.stack([with_mean_square(v, seed=i) for i, v in enumerate(model)])
    ref_pred = target + torch.stack([with_mean_square(v, seed=10 + i) for i, v in enumerate(ref)])
    model_error, ref_error = dpo.per_sample_error(model_pred, target), dpo.per_sample_error(ref_pred, target)
    torch.testing.assert_close(model_error, torch.tensor(model), atol=1e-6, rtol=1e-6)
    beta = 10.0
    loss, logits = dpo.dpo_loss(model_error, ref_error, beta)
    z1 = -beta / 2 * ((0.30 - 0.40) - (0.35 - 0.38))  # +0.35: the policy prefers the winner more than the reference
    z2 = -beta / 2 * ((0.50 - 0.20) - (0.45 - 0.25))  # -0.5
    expected = (math.log(1 + math.exp(-z1)) + math.log(1 + math.exp(-z2))) / 2
    assert abs(loss.item() - expected) < 1e-6
    torch.testing.assert_close(logits, torch.tensor([z1, z2]), atol=1e-5, rtol=1e-5)


def test_loss_is_log_2_when_policy_equals_reference(pairs_file):
    args, models = setup(TINY_SD, pairs_file)  # peft's init: LoRA B = 0, so the policy is the base model
    latents = torch.randn(4, 4, 8, 8)
    loss, extra = dpo.algorithm_loss(models, noise_scheduler(TINY_SD), models.unet, latents, ["a cat", "a dog"], None,
                                     torch.Generator().manual_seed(0), args)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert extra["model_error_w"] == extra["ref_error_w"] and extra["model_error_l"] == extra["ref_error_l"]


def test_one_step_lowers_winner_error_relative_to_loser(pairs_file):
    args, models = setup(TINY_SD, pairs_file)
    unet, scheduler = models.unet, noise_scheduler(TINY_SD)
    latents, prompts = torch.randn(4, 4, 8, 8), ["a cat", "a dog"]

    def evaluate():  # the same noise and timesteps every call
        return dpo.algorithm_loss(models, scheduler, unet, latents, prompts, None, torch.Generator().manual_seed(0), args)

    loss, before = evaluate()
    optimizer = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    loss.backward()
    optimizer.step()
    loss_after, after = evaluate()
    assert loss_after < loss
    gap = lambda e: (e["model_error_w"] - e["model_error_l"]).item()  # noqa: E731
    assert gap(after) < gap(before)
    assert after["ref_error_w"] == before["ref_error_w"] and after["ref_error_l"] == before["ref_error_l"]


def test_prompt_path_encodes_each_caption_once_and_no_negative(tiny_model, pairs_file):
    """Training runs without guidance: only the batch's distinct captions go through the text encoders."""
    args, models = setup(tiny_model, pairs_file)
    rows = []
    for encoder in models.text_encoders:
        encoder.register_forward_pre_hook(lambda m, a: rows.append(len(a[0])))
    dpo.algorithm_loss(models, noise_scheduler(tiny_model), models.unet, torch.randn(6, 4, 4, 4),
                       ["a cat", "a dog", "a cat"], None, torch.Generator().manual_seed(0), args)
    assert rows == [2] * len(models.text_encoders)


def test_reference_is_the_same_unet_with_adapters_off(pairs_file):
    """One module, two forwards (policy with grad, reference without); the reference equals the base UNet, a
    backward works under gradient checkpointing, and LoRA requires_grad is left as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    args, models = setup(TINY_SD, pairs_file)
    unet = models.unet
    unet.enable_gradient_checkpointing()
    unet.train()
    params = lora_params(unet)
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # the policy now differs from the base
    frozen = next(n for n in params if "lora_A" in n)
    params[frozen].requires_grad_(False)  # a flag that peft's enable_adapters() would turn back on
    flags = {n: p.requires_grad for n, p in params.items()}
    tuner = next(m for m in unet.modules() if isinstance(m, BaseTunerLayer))
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append((m, torch.is_grad_enabled(), tuner.disable_adapters)))
    latents, prompts = torch.randn(4, 4, 8, 8), ["a cat", "a dog"]
    loss, extra = dpo.algorithm_loss(models, noise_scheduler(TINY_SD), unet, latents, prompts, None,
                                     torch.Generator().manual_seed(0), args)
    assert [(m is unet, grad, off) for m, grad, off in calls] == [(True, False, True), (True, True, False)]
    loss.backward()
    assert {n: p.requires_grad for n, p in params.items()} == flags
    assert all(p.grad is not None for n, p in params.items() if n != frozen)

    base = UNet2DConditionModel.from_pretrained(TINY_SD, subfolder="unet").eval()
    cond = dpo.encode_prompts(models, prompts, args.resolution, negative=False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        expected = base(x, t, **cond).sample
        policy = unet(x, t, **cond).sample
    with dpo.reference_unet(unet):
        reference = unet(x, t, **cond).sample
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    assert (policy - expected).abs().max() > 1e-3
    assert {n: p.requires_grad for n, p in params.items()} == flags


def test_reference_switch_is_undone_when_its_body_raises(pairs_file):
    """An error inside reference_unet (say, out of memory in the reference forward) leaves the policy as it was:
    adapters on, the same outputs, every requires_grad flag back."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    args, models = setup(TINY_SD, pairs_file)
    unet = models.unet
    with torch.no_grad():
        for name, p in lora_params(unet).items():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    cond = dpo.encode_prompts(models, ["a cat"], args.resolution, negative=False)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    with torch.no_grad():
        policy = unet(x, t, **cond).sample
    flags = {n: p.requires_grad for n, p in lora_params(unet).items()}
    with pytest.raises(RuntimeError, match="inside"):
        with dpo.reference_unet(unet):
            raise RuntimeError("inside")
    assert not any(m.disable_adapters for m in unet.modules() if isinstance(m, BaseTunerLayer))
    assert {n: p.requires_grad for n, p in lora_params(unet).items()} == flags
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, **cond).sample, policy)


def test_sft_trains_on_winners_alone_without_a_reference(pairs_file):
    args, models = setup(TINY_SD, pairs_file, sft=True)
    batches = []
    models.unet.register_forward_pre_hook(lambda m, a: batches.append(len(a[0])))
    loss, extra = dpo.algorithm_loss(models, noise_scheduler(TINY_SD), models.unet, torch.randn(4, 4, 8, 8),
                                     ["a cat", "a dog"], None, torch.Generator().manual_seed(0), args)
    assert batches == [2] and loss.item() == pytest.approx(extra["model_error_w"].item())


# --- data ---------------------------------------------------------------------------------------------

def stream(pairs_file, n, **overrides):
    """The first n pairs of the item stream (its ties and unreadable rows passed over)."""
    args = dpo.parse_args(tiny_argv(TINY_SD, "unused", dataset_name=pairs_file, **overrides))
    dpo.check_algorithm_arguments(args)
    items = dpo.PickAPicPairs(dpo.open_pairs(args), args, process_index=0, num_processes=1, seed=0)
    return list(itertools.islice((item for item in items if item["kind"] == "pair"), n))


def color(pixels):
    return tuple(round((c.item() + 1) * 127.5) for c in pixels.mean(dim=(1, 2)))


@pytest.mark.parametrize("streaming", [False, True], ids=["parquet-file", "streamed-folder"])
def test_ties_dropped_winner_first_corrupt_images_skipped_and_counted(pairs_file, streaming):
    source = os.path.dirname(pairs_file) if streaming else pairs_file
    args = dpo.parse_args(tiny_argv(TINY_SD, "unused", dataset_name=source, streaming=streaming,
                                    proportion_empty_prompts=0))
    batches = dpo.PairBatches(dpo.open_pairs(args), args, process_index=0, num_processes=1)
    batch = batches.next(6)  # three passes over the two usable rows
    assert sorted(batch["captions"]) == ["blue beats yellow"] * 3 + ["red beats green"] * 3
    assert batch["pixels"].shape == (6, 2, 3, 32, 32) and batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    for caption, pixels in zip(batch["captions"], batch["pixels"]):
        winner, loser = color(pixels[0]), color(pixels[1])
        assert (winner, loser) == ((RED, GREEN) if caption == "red beats green" else (BLUE, YELLOW))
    # every row passed over is counted: passes 1-2 entirely, pass 3 up to its second usable row
    assert 2 <= batches.ties <= 3 and 4 <= batches.corrupt <= 6
    assert batches.position == batches.ties + batches.corrupt + 6


def test_corrupt_image_raises_in_load_pair_only():
    import numpy as np
    row = dict(jpg_0=b"not an image", jpg_1=png(BLUE), label_0=1.0, caption="x")
    with pytest.raises(Exception):
        dpo.load_pair(row, 32, False, False, np.random.default_rng(0))
    row = dict(jpg_0={"bytes": png(RED), "path": None}, jpg_1=png(BLUE), label_0=1.0, caption=None)  # Image feature
    example = dpo.load_pair(row, 32, True, True, np.random.default_rng(0))
    assert example["caption"] == "" and color(example["pixels"][0]) == RED


def test_sdxl_time_ids_from_original_size_and_crop(pairs_file):
    """A 48 x 40 (w x h) image at resolution 32: resized to 38 x 32, center crop at (top 0, left 3)."""
    examples = stream(pairs_file, 2)
    assert all(e["time_ids"] == [40, 48, 0, 3, 32, 32] for e in examples)
    for e in stream(pairs_file, 8, random_crop=True):
        top, left = e["time_ids"][2:4]
        assert top == 0 and 0 <= left <= 6
    args, models = setup(TINY_SDXL, pairs_file)
    seen = []
    models.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"]),
                                          with_kwargs=True)
    batch = dpo.collate_pairs(examples)
    latents = dpo.encode_images(models.vae, torch.cat([batch["pixels"][:, 0], batch["pixels"][:, 1]]),
                                torch.Generator().manual_seed(0), 8)
    assert latents.shape == (4, 4, 8, 8)
    dpo.algorithm_loss(models, noise_scheduler(TINY_SDXL), models.unet, latents, batch["captions"], batch["time_ids"],
                       torch.Generator().manual_seed(0), args)
    expected = torch.tensor([[40, 48, 0, 3, 32, 32]] * 4, dtype=torch.float32)
    assert len(seen) == 2 and all(torch.equal(ids, expected) for ids in seen)  # policy and reference, (2B, 6)


# --- online: self-rewarding pairs and the moving reference ---------------------------------------------

def test_online_pairs_winners_score_higher(pairs_file):
    args, models = setup(TINY_SD, pairs_file, online=True, images_per_prompt=3, dataset_name=None)
    reward_fn = dpo.rewards.build_reward("symmetry")
    scheduler = dpo.make_scheduler(args)
    prompts = ["a cat", "a dog", "a red car"]
    pool, scores = dpo.sample_pairs(models, scheduler, models.unet, reward_fn, prompts, torch.Generator().manual_seed(0),
                                    args)
    assert scores.shape == (3, 3) and pool["prompts"] == prompts
    with torch.no_grad():
        winners = reward_fn(dpo.decode(models.vae, pool["winners"]), prompts)
        losers = reward_fn(dpo.decode(models.vae, pool["losers"]), prompts)
    assert (winners > losers).all()
    torch.testing.assert_close(winners, scores.max(dim=1).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool["gaps"], winners - losers, atol=1e-5, rtol=1e-5)
    args.pair_margin = pool["gaps"].median().item()  # pairs at or below the margin are skipped
    strict, _ = dpo.sample_pairs(models, scheduler, models.unet, reward_fn, prompts, torch.Generator().manual_seed(0),
                                 args)
    assert len(strict["prompts"]) == 1 and (strict["gaps"] > args.pair_margin).all()


def test_ema_reference_moves_by_exactly_the_rate(pairs_file):
    """phi <- phi + rate (theta - phi) on every LoRA tensor; phi starts as the policy's init (the base model)."""
    args, models = setup(TINY_SD, pairs_file)
    unet = models.unet
    with dpo.reference_unet(unet):  # finds the LoRA layers and weights before the second adapter exists
        pass
    reference = dpo.ReferenceLoRA(unet, rate=0.3)
    policy, ref = lora_params(unet, "default"), lora_params(unet, "ref")
    assert len(dpo.lora_parts(unet)[1]) == len(policy) + len(ref)  # found again with the new adapter
    assert len(policy) == len(ref) > 0
    assert all(p.requires_grad for p in policy.values()) and not any(p.requires_grad for p in ref.values())
    assert all(torch.equal(ref[n.replace(".default.", ".ref.")], p) for n, p in policy.items())
    for step in range(2):
        with torch.no_grad():
            for p in policy.values():
                p.add_(torch.randn_like(p) * 0.1)  # an optimizer step
        old = {n: p.clone() for n, p in ref.items()}
        reference.update()
        for name, p in policy.items():
            key = name.replace(".default.", ".ref.")
            torch.testing.assert_close(ref[key], old[key] + 0.3 * (p - old[key]), rtol=1e-6, atol=1e-8)

    cond = dpo.encode_prompts(models, ["a cat"], args.resolution, negative=False)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    reference.rate = 1.0  # the reference follows the policy: the "ref" adapter then computes the policy's output
    reference.update()
    with torch.no_grad():
        expected = unet(x, t, **cond).sample
    with dpo.reference_unet(unet, reference.adapter):
        followed = unet(x, t, **cond).sample
    torch.testing.assert_close(followed, expected, atol=1e-5, rtol=1e-5)
    assert unet.active_adapters() == ["default"]
    assert all(p.requires_grad for p in policy.values()) and not any(p.requires_grad for p in ref.values())
    state = reference.state_dict()
    reference.load_state_dict({k: torch.zeros_like(v) for k, v in state.items()})
    assert all(p.abs().sum() == 0 for p in ref.values())


def test_online_rounds_log_pairs_and_resume_with_the_reference(tmp_path):
    out = str(tmp_path / "online")
    common = dict(online=True, images_per_prompt=2, prompts_per_round=2, steps_per_round=1, ref_update_rate=0.5,
                  checkpointing_steps=2, num_eval_prompts=1, cache_prompt_embeds=True)
    row = dpo.main(dpo.parse_args(tiny_argv(TINY_SD, out, **common)))
    rows = read_metrics(out)
    assert [r.get("round") for r in rows] == [None, 1, 2]
    for r in rows[1:]:
        assert r["pair_margin"] > 0 and 1 <= r["pairs_kept"] <= 2 and "eval_reward" in r and "implicit_acc" in r
    assert row["step"] == 2
    assert os.path.exists(os.path.join(out, "checkpoint-2", "reference_lora.safetensors"))  # no pickle
    dpo.main(dpo.parse_args(tiny_argv(TINY_SD, out, resume_from_checkpoint="latest", max_train_steps=3, **common)))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line).get("round") for line in f] == [None, 1, 2, 3]


def test_a_round_without_pairs_stops_with_a_clear_error(tmp_path):
    args = dpo.parse_args(tiny_argv(TINY_SD, str(tmp_path / "x"), online=True, images_per_prompt=2,
                                    prompts_per_round=1, pair_margin=1e9, num_inference_steps=1, num_eval_prompts=1))
    with pytest.raises(RuntimeError, match="no pair with a reward gap above --pair_margin"):
        dpo.main(args)


# --- the CLI ------------------------------------------------------------------------------------------

def test_cli_offline_writes_outputs_and_lora_loads_in_diffusers(tiny_model, pairs_file, tmp_path):
    out = str(tmp_path / "run")
    data = dict(streaming=True, dataloader_num_workers=1, random_flip=True) if tiny_model == TINY_SD else {}
    argv = tiny_argv(tiny_model, out, dataset_name=pairs_file, max_train_steps=2, learning_rate=0.05,
                     validation_steps=1, checkpointing_steps=1, checkpoints_total_limit=1, **data)
    rows = run_cli("dpo.py", argv, tmp_path)
    for key in ("step", "loss", "implicit_acc", "model_error_w", "model_error_l", "ref_error_w", "ref_error_l",
                "grad_norm", "lr", "seconds", "peak_memory_mb", "ties_skipped", "corrupt_skipped", "eval_reward"):
        assert key in rows[-1], key
    assert rows[-1]["ties_skipped"] >= 1 and rows[-1]["corrupt_skipped"] >= 2
    assert lora_effect(tiny_model, out) > 1e-3  # the LoRA reloads in a diffusers pipeline and changes its images


# --- bad input: one line, before any large model loads --------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (dict(dataset_name=None), "offline DPO needs pairs"),
    (dict(dataset_name="/no/such/pairs.parquet"), "does not exist"),
    (dict(ref_update_rate=0.5), "ref_update_rate"),
    (dict(online=True, images_per_prompt=1, dataset_name=None), "images_per_prompt"),
    (dict(online=True, ref_update_rate=1.5, dataset_name=None), "ref_update_rate"),
    (dict(online=True), "pass --offline to train on the pairs"),
    (dict(preset="demo"), r"online self-rewarding is on \(--preset demo\): pass --offline"),
    (dict(beta_dpo=0), "beta_dpo"),
    (dict(cache_prompt_embeds=True), "finite prompt list"),
])
def test_bad_input_is_one_clear_error(overrides, message, pairs_file, tmp_path):
    args = dpo.parse_args(tiny_argv(TINY_SD, str(tmp_path), **dict(dict(dataset_name=pairs_file), **overrides)))
    with pytest.raises(dpo.UsageError, match=message):
        dpo.check_arguments(args)


def test_a_preset_yields_the_flags_of_a_mode_switched_off_on_the_command_line(pairs_file, tmp_path, capsys):
    """PRESET_MODES through the scaffold's parse_args: `--preset demo --offline --dataset_name pairs` (the demo is
    online) trains offline without the demo's online values, said in one line; the preset's other values stay; a
    flag of the mode switched off that the user typed is still checked; without the switch typed, still refused."""
    from conftest import WORLD_SD3
    out = ["--output_dir", str(tmp_path / "out")]
    args = dpo.parse_args(["--preset", "demo", "--offline", "--dataset_name", pairs_file, *out])
    line = capsys.readouterr().out.strip()
    assert line == ("--preset demo: --prompts_per_round 16, --ref_update_rate 0.5 left out: they are for online "
                    "self-rewarding DPO (--online), which the command line switched off")
    default = dpo.parse_args([])
    assert not args.online and (args.ref_update_rate, args.prompts_per_round) == (0.0, default.prompts_per_round)
    assert (args.learning_rate, args.beta_dpo, args.guidance_scale) == (2e-3, 100.0, 3.0)  # not a mode's: kept
    dpo.check_arguments(args)  # refused before: --ref_update_rate belongs to online DPO
    # the SD3 world's settings of the demo apply as well, and the same flags yield
    sd3 = dpo.parse_args(["--preset", "demo", "--pretrained_model_name_or_path", WORLD_SD3, "--offline",
                          "--dataset_name", pairs_file, *out])
    assert (sd3.learning_rate, sd3.sampler, sd3.ref_update_rate) == (5e-4, "euler", 0.0)
    # typed, a flag of the mode switched off is the user's: refused as before
    typed = dpo.parse_args(["--preset", "demo", "--offline", "--dataset_name", pairs_file, "--ref_update_rate",
                            "0.5", *out])
    with pytest.raises(dpo.UsageError, match="--ref_update_rate moves the reference between rounds of --online"):
        dpo.check_arguments(typed)
    # the mode not switched off by a flag: the preset's mode stands and the pairs are refused
    with pytest.raises(dpo.UsageError, match="pass --offline"):
        dpo.check_arguments(dpo.parse_args(["--preset", "demo", "--dataset_name", pairs_file, *out]))
    # the other way: an offline preset's pairs yield to a typed --online (the paper preset: hub data, no network here)
    online = dpo.parse_args(["--preset", "sd15-paper", "--online", *out])
    assert online.online and online.dataset_name is None and online.validation_dataset_name is None
    assert online.streaming is False and online.beta_dpo == 5000.0 and online.reward == "pickscore"
    assert "--dataset_name yuvalkirstain/pickapic_v2" in capsys.readouterr().out
    # no preset: nothing yields
    assert dpo.parse_args(["--offline", "--ref_update_rate", "0.5"]).ref_update_rate == 0.5


def test_any_reward_online_and_dataset_errors(tmp_path, monkeypatch):
    args = dpo.parse_args(tiny_argv(TINY_SD, str(tmp_path), online=True, reward="jpeg_size"))
    dpo.check_arguments(args)  # DPO needs no reward gradient
    import pyarrow as pa
    import pyarrow.parquet as pq
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"image": [b"x"], "text": ["y"]}), wrong)
    with pytest.raises(dpo.UsageError, match="no column jpg_0, jpg_1, label_0, caption"):
        dpo.open_pairs(dpo.parse_args(tiny_argv(TINY_SD, str(tmp_path), dataset_name=str(wrong))))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(dpo.UsageError, match="someone/not-cached-pairs.*--dataset_name /path"):
        dpo.open_pairs(dpo.parse_args(tiny_argv(TINY_SD, str(tmp_path), dataset_name="someone/not-cached-pairs")))


# --- the official code's details: flips, empty captions, warm-up; the timestep range ---------------------------

def halves(left, right, size=(48, 40)):
    """Encoded image bytes, its left half one color and its right half another."""
    from PIL import Image
    image = Image.new("RGB", size, left)
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_flips_and_empty_captions_are_the_official_defaults():
    import numpy as np
    args = dpo.parse_args(tiny_argv(TINY_SD, "unused"))
    assert args.random_flip and args.proportion_empty_prompts == 0.2
    assert not dpo.parse_args(tiny_argv(TINY_SD, "unused") + ["--no_random_flip"]).random_flip
    row = dict(jpg_0=halves(RED, GREEN), jpg_1=halves(BLUE, YELLOW), label_0=1.0, caption="a pair")
    examples = [dpo.load_pair(row, 32, True, True, np.random.default_rng([0, i]), 0.2) for i in range(400)]
    flipped = [color(e["pixels"][0][:, :, :4]) == GREEN for e in examples]  # the winner's left edge
    assert 0.4 < np.mean(flipped) < 0.6
    for e, f in zip(examples, flipped):
        assert color(e["pixels"][1][:, :, :4]) == (YELLOW if f else BLUE)  # the pair flips together
    # the crop's left edge is counted in the image as trained: 38 px wide after the resize, 32 px crop
    unflipped_lefts = {e["time_ids"][3] for e, f in zip(examples, flipped) if not f}
    assert unflipped_lefts == set(range(7)) and {e["time_ids"][3] for e in examples} == set(range(7))
    empty = [e["caption"] == "" for e in examples]
    assert 0.15 < np.mean(empty) < 0.25 and all(e["caption"] in ("", "a pair") for e in examples)
    same = dpo.load_pair(row, 32, True, True, np.random.default_rng([0, 7]), 0.2)  # a function of its rng alone
    assert torch.equal(same["pixels"], examples[7]["pixels"]) and same["caption"] == examples[7]["caption"]
    kept = [dpo.load_pair(row, 32, False, False, np.random.default_rng(i))["caption"] for i in range(50)]
    assert kept == ["a pair"] * 50  # proportion 0 (the default of load_pair): no empty caption


def test_sdxl_paper_warms_up_200_steps_as_the_official_sdxl_launcher():
    assert dpo.parse_args(["--preset", "sdxl-paper"]).lr_warmup_steps == 200
    assert dpo.parse_args(["--preset", "sd15-paper"]).lr_warmup_steps == 500


def test_no_sampled_timestep_leaves_the_range(pairs_file):
    args, models = setup(TINY_SD, pairs_file, timestep_range="100,200")
    seen = []
    models.unet.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    latents, scheduler = torch.randn(4, 4, 8, 8), noise_scheduler(TINY_SD)
    for i in range(25):
        dpo.algorithm_loss(models, scheduler, models.unet, latents, ["a cat", "a dog"], None,
                           torch.Generator().manual_seed(i), args)
    timesteps = torch.cat(seen)  # policy and reference calls, 2 pairs x 2 each
    assert len(timesteps) == 25 * 2 * 4 and timesteps.min() >= 100 and timesteps.max() < 200
    assert len(set(timesteps.tolist())) > 30  # spread over the range, not stuck at one end
    draws = dpo.noised(scheduler, torch.randn(2000, 4, 2, 2), torch.Generator().manual_seed(0), 1, (0, 600))[1]
    assert draws.min() >= 0 and draws.max() == 599  # LO <= t < HI
    args.timestep_range = None  # the default: every training timestep, the draws of before the option
    torch.testing.assert_close(dpo.noised(scheduler, latents, torch.Generator().manual_seed(3), 2)[1],
                               dpo.noised(scheduler, latents, torch.Generator().manual_seed(3), 2,
                                          dpo.training_timesteps(args, 1000))[1])


@pytest.mark.parametrize("value,message", [("600,100", "need 0 <= LO < HI <= 1000"), ("0,5000", "<= 1000"),
                                           ("low,high", "give LO,HI"), ("600", "give LO,HI")])
def test_bad_timestep_range_is_one_clear_error(value, message, pairs_file, tmp_path):
    args = dpo.parse_args(tiny_argv(TINY_SD, str(tmp_path), dataset_name=pairs_file, timestep_range=value))
    with pytest.raises(dpo.UsageError, match=f"--timestep_range {value}: .*{message}"):
        dpo.check_arguments(args)


def test_factor_average_reference_against_the_weight_change_average(pairs_file):
    """The reference averages A and B separately (ReferenceLoRA): each update differs from the exact average of the
    reference's and the policy's weight changes by exactly -rate (1 - rate) (B_phi - B_theta)(A_phi - A_theta), and
    after 5 rounds of 10 AdamW steps (lr 1e-4, rate 0.1) it is within 1 % (measured: 0.2 %) of the exact moving
    average of the policy's weight changes."""
    rate = 0.1
    args, models = setup(TINY_SD, pairs_file, online=True, ref_update_rate=rate, dataset_name=None)
    unet, scheduler = models.unet, noise_scheduler(TINY_SD)
    reference = dpo.ReferenceLoRA(unet, rate)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    generator, latents = torch.Generator().manual_seed(0), torch.randn(4, 4, 8, 8)
    factors = {name.replace("lora_A", "lora_B"): name for name in reference.pairs if "lora_A" in name}  # B -> A
    scale = unet.peft_config["default"].lora_alpha / unet.peft_config["default"].r

    def weight_changes(which):  # the reference's (0) or the policy's (1) s B A of every LoRA layer
        return {b: scale * reference.pairs[b][which].detach() @ reference.pairs[a][which].detach()
                for b, a in factors.items()}

    exact = weight_changes(0)  # the moving average of the policy's weight changes, kept dense
    for _ in range(5):
        for _ in range(10):
            loss, _ = dpo.algorithm_loss(models, scheduler, unet, latents, ["a cat", "a dog"], None, generator, args,
                                         reference)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        before = {name: (ref.clone(), policy.detach().clone()) for name, (ref, policy) in reference.pairs.items()}
        ref_change, policy_change = weight_changes(0), weight_changes(1)
        reference.update()
        after = weight_changes(0)
        for b, a in factors.items():
            gap = scale * (before[b][0] - before[b][1]) @ (before[a][0] - before[a][1])
            torch.testing.assert_close(after[b], (1 - rate) * ref_change[b] + rate * policy_change[b]
                                       - rate * (1 - rate) * gap, atol=1e-7, rtol=1e-5)
            exact[b] = (1 - rate) * exact[b] + rate * policy_change[b]
    error = sum((after[b] - exact[b]).square().sum() for b in factors).sqrt()
    size = sum(exact[b].square().sum() for b in factors).sqrt()
    assert size > 0 and error / size < 0.01, float(error / size)


# --- offline evaluation: held-out pairs, a reward only when asked for -----------------------------------------

def test_offline_run_without_reward_loads_no_reward_model(pairs_file, tmp_path, monkeypatch):
    def no_reward(*args, **kwargs):
        raise AssertionError("offline DPO without --reward loaded a reward model")

    monkeypatch.setattr(dpo.rewards, "build_reward", no_reward)
    out = str(tmp_path / "run")
    argv = tiny_argv(TINY_SD, out, reward=None, dataset_name=pairs_file, validation_dataset_name=pairs_file,
                     max_train_steps=2, validation_steps=1, learning_rate=0.05)
    args = dpo.parse_args(argv)
    assert args.reward is None
    dpo.main(args)
    rows = read_metrics(out)
    assert all("eval_reward" not in r for r in rows)
    assert rows[0]["step"] == 0 and rows[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert rows[0]["eval_implicit_acc"] == 0 and all("eval_loss" in r and "eval_implicit_acc" in r for r in rows)
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]
    assert os.path.exists(os.path.join(out, "samples", "step-000002.png"))  # the grids are still there
    with pytest.raises(dpo.UsageError, match="--online ranks each round's samples with a reward: give --reward"):
        dpo.check_arguments(dpo.parse_args(tiny_argv(TINY_SD, str(tmp_path / "x"), reward=None, online=True)))


def test_validation_pairs_are_the_first_readable_pairs_with_a_preference(pairs_file):
    args, models = setup(TINY_SD, pairs_file, num_validation_pairs=8)
    data = dpo.open_pairs(args, pairs_file, None, "--validation_dataset_name")
    pairs = dpo.validation_pairs(models, data, args)
    assert pairs["captions"] == ["red beats green", "blue beats yellow"]  # the tie and unreadable rows left out
    assert pairs["winners"].shape == pairs["losers"].shape == (2, 4, 8, 8)
    first = dpo.validate(models, noise_scheduler(TINY_SD), models.unet, pairs, args)
    assert first == dpo.validate(models, noise_scheduler(TINY_SD), models.unet, pairs, args)  # fixed noise and t
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
