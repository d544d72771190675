"""ReFL as its paper has it: the pre-training loss of ImageReward's Alg. 2 (--pretrain_dataset,
--pretrain_loss_weight) on local image-caption pairs, and ImageReward as refl-official's reward, on the tiny
pipelines and a tiny ImageReward."""
import json

import numpy as np
import pytest
import torch
from conftest import TINY_SD, TINY_SDXL, read_metrics, tiny_argv
from diffusers import DDPMScheduler
from PIL import Image

import refl
import tiny_rewards

CPU = torch.device("cpu")
CAPTIONS = ["a red square", "a blue ball", "a wide green field"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pattern(width, height):
    """An image whose central square (what the center crop keeps) is blue and the rest red."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[..., 0] = 255
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    array[top:top + side, left:left + side] = [0, 0, 255]
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """datasets' imagefolder layout: images and a metadata.jsonl with file_name and text."""
    folder = tmp_path_factory.mktemp("pairs")
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (caption, size) in enumerate(zip(CAPTIONS, [(48, 48), (40, 64), (96, 48)])):
            pattern(*size).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory):
    """One parquet file: encoded JPEG bytes in `jpg`, the caption in `caption` (webdataset-style names)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = []
    for i, caption in enumerate(CAPTIONS):
        buffer = io.BytesIO()
        pattern(64, 40).save(buffer, format="JPEG", quality=95)
        rows.append(dict(jpg=buffer.getvalue(), caption=caption))
    path = tmp_path_factory.mktemp("parquet") / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def setup(model=TINY_SD, **flags):
    args = refl.parse_args(tiny_argv(model, "unused", **flags))
    info = refl.check_arguments(args)
    models = refl.load_models(args, info, CPU, torch.float32)
    refl.add_lora(models.unet, args)
    return args, models, refl.make_scheduler(args)


@pytest.mark.parametrize("source", ["image_folder", "parquet_file"])
def test_pairs_load_resized_and_center_cropped(source, request):
    path = request.getfixturevalue(source)
    args = refl.parse_args(tiny_argv(TINY_SD, "unused", pretrain_dataset=path))
    pixels, captions, time_ids = refl.load_pretrain_batch(args, 6, torch.Generator().manual_seed(0))
    assert pixels.shape == (6, 3, 32, 32) and set(captions) <= set(CAPTIONS) and len(set(captions)) > 1
    # the center crop keeps the central square: blue, none of the red margins (the bilinear resize blurs the
    # crop's border by a pixel; JPEG a little more)
    inner = pixels[:, :, 1:-1, 1:-1]
    assert (inner[:, 0] < -0.5).all() and (inner[:, 2] > 0.5).all() and pixels.min() >= -1 and pixels.max() <= 1
    for (h, w, top, left, r1, r2), caption in zip(time_ids.tolist(), captions):
        size = {CAPTIONS[0]: (48, 48), CAPTIONS[1]: (64, 40), CAPTIONS[2]: (48, 96)}[caption]
        assert (h, w) == (size if source == "image_folder" else (40, 64)) and r1 == r2 == 32
        scale = 32 / min(h, w)
        assert (top, left) == (round((round(h * scale) - 32) / 2), round((round(w * scale) - 32) / 2))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_process_matches_diffusers(prediction_type):
    scheduler = DDPMScheduler.from_pretrained(TINY_SD, subfolder="scheduler", prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 500, 999])
    noisy, target = refl.forward_process(scheduler, latents, noise, t)
    torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, t))
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(target, expected)


class UNetInputs:
    """Every UNet call's (batch, timesteps, encoder_hidden_states, added_cond_kwargs, grad enabled)."""

    def __init__(self, unet):
        self.calls = []
        unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], args[1], kwargs["encoder_hidden_states"].detach().clone(),
                           kwargs.get("added_cond_kwargs"), torch.is_grad_enabled()))


@pytest.mark.parametrize("model", [TINY_SD, TINY_SDXL], ids=["sd15", "sdxl"])
def test_pretrain_loss_is_the_extra_update(model, image_folder):
    """Off: no extra update, and the reward loss is ReFL's alone. On: w * the denoising loss of a real batch, whose
    UNet call runs with gradient on the captions (no guidance) at per-image training timesteps."""
    args, models, scheduler = setup(model, stop_range=2)
    reward_fn = refl.rewards.build_reward(args.reward)
    assert refl.extra_update_loss(models, scheduler, models.unet, torch.Generator().manual_seed(0), args) is None
    loss, reward, extra = refl.algorithm_loss(models, scheduler, models.unet, reward_fn, ["a cat", "a dog"],
                                              torch.Generator().manual_seed(0), args)
    torch.testing.assert_close(loss, -reward.mean())
    assert "pretrain_loss" not in extra

    args.pretrain_dataset, args.pretrain_loss_weight = image_folder, 0.5
    unet = UNetInputs(models.unet)
    loss, metrics = refl.extra_update_loss(models, scheduler, models.unet, torch.Generator().manual_seed(0), args)
    pre = refl.pretrain_loss(models, scheduler, models.unet, args, torch.Generator().manual_seed(0))
    assert metrics == {"pretrain_loss": pytest.approx(pre.item())} and pre.item() > 0
    torch.testing.assert_close(loss, 0.5 * pre)

    batch, t, states, added, grad = unet.calls[0]  # the one UNet call of the denoising loss
    assert len(unet.calls) == 2 and batch == 2 and grad and t.shape == (2,) and (t >= 0).all() and (t < 1000).all()
    encoded = {c: refl.encode_prompts(models, [c], args.resolution)["encoder_hidden_states"][1] for c in CAPTIONS}
    assert all(any(torch.allclose(s, e) for e in encoded.values()) for s in states)  # conditioned on captions
    if model == TINY_SDXL:  # each real image's own size and crop, not the generated images' time ids
        assert added["time_ids"][:, :2].tolist() != [[32, 32], [32, 32]]

    models.unet.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.unet.parameters() if p.requires_grad)


class OptimizerSteps:
    """The gradients of the LoRA parameters at every AdamW step, as the step sees them (after clipping)."""

    def __init__(self, monkeypatch):
        self.grads = []
        step = torch.optim.AdamW.step

        def record(optimizer, *args, **kwargs):
            self.grads.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])
            return step(optimizer, *args, **kwargs)

        monkeypatch.setattr(torch.optim.AdamW, "step", record)


def test_alg2_takes_a_pretrain_step_then_a_reward_step(image_folder, tmp_path, monkeypatch):
    """With --pretrain_dataset each iteration takes two optimizer steps; the first one's gradient is autograd's of
    w x the denoising loss alone (no reward loss in it), over the step's micro-batches, from the step's generator."""
    steps = OptimizerSteps(monkeypatch)
    argv = tiny_argv(TINY_SD, str(tmp_path / "run"), stop_range=2, pretrain_dataset=image_folder,
                     pretrain_loss_weight=0.1, max_train_steps=2, gradient_accumulation_steps=2, max_grad_norm=1e9)
    row = refl.main(refl.parse_args(argv))
    assert len(steps.grads) == 4  # 2 iterations x (pre-training step, reward step)

    # the first step again, by hand: main's LoRA init and step generator, w x L_pre of two micro-batches, averaged
    from accelerate.utils import set_seed
    args = refl.parse_args(argv)
    models, scheduler = refl.load_models(args, refl.check_arguments(args), CPU, torch.float32), refl.make_scheduler(args)
    set_seed(args.seed)  # as main() before add_lora
    params = refl.add_lora(models.unet, args)
    generator = refl.step_generator(args, 0, 1)
    for _ in range(2):
        loss, _ = refl.extra_update_loss(models, scheduler, models.unet, generator, args)
        (loss / 2).backward()
    for expected, got in zip([p.grad for p in params], steps.grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in steps.grads[0])
    assert not all(torch.allclose(a, b) for a, b in zip(steps.grads[0], steps.grads[1]))  # the reward step's differs

    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2]  # one row per iteration, both updates in it
    assert row["pretrain_loss"] > 0 and row["extra_grad_norm"] > 0 and row["grad_norm"] > 0
    assert row["loss"] == pytest.approx(-row["reward_mean"], rel=1e-5)  # the reward update's loss alone
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["pretrain_dataset"] == image_folder


def test_without_pretrain_one_step_per_iteration(tmp_path, monkeypatch):
    steps = OptimizerSteps(monkeypatch)
    row = refl.main(refl.parse_args(tiny_argv(TINY_SD, str(tmp_path / "run"), stop_range=2, max_train_steps=2)))
    assert len(steps.grads) == 2 and row["skipped"] is False  # one step per iteration: the reward update
    for logged in read_metrics(tmp_path / "run"):
        assert "pretrain_loss" not in logged and "extra_grad_norm" not in logged


def test_pretrain_is_off_by_default():
    for preset in ("paper", "refl-official", "demo"):
        args = refl.parse_args(["--preset", preset])
        assert args.pretrain_dataset is None


@pytest.mark.parametrize("flags, message", [
    (dict(pretrain_dataset="/no/such/folder"), "--pretrain_dataset: local path '/no/such/folder' does not exist"),
    (dict(pretrain_dataset="FOLDER_WITHOUT_CAPTIONS"), "need image-caption pairs.*found 1 rows of image"),
    (dict(pretrain_loss_weight=0), "--pretrain_loss_weight 0"),
])
def test_bad_pretrain_input_is_one_clear_error(flags, message, tmp_path):
    if flags.get("pretrain_dataset") == "FOLDER_WITHOUT_CAPTIONS":
        pattern(32, 32).save(tmp_path / "only.png")
        flags = dict(pretrain_dataset=str(tmp_path))
    args = refl.parse_args(tiny_argv(TINY_SD, str(tmp_path / "out"), stop_range=2, **flags))
    with pytest.raises(refl.UsageError, match=message):
        refl.check_arguments(args)


def test_pretrain_hub_id_offline(monkeypatch, tmp_path):
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    args = refl.parse_args(tiny_argv(TINY_SD, str(tmp_path / "out"), stop_range=2,
                                     pretrain_dataset="nobody/no-such-pairs"))
    with pytest.raises(refl.UsageError, match="could not load 'nobody/no-such-pairs'.*--pretrain_dataset /path/"):
        refl.check_arguments(args)


# --- ImageReward, the reward ReFL was built for ------------------------------------------------------------

def test_refl_official_uses_imagereward():
    assert refl.parse_args(["--preset", "refl-official"]).reward == "imagereward"
    assert refl.parse_args(["--preset", "paper"]).reward == "hpsv21"  # the DRTune paper's unified setting


def test_refl_step_with_imagereward(tmp_path):
    """One ReFL trajectory scored by a tiny ImageReward: the official relu(2 - r) loss, gradient to the LoRA."""
    checkpoint, tokenizer = tiny_rewards.build_imagereward(tmp_path)
    args, models, scheduler = setup(stop_range=2, loss="relu", relu_margin=2.0, loss_scale=1e-3)
    reward_fn = refl.rewards.build_reward("imagereward", imagereward_checkpoint=str(checkpoint),
                                          imagereward_tokenizer=str(tokenizer))
    loss, reward, _ = refl.algorithm_loss(models, scheduler, models.unet, reward_fn, ["a cat", "a red bicycle"],
                                          torch.Generator().manual_seed(0), args)
    torch.testing.assert_close(loss, torch.relu(2 - reward).mean() * 1e-3)
    models.unet.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.unet.parameters() if p.requires_grad)
