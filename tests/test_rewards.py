"""rewards.py on tiny random models (tests/tiny_rewards.py): offline, CPU."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
import tiny_rewards

REPO = Path(rewards.__file__).resolve().parent
PROMPTS = ["a red cube", "a book on a wooden table", "two dogs playing in the snow"]
TEXT_REWARDS = ["clipscore", "pickscore", "hpsv21"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_rewards.reward_options(tmp_path_factory.mktemp("tiny_rewards"))


@pytest.fixture(scope="session")
def build(tiny):
    """build(spec, **options) -> Reward on the tiny models, each spec/options built once per session."""
    cache = {}

    def get(spec, **options):
        key = (spec, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = rewards.build_reward(spec, **{**tiny, **options})
        return cache[key]

    return get


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty hub cache; huggingface_hub reads both constants at import, so patch them too."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def random_images(n, h, w, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def mirrored(images):
    half = images[..., : images.shape[-1] // 2]
    return torch.cat([half, half.flip(-1)], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------------------------------------


def test_import_is_light():
    heavy = ["transformers", "open_clip", "kornia", "huggingface_hub"]
    code = f"import rewards, sys; loaded = {heavy!r}; assert not [m for m in loaded if m in sys.modules]"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_registry():
    paper = {"aesthetic", "clipscore", "pickscore", "hpsv21", "symmetry", "compressibility", "objectness"}
    assert paper <= set(rewards.REWARDS)
    assert {name for name, info in rewards.REWARDS.items() if info.minimized} == {
        "symmetry", "compressibility", "objectness", "jpeg_size"}
    assert rewards.is_differentiable("pickscore:1,symmetry:0.5")
    assert not rewards.is_differentiable("symmetry,jpeg_size")


def test_parse_spec():
    assert rewards.parse_spec("symmetry:1,clipscore:0.1") == [("symmetry", 1.0), ("clipscore", 0.1)]
    assert rewards.parse_spec(" pickscore , hpsv21:-2 ") == [("pickscore", 1.0), ("hpsv21", -2.0)]


@pytest.mark.parametrize("spec, match", [
    ("", "empty"),
    ("beauty:1", "unknown reward 'beauty'.*known: aesthetic, clipscore, pickscore"),
    ("symmetry:abc", "bad weight 'abc'"),
    ("symmetry:inf", "bad weight 'inf'"),
    ("symmetry,symmetry:2", "twice"),
])
def test_parse_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        rewards.parse_spec(spec)


def test_parse_options():
    text = "jpeg_quality=50, objectness_query=book,random_shift=true,symmetry_clip_weight=1"
    options = rewards.parse_options(text)
    expected = {"jpeg_quality": 50, "objectness_query": "book", "random_shift": True, "symmetry_clip_weight": 1.0}
    assert options == expected
    assert type(options["jpeg_quality"]) is int and type(options["symmetry_clip_weight"]) is float
    assert rewards.parse_options("") == {}


@pytest.mark.parametrize("text, match", [
    ("colour=red", "unknown reward option 'colour'.*known: aesthetic_clip"),
    ("jpeg_quality=high", "expected int"),
    ("random_shift=maybe", "expected true or false"),
    ("random_shift", "not key=value"),
])
def test_parse_options_errors(text, match):
    with pytest.raises(ValueError, match=match):
        rewards.parse_options(text)


def test_build_reward_rejects_unknown_option():
    with pytest.raises(ValueError, match="unknown reward option 'quality'.*jpeg_quality"):
        rewards.build_reward("compressibility", quality=50)


def test_reward_checks_its_inputs(build):
    reward_fn = build("symmetry")
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        reward_fn(random_images(2, 8, 8), ["one"])
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        reward_fn(torch.rand(2, 8, 8), ["one", "two"])


# ---------------------------------------------------------------------------------------------------------
# Every reward: shape, gradient, row-wise prompts, any input size
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(40, 56), (64, 64)])
@pytest.mark.parametrize("name", list(rewards.REWARDS))
def test_every_reward(build, name, size):
    reward_fn = build(name)
    images = random_images(3, *size).requires_grad_()
    scores = reward_fn(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert set(reward_fn.last_raw) == {name}
    raw = reward_fn.last_raw[name]
    assert raw.shape == (3,) and not raw.requires_grad
    assert reward_fn.differentiable == rewards.REWARDS[name].differentiable
    if reward_fn.differentiable:
        (grad,) = torch.autograd.grad(scores.sum(), images)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    for i in range(3):  # image i against prompt i: the same score alone as in the mixed batch
        alone = reward_fn(images[i : i + 1].detach(), PROMPTS[i : i + 1])
        torch.testing.assert_close(alone, scores[i : i + 1].detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TEXT_REWARDS)
def test_text_rewards_use_the_prompt(build, name):
    images = random_images(1, 32, 32).expand(2, -1, -1, -1)
    scores = build(name)(images, PROMPTS[:2])
    assert (scores[0] - scores[1]).abs() > 1e-4


def test_dtype(tiny, build):
    images = random_images(2, 48, 48)
    reward_fn = rewards.build_reward("pickscore", dtype=torch.bfloat16, **tiny)
    scores = reward_fn(images, PROMPTS[:2])
    assert scores.dtype == torch.float32 and reward_fn.last_raw["pickscore"].dtype == torch.float32
    torch.testing.assert_close(scores, build("pickscore")(images, PROMPTS[:2]), rtol=0.05, atol=0.05)


def test_random_shift(build):
    images = random_images(2, 64, 64).requires_grad_()
    reward_fn = build("clipscore", random_shift=True)
    torch.manual_seed(0)
    shifted = reward_fn(images, PROMPTS[:2])
    torch.manual_seed(0)
    torch.testing.assert_close(reward_fn(images, PROMPTS[:2]), shifted)
    assert not torch.allclose(shifted, build("clipscore")(images, PROMPTS[:2]))
    (grad,) = torch.autograd.grad(shifted.sum(), images)
    assert grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Checkpoint layouts and hand computations (32x32 inputs: the tiny models' size, so only mean/std apply)
# ---------------------------------------------------------------------------------------------------------

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_matches_hand_computation(tiny, tmp_path, suffix):
    from transformers import CLIPModel

    mlp = tiny_rewards.build_aesthetic_mlp(tmp_path / f"aesthetic{suffix}")
    reward_fn = rewards.build_reward("aesthetic", **{**tiny, "aesthetic_mlp": str(mlp)})
    images = random_images(2, 32, 32)
    clip = CLIPModel.from_pretrained(tiny["aesthetic_clip"]).eval()
    state_dict = torch.load(tiny["aesthetic_mlp"], weights_only=True)  # same seed, same weights
    with torch.no_grad():
        embeds = clip.get_image_features(pixel_values=(images - CLIP_MEAN) / CLIP_STD).pooler_output
        hidden = F.normalize(embeds, dim=-1)
        for i in (0, 2, 4, 6, 7):  # the published head: linear layers only, dropouts between
            hidden = hidden @ state_dict[f"layers.{i}.weight"].T + state_dict[f"layers.{i}.bias"]
    torch.testing.assert_close(reward_fn(images, ["", ""]), hidden.squeeze(-1), rtol=1e-4, atol=1e-5)


def test_aesthetic_mlp_is_loaded_strictly(tiny, tmp_path):
    state_dict = torch.load(tiny["aesthetic_mlp"], weights_only=True)
    state_dict["layers.1.weight"] = torch.zeros(1)
    torch.save(state_dict, tmp_path / "other.pth")
    with pytest.raises(rewards.RewardLoadError, match="other.pth.*is not a LAION aesthetic head"):
        rewards.build_reward("aesthetic", **{**tiny, "aesthetic_mlp": str(tmp_path / "other.pth")})
    state_dict = torch.load(tiny["aesthetic_mlp"], weights_only=True)
    state_dict["layers.0.weight"] = state_dict["layers.0.weight"][:, :512]  # a head for another CLIP width
    torch.save(state_dict, tmp_path / "narrow.pth")
    with pytest.raises(rewards.RewardLoadError, match="does not fit CLIP"):
        rewards.build_reward("aesthetic", **{**tiny, "aesthetic_mlp": str(tmp_path / "narrow.pth")})


def test_aesthetic_relu_head_needs_the_option_and_matches_hand_computation(tiny, tmp_path):
    """LAION's ava+logos-l14-reluMSE.pth: a ReLU after each hidden Linear, so its keys are layers.0/3/6/9/11."""
    from transformers import CLIPModel

    mlp = tiny_rewards.build_aesthetic_mlp(tmp_path / "relu.pth", head="relu")
    with pytest.raises(rewards.RewardLoadError, match="is the relu head.*aesthetic_head=relu"):
        rewards.build_reward("aesthetic", **{**tiny, "aesthetic_mlp": str(mlp)})
    with pytest.raises(rewards.RewardLoadError, match="is the linear head.*aesthetic_head=linear"):
        rewards.build_reward("aesthetic", **{**tiny, "aesthetic_head": "relu"})
    with pytest.raises(ValueError, match="aesthetic_head='tanh'"):
        rewards.check_options("aesthetic", {"aesthetic_head": "tanh"})
    reward_fn = rewards.build_reward("aesthetic", **{**tiny, "aesthetic_mlp": str(mlp), "aesthetic_head": "relu"})
    images = random_images(2, 32, 32)
    clip = CLIPModel.from_pretrained(tiny["aesthetic_clip"]).eval()
    state_dict = torch.load(mlp, weights_only=True)
    with torch.no_grad():
        embeds = clip.get_image_features(pixel_values=(images - CLIP_MEAN) / CLIP_STD).pooler_output
        hidden = F.normalize(embeds, dim=-1)
        for i in (0, 3, 6, 9, 11):
            hidden = hidden @ state_dict[f"layers.{i}.weight"].T + state_dict[f"layers.{i}.bias"]
            hidden = hidden.relu() if i != 11 else hidden
    torch.testing.assert_close(reward_fn(images, ["", ""]), hidden.squeeze(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["clipscore", "hpsv21"])
def test_open_clip_rewards_match_hand_computation(tiny, build, name):
    import open_clip

    model = open_clip.create_model(tiny["hps_model"], pretrained=tiny["hps_checkpoint"]).eval()
    tokens = open_clip.get_tokenizer(tiny["hps_model"])(PROMPTS[:2])
    images = random_images(2, 32, 32)
    with torch.no_grad():
        expected = F.cosine_similarity(model.encode_image((images - CLIP_MEAN) / CLIP_STD), model.encode_text(tokens))
    torch.testing.assert_close(build(name)(images, PROMPTS[:2]), expected, rtol=1e-4, atol=1e-5)


def test_open_clip_unknown_tag(tiny):
    with pytest.raises(rewards.RewardLoadError, match="'laion2b_s32b_b79k' is neither a file nor a tag of tiny"):
        rewards.build_reward("clipscore", **{**tiny, "clip_pretrained": "laion2b_s32b_b79k"})


def test_open_clip_checkpoint_is_loaded_strictly(tiny, tmp_path):
    checkpoint = torch.load(tiny["hps_checkpoint"], weights_only=True)
    del checkpoint["state_dict"]["visual.proj"]
    torch.save(checkpoint, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        rewards.build_reward("hpsv21", **{**tiny, "hps_checkpoint": str(tmp_path / "partial.pt")})


def test_pickscore_matches_hand_computation(tiny, build):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tiny["pickscore_model"]).eval()
    tokens = AutoTokenizer.from_pretrained(tiny["pickscore_processor"])(PROMPTS[:2], padding=True, return_tensors="pt")
    images = random_images(2, 32, 32)
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=(images - CLIP_MEAN) / CLIP_STD).pooler_output
        text_embeds = model.get_text_features(**tokens).pooler_output
        expected = model.logit_scale.exp() * F.cosine_similarity(image_embeds, text_embeds)
    torch.testing.assert_close(build("pickscore")(images, PROMPTS[:2]), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Pixel rewards against hand computation
# ---------------------------------------------------------------------------------------------------------


def test_symmetry_of_a_mirrored_image_is_zero(build):
    scores = build("symmetry")(mirrored(random_images(2, 24, 32)), ["", ""])
    torch.testing.assert_close(scores, torch.zeros(2))


def test_symmetry_of_a_constant_image_is_finite(build):
    images = torch.full((1, 3, 16, 16), 0.5, requires_grad=True)
    scores = build("symmetry")(images, [""])
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert torch.isfinite(scores).all() and torch.isfinite(grad).all()


def test_symmetry_matches_eq6_in_numpy(build):
    images = random_images(2, 20, 30)
    reward_fn = build("symmetry")
    scores = reward_fn(images, ["", ""])
    expected = [np.abs(x - x[:, :, ::-1]).mean() / x.std() for x in images.double().numpy()]
    np.testing.assert_allclose(reward_fn.last_raw["symmetry"].numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(scores, -reward_fn.last_raw["symmetry"])


def test_symmetry_clip_regularizer(build):
    images = random_images(2, 32, 32)
    scores = build("symmetry", symmetry_clip_weight=0.5)(images, PROMPTS[:2])
    expected = build("symmetry")(images, PROMPTS[:2]) + 0.5 * build("clipscore")(images, PROMPTS[:2])
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("name", ["compressibility", "jpeg_size"])
def test_flat_image_compresses_better_than_noise(build, name):
    reward_fn = build(name)
    flat_score = reward_fn(torch.full((1, 3, 64, 64), 0.4), [""])
    flat_raw = reward_fn.last_raw[name]
    noise_score = reward_fn(random_images(1, 64, 64), [""])
    assert flat_raw < reward_fn.last_raw[name] and flat_score > noise_score


def test_objectness_gradient_step_lowers_the_score(build):
    reward_fn = build("objectness")
    images = random_images(2, 48, 48).requires_grad_()
    reward = reward_fn(images, ["", ""])
    before = reward_fn.last_raw["objectness"]
    (grad,) = torch.autograd.grad(reward.sum(), images)
    reward_fn((images + 1e-3 * grad.sign()).detach(), ["", ""])
    assert (reward_fn.last_raw["objectness"] < before).all()


def test_weighted_sum(build):
    images = random_images(2, 32, 32)
    reward_fn = build("symmetry:1,compressibility:2")
    scores = reward_fn(images, ["", ""])
    parts = build("symmetry")(images, ["", ""]) + 2 * build("compressibility")(images, ["", ""])
    torch.testing.assert_close(scores, parts)
    raw = reward_fn.last_raw
    torch.testing.assert_close(scores, -raw["symmetry"] - 2 * raw["compressibility"])


# ---------------------------------------------------------------------------------------------------------
# Loading errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, option, value, extra", [
    ("aesthetic", "aesthetic_mlp", "/nonexistent/aesthetic.pth", {}),
    ("aesthetic", "aesthetic_clip", "/nonexistent/clip", {}),
    ("pickscore", "pickscore_model", "/nonexistent/pickscore", {}),
    ("hpsv21", "hps_checkpoint", "./no/such/HPS_v2.1_compressed.pt", {}),
    ("clipscore", "clip_pretrained", "ckpt.bin", {}),
    ("symmetry", "clip_pretrained", "missing/open_clip.bin", {"symmetry_clip_weight": 0.1}),
    ("objectness", "owlvit_model", "./no/such/owlvit", {}),
])
def test_missing_local_path(tiny, spec, option, value, extra):
    options = {**tiny, option: value, **extra}
    match = f"^{spec}: {option}='{value}': no such file or directory$"
    with pytest.raises(rewards.RewardLoadError, match=match):
        rewards.check_options(spec, options)
    with pytest.raises(rewards.RewardLoadError, match=match):
        rewards.build_reward(spec, **options)


@pytest.mark.parametrize("spec, option, ref, defaults", [
    ("aesthetic", "aesthetic_clip", "openai/clip-vit-large-patch14", ["aesthetic_clip"]),
    ("aesthetic", "aesthetic_mlp", "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth", ["aesthetic_mlp"]),
    ("clipscore", "clip_pretrained", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ["clip_model", "clip_pretrained"]),
    ("pickscore", "pickscore_model", "yuvalkirstain/PickScore_v1", ["pickscore_model"]),
    ("pickscore", "pickscore_processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ["pickscore_processor"]),
    ("hpsv21", "hps_checkpoint", "xswu/HPSv2/HPS_v2.1_compressed.pt", ["hps_checkpoint"]),
    ("objectness", "owlvit_model", "google/owlvit-base-patch32", ["owlvit_model"]),
])
def test_hub_id_offline(offline, tiny, spec, option, ref, defaults):
    options = {name: value for name, value in tiny.items() if name not in defaults}
    with pytest.raises(rewards.RewardLoadError) as error:
        rewards.build_reward(spec, **options)
    message = str(error.value)
    assert ref in message and f"--reward_options {option}=/path/" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def test_cli_symmetry_json(tmp_path):
    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)
    Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(tmp_path / "a_mirror.png")
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "b_random.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "c_other_size.webp")
    (tmp_path / "notes.md").write_text("not an image")
    command = [sys.executable, "rewards.py", "--reward", "symmetry", "--images", str(tmp_path), "--json"]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    scores = result["scores"]
    assert list(scores) == ["a_mirror.png", "b_random.png", "c_other_size.webp"]
    assert scores["a_mirror.png"] == pytest.approx(0, abs=1e-6) and scores["a_mirror.png"] > scores["b_random.png"]
    assert result["mean"] == pytest.approx(np.mean(list(scores.values())))
    assert result["raw"]["symmetry"]["b_random.png"] == pytest.approx(-scores["b_random.png"])


def test_cli_prompts(tiny, build, tmp_path, capsys):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    for name, array, prompt in zip(["x.png", "y.png"], arrays, PROMPTS):
        Image.fromarray(array).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(prompt + "\n")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[1:]) + "\n")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    options = ",".join(f"{name}={tiny[name]}" for name in ("pickscore_model", "pickscore_processor"))
    argv = ["--reward", "pickscore", "--images", str(tmp_path), "--reward_options", options, "--batch_size", "1"]

    rewards.main(argv + ["--json"])  # prompts from x.txt and y.txt beside the images
    beside = json.loads(capsys.readouterr().out)
    expected = build("pickscore")(images, PROMPTS[:2]).tolist()
    assert list(beside["scores"].values()) == pytest.approx(expected, rel=1e-5)

    rewards.main(argv + ["--json", "--prompts", str(prompts_file)])
    from_file = json.loads(capsys.readouterr().out)
    expected = build("pickscore")(images, PROMPTS[1:]).tolist()
    assert list(from_file["scores"].values()) == pytest.approx(expected, rel=1e-5)

    rewards.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["x.png", "y.png", "mean"]
    assert float(lines[0].split("\t")[1]) == pytest.approx(beside["scores"]["x.png"], abs=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--reward", "beauty"], "unknown reward 'beauty'"),
    (["--reward", "symmetry", "--reward_options", "colour=red"], "unknown reward option 'colour'"),
    (["--reward", "symmetry", "--prompts", "PROMPTS"], "has 2 lines for 1 images"),
    (["--reward", "symmetry", "--prompts", "MISSING"], "--prompts"),
    (["--reward", "symmetry", "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--reward", "symmetry", "--batch_size", "two"], "--batch_size"),
    pytest.param(["--reward", "symmetry", "--device", "cuda"], "--device cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for CPU-only machines")),
    (["--reward", "symmetry", "--device", "gpu0"], "--device gpu0"),
    (["--reward", "compressibility", "--reward_options", "jpeg_quality=0"], "jpeg_quality=0"),
    (["--reward", "jpeg_size", "--reward_options", "jpeg_quality=500"], "jpeg_quality=500"),
    (["--reward", "symmetry", "--reward_options", "symmetry_clip_weight=nan"], "symmetry_clip_weight=nan"),
])
def test_cli_errors(tmp_path, capsys, monkeypatch, extra, message):
    """Bad input: exit code 2, one line on stderr naming the flag, and no reward model built."""
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "black.png")
    (tmp_path / "two.txt").write_text("first\nsecond\n")
    argv = [arg.replace("PROMPTS", str(tmp_path / "two.txt")).replace("MISSING", str(tmp_path / "no.txt"))
            for arg in extra]
    monkeypatch.setattr(rewards, "build_reward", lambda *a, **k: pytest.fail("a reward model was built"))
    with pytest.raises(SystemExit) as exit_info:
        rewards.main(argv + ["--images", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("rewards.py: error: ")


def test_cli_skips_unreadable_images_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """Fake, truncated and corrupt files: a one-line warning each, scored without them; none readable: an error."""
    import io
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    (tmp_path / "a_truncated.png").write_bytes(buffer.getvalue()[:100])
    (tmp_path / "b_fake.jpg").write_bytes(b"not an image")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    (tmp_path / "c_corrupt.jpg").write_bytes(jpeg.getvalue()[:20] + bytes(200) + jpeg.getvalue()[220:240])
    (tmp_path / "prompts.txt").write_text("p1\np2\np3\n")
    with pytest.raises(SystemExit) as exit_info:
        rewards.main(["--reward", "symmetry", "--images", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2
    assert err[-1] == f"rewards.py: error: --images {tmp_path}: no readable image (see --help)"
    assert sorted(line.split()[3] for line in err[:-1]) == ["a_truncated.png:", "b_fake.jpg:", "c_corrupt.jpg:"]
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "d_good.png")
    (tmp_path / "prompts.txt").write_text("p1\np2\np3\np4\n")
    rewards.main(["--reward", "symmetry", "--images", str(tmp_path), "--prompts", str(tmp_path / "prompts.txt"),
                  "--json"])
    captured = capsys.readouterr()
    assert list(json.loads(captured.out)["scores"]) == ["d_good.png"] and captured.err.count("warning: skipping") == 3
