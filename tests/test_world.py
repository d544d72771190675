"""The tiny world: its generator and pixel check, the shipped pipeline and reward models, the build script, the
check of how well a pipeline draws it (check_world.py) on every model family."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import rewards
from conftest import ROOT, WORLD_CLIP, WORLD_REWARD_OPTIONS, WORLD_SD, WORLD_SD3
from test_lora_files import assert_model_card

sys.path.insert(0, os.path.join(ROOT, "tiny_models"))
import check_world  # noqa: E402
import world  # noqa: E402


def test_scenes_are_deterministic_and_follow_the_grammar():
    a, b = world.sample_scene(123), world.sample_scene(123)
    assert a == b and np.array_equal(world.render(a), world.render(b))
    for seed in range(300):
        scene = world.sample_scene(seed)
        parsed = world.parse(world.caption(scene))
        assert parsed["background"] == scene["background"]
        assert [(s["color"], s["shape"], s["position"]) for s in parsed["shapes"]] == \
               [(s["color"], s["shape"], s["position"]) for s in scene["shapes"]]
        assert all((s["color"], s["shape"]) not in world.HELD_OUT for s in scene["shapes"])  # training scenes
    held = [world.sample_scene(seed, held_out="only") for seed in range(20)]
    assert all((s["color"], s["shape"]) in world.HELD_OUT for scene in held for s in scene["shapes"])


def test_world_json_is_the_vocabulary():
    with open(os.path.join(ROOT, "tiny_models", "world.json")) as f:
        assert json.load(f) == json.loads(json.dumps(world.vocabulary()))


def test_pixel_check_reads_the_rendered_scenes_and_rejects_wrong_captions():
    images, captions, _ = world.dataset(range(400))

    def rates(pairs):
        checks = [world.check(image, text) for image, text in pairs]
        return {m: np.mean([c[m] for c in checks if c[m] is not None]) for m in checks[0]}

    right = rates(zip(images, captions))
    assert min(right.values()) >= 0.97, right
    wrong = rates(zip(images, captions[1:] + captions[:1]))  # another scene's caption
    assert wrong["background"] < 0.3 and wrong["color"] < 0.3 and wrong["colors_pair"] < 0.2, wrong
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    one, two = (next(c for c in captions if (" and " in c) == pair) for pair in (False, True))
    assert not any(world.check(noise, one)[m] for m in ("color", "shape"))
    assert not world.check(noise, two)["colors_pair"]


def test_read_grid_measures_symmetry_and_drawn_prompts_of_a_before_after_grid(tmp_path):
    """A grid laid out as the scripts save it: "before" = rendered scenes, "after" = the same made mirror-symmetric
    (left half mirrored) and one blanked to its background color: eq. 6 error 0 after, drawn 2 of 3."""
    from PIL import Image
    images, captions, _ = world.dataset(range(3))
    after = [np.concatenate([im[:, :16], im[:, :16][:, ::-1]], 1) for im in images]
    after[2] = np.broadcast_to(images[2][0, 0], images[2].shape).copy()  # the border's color everywhere
    grid = np.concatenate([np.concatenate(images, 1), np.concatenate(after, 1)], 0)
    Image.fromarray(grid).save(tmp_path / "grid.png")
    result = world.read_grid(tmp_path / "grid.png", captions)
    x = images[0].astype(np.float64) / 255
    assert result["before"]["symmetry"][0] == pytest.approx(np.abs(x - x[:, ::-1]).mean() / np.sqrt(x.var() + 1e-6))
    assert result["before"]["symmetry"][0] > 0.05 and result["after"]["symmetry"][:2] == [0.0, 0.0]
    assert result["before"]["drawn"] == [True] * 3 and result["after"]["drawn"][2] is False


def test_shipped_pipeline_draws_the_prompted_background_in_plain_diffusers():
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(WORLD_SD)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a white circle on a red background", "a yellow square on a blue background",
               "a black triangle on a green background", "a purple circle on a yellow background",
               "a orange square on a black background", "a red triangle on a white background"]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=6.0, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert sum(world.check(image, text)["background"] for image, text in zip(images, prompts)) >= 5


def test_shipped_pipeline_draws_well_at_its_own_scheduler_and_the_pipelines_defaults():
    """A user's first call: StableDiffusionPipeline.from_pretrained and pipe(prompts) at the pipeline's defaults (its
    shipped scheduler, 50 steps, CFG 7.5). With SD1.5's PNDM, which the world shipped before, the background came out
    right for 5 of these 16 prompts; with the shipped DDIM, for every one."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(WORLD_SD)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    prompts = check_world.eval_prompts(16, "any")  # held-out scene seeds
    images = pipe(prompts, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    rates = check_world.score([world.check(image, text) for image, text in zip(images, prompts)])
    assert rates["background"][0] >= 15 / 16 and rates["color"][0] >= 0.85, rates


def test_shipped_sd3_world_draws_the_prompted_shape_color_in_plain_diffusers():
    """The SD3 world as a user loads it (no T5: text_encoder_3=None, tokenizer_3=None; 77 T5 tokens, as trained)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(WORLD_SD3, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a white circle on a red background", "a yellow square on a blue background",
               "a black triangle on a green background", "a purple circle on a yellow background",
               "a orange square on a black background", "a red triangle on a white background"]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=4.0, height=32, width=32, output_type="np",
                  max_sequence_length=77, generator=torch.Generator().manual_seed(0)).images
    checks = [world.check(image, text) for image, text in zip(images, prompts)]
    assert sum(c["background"] for c in checks) >= 5 and sum(c["color"] for c in checks) >= 5


@pytest.fixture(scope="module")
def world_reward():
    return rewards.build_reward("pickscore:1,clipscore:1,hpsv21:1,aesthetic:1", **WORLD_REWARD_OPTIONS)


def test_world_clip_ranks_the_matching_caption_first(world_reward):
    images, captions, _ = world.dataset(range(10**7, 10**7 + 32), held_out="any")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    world_reward(x, captions)
    right = world_reward.last_raw
    world_reward(x, captions[1:] + captions[:1])
    wrong = world_reward.last_raw
    for name in ("pickscore", "clipscore"):
        assert (right[name] > wrong[name]).float().mean() >= 0.9, name
    # one model, two layouts: open_clip's cosine (clipscore, hpsv21) is transformers' (pickscore / logit scale)
    from transformers import CLIPModel
    scale = CLIPModel.from_pretrained(WORLD_CLIP).logit_scale.exp().item()
    torch.testing.assert_close(right["clipscore"], right["pickscore"] / scale, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(right["hpsv21"], right["clipscore"])


def test_world_aesthetic_prefers_one_large_centered_shape(world_reward):
    clean = dict(background="black", texture=None,
                 shapes=[dict(color="yellow", shape="circle", position=None, size=0.55, x=0.5, y=0.5)])
    cluttered = dict(background="purple", texture=dict(kind="noise", seed=0, amplitude=0.12),
                     shapes=[dict(color="red", shape="triangle", position=None, size=0.28, x=0.2, y=0.2),
                             dict(color="blue", shape="square", position=None, size=0.28, x=0.78, y=0.8)])
    x = torch.from_numpy(np.stack([world.render(clean), world.render(cluttered)])).permute(0, 3, 1, 2).float() / 255
    world_reward(x, [world.caption(clean), world.caption(cluttered)])
    score = world_reward.last_raw["aesthetic"]
    assert score[0] > score[1] + 2, score  # on the world's 1..10 quality scale


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    """build_world.py --smoke: a few steps of every phase on a small subset; (its work folder, its out folder)."""
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out")
    subprocess.run([sys.executable, os.path.join(ROOT, "tiny_models", "build_world.py"), "--smoke", "--work",
                    str(work), "--out", str(out)], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    return work, out


def test_build_script_smoke(smoke_build):
    """The outputs of the smoke build load as the shipped ones do."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    work, out = smoke_build
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(out / "world-sd15")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # the scheduler the shipped world draws well with
    clip = out / "world-clip"
    reward = rewards.build_reward(
        "clipscore:1,pickscore:1,aesthetic:1", clip_model=str(clip / "open_clip_config.json"),
        clip_pretrained=str(clip / "open_clip_model.pt"), pickscore_model=str(clip), pickscore_processor=str(clip),
        aesthetic_clip=str(clip), aesthetic_mlp=str(out / "world-aesthetic.safetensors"))
    assert torch.isfinite(reward(torch.rand(2, 3, 32, 32), ["a red circle on a blue background"] * 2)).all()
    # a finished phase is skipped when the build runs again
    log = subprocess.run([sys.executable, os.path.join(ROOT, "tiny_models", "build_world.py"), "--smoke",
                          "--work", str(work), "--out", str(out), "--phases", "vae,clip"],
                         check=True, env=env, timeout=300, capture_output=True, text=True).stdout
    assert "vae: done already" in log and "clip: done already" in log


@pytest.mark.parametrize("model,samplers,sequence", [
    ("world-sd3", ["euler"], 77),  # StableDiffusion3Pipeline without T5: its own Euler scheduler, 77 T5 tokens
    ("world-sd15", ["ddpm", "ddim"], None),
    ("flux", ["euler"], None),  # the tiny random FLUX: the pipeline's own T5 length
    ("sdxl", ["ddpm", "ddim"], None),
])
def test_check_world_runs_on_every_family(model, samplers, sequence, smoke_build, monkeypatch):
    """check_world.evaluate on 2 prompts of each set: the family's pipeline and samplers, the metrics of every
    sampler and set (the mechanics only: the smoke build's few steps and the random models draw nothing)."""
    path = os.path.join(smoke_build[1] if model.startswith("world") else os.path.join(ROOT, "tiny_models"), model)
    calls, generate = [], check_world.generate

    def spy(pipe, prompts, guidance_scale, steps, seed, max_sequence_length=None):
        calls.append((type(pipe.scheduler).__name__, max_sequence_length))
        return generate(pipe, prompts, guidance_scale, steps, seed, max_sequence_length)

    monkeypatch.setattr(check_world, "generate", spy)
    results = check_world.evaluate(path, num_prompts=2, num_held_out=2, steps=2)
    assert list(results) == [f"{s}/{name}" for s in samplers for name in ("mixed", "held_out")]
    for row in results.values():
        assert set(row) == {*check_world.METRICS, "cpu_seconds"}
        assert all(0 <= row[m][0] <= 1 or np.isnan(row[m][0]) for m in check_world.METRICS)
    schedulers = dict(euler="FlowMatchEulerDiscreteScheduler", ddpm="DDPMScheduler", ddim="DDIMScheduler")
    assert calls == [(schedulers[s], sequence) for s in samplers for _ in range(2)]


@pytest.mark.parametrize("world_model,argv,message", [
    ("world-sd3", ["--samplers", "ddim"], "--samplers ddim: StableDiffusion3Pipeline samples with euler"),
    ("world-sd3", ["--max_sequence_length", "600"], "--max_sequence_length must be in 1..512"),
    ("world-sd15", ["--max_sequence_length", "77"], "--max_sequence_length: StableDiffusionPipeline takes 77 CLIP"),
    ("no-such-folder", [], "no model_index.json"),
])
def test_check_world_bad_input_is_one_line(world_model, argv, message, smoke_build, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_world.main(["--pipeline", str(smoke_build[1] / world_model), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("check_world.py: error: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("world_name", ["sd15", "sd3"])
@pytest.mark.parametrize("script", ["drtune.py", "refl.py", "draft.py", "alignprop.py", "dpo.py", "spo.py", "grpo.py"])
def test_every_demo_preset_runs_on_the_world(script, world_name, tmp_path):
    """`--preset demo` as a user runs it (one step here): the world pipeline, its prompt files and reward models; on
    the SD3 world (--pretrained_model_name_or_path tiny_models/world-sd3) the preset's sd3 settings apply."""
    out = tmp_path / "out"
    model = [] if world_name == "sd15" else ["--pretrained_model_name_or_path", WORLD_SD3]
    subprocess.run([sys.executable, os.path.join(ROOT, script), "--preset", "demo", "--output_dir", str(out), *model,
                    "--max_train_steps", "1", "--validation_steps", "1", "--num_eval_prompts", "2", "--report_to",
                    "none"], check=True, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["pretrained_model_name_or_path"] == (WORLD_SD if world_name == "sd15" else WORLD_SD3)
    assert config["resolution"] == 32
    if world_name == "sd3":
        assert (config["sampler"], config["max_sequence_length"]) == ("euler", 77)
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "samples" / "before_after.png").exists()
    card = assert_model_card(out, script, config)  # README.md and lora_kohya.safetensors (tests/test_lora_files.py)
    assert f"python {script} --preset demo --output_dir" in card.text  # the command as typed
    if world_name == "sd3":  # how to load the world without T5, as the README says
        assert "text_encoder_3=None, tokenizer_3=None" in card.text and "max_sequence_length=77" in card.text
