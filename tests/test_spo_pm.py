"""rewards.py's spo_pm (SPO's step-aware preference model) on tiny random checkpoints in the official layout, and
spo.py with it: strict loading, the timestep's effect, the identity adaLN against plain PickScore, the official
preprocessing, and a short spo.py run on the tiny SD pipeline."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SD, read_metrics, tiny_argv

import rewards
import spo
import tiny_rewards

PROMPTS = ["a red cube", "two dogs playing in the snow"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spo_pm")
    clip = tiny_rewards.build_clip(directory / "clip")
    return dict(spo_pm_checkpoint=str(tiny_rewards.build_spo_pm(directory / "spm.bin", clip)),
                spo_pm_model=str(clip), spo_pm_processor=str(clip), pickscore_model=str(clip),
                pickscore_processor=str(clip))


@pytest.fixture(scope="module")
def identity(tiny, tmp_path_factory):
    """An SPM whose adaLN layers are all the identity: plain CLIP (PickScore) whatever the timestep."""
    path = tiny_rewards.build_spo_pm(tmp_path_factory.mktemp("identity") / "spm.bin", tiny["spo_pm_model"],
                                     identity=True)
    return rewards.build_reward("spo_pm", **{**tiny, "spo_pm_checkpoint": str(path)})


def images(n=2, h=32, w=32, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_registered_as_step_aware(tiny):
    assert rewards.REWARDS["spo_pm"].step_aware and rewards.REWARDS["spo_pm"].differentiable
    assert rewards.build_reward("spo_pm", **tiny).step_aware
    assert not rewards.build_reward("symmetry").step_aware
    assert rewards.OPTIONS["spo_pm_checkpoint"].startswith("SPO-Diffusion-Models/Step-Aware_Preference_Models/")


def test_score_depends_on_the_timestep(tiny):
    reward_fn = rewards.build_reward("spo_pm", **tiny)
    x = images()
    final = reward_fn(x, PROMPTS)
    torch.testing.assert_close(reward_fn(x, PROMPTS, timesteps=0), final)  # None: final images, t = 0
    early, late = reward_fn(x, PROMPTS, timesteps=901), reward_fn(x, PROMPTS, timesteps=101)
    assert (early - late).abs().min() > 1e-3 and (late - final).abs().min() > 1e-4
    per_image = reward_fn(x, PROMPTS, timesteps=torch.tensor([901, 101]))  # one timestep per image
    torch.testing.assert_close(per_image, torch.stack([early[0], late[1]]))
    assert set(reward_fn.last_raw) == {"spo_pm"}


def test_weighted_sum_passes_the_timestep_to_the_step_aware_part(tiny):
    x = images()
    both = rewards.build_reward("spo_pm:1,symmetry:0.5", **tiny)
    expected = (rewards.build_reward("spo_pm", **tiny)(x, PROMPTS, timesteps=501)
                + 0.5 * rewards.build_reward("symmetry")(x, PROMPTS))
    torch.testing.assert_close(both(x, PROMPTS, timesteps=501), expected)


@pytest.mark.parametrize("t", [0, 500, 999])
def test_identity_adaln_is_plain_pickscore(tiny, identity, t):
    """Zero shift and scale, unit gates: the SPM is the CLIP it was built from. At the model's input size (32 px
    here) the official preprocessing (bicubic without antialias) and pickscore's (with) are both the identity."""
    x = images()
    pickscore = rewards.build_reward("pickscore", **tiny)
    torch.testing.assert_close(identity(x, PROMPTS, timesteps=t), pickscore(x, PROMPTS), rtol=1e-4, atol=1e-4)


def plain_clip_score(tiny, pixels):
    """logit_scale.exp() * cosine of plain CLIP (transformers) for pixels in [0, 1] at its input size, normalized with
    CLIP's mean/std by hand: what an SPM whose adaLN layers are the identity must give."""
    from transformers import AutoTokenizer, CLIPModel

    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    clip = CLIPModel.from_pretrained(tiny["spo_pm_model"]).eval()
    tokens = AutoTokenizer.from_pretrained(tiny["spo_pm_processor"])(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = clip.get_image_features(pixel_values=(pixels - mean.view(3, 1, 1)) / std.view(3, 1, 1))
        text_embeds = clip.get_text_features(**tokens)
        return clip.logit_scale.exp() * F.cosine_similarity(image_embeds.pooler_output, text_embeds.pooler_output)


def test_official_preprocessing(tiny, identity):
    """A 40 x 56 image: bicubic without antialias to a shorter side of 32 (56 * 0.8 = 44.8 rounds half up to 45),
    torchvision's center crop (left = round(6.5) = 6), clamp, then CLIP's mean/std."""
    x = images(2, 40, 56)
    pixels = F.interpolate(x, size=(32, 45), mode="bicubic", align_corners=False)[..., :, 6:38].clamp(0, 1)
    expected = plain_clip_score(tiny, pixels)
    torch.testing.assert_close(identity(x, PROMPTS, timesteps=300), expected, rtol=1e-4, atol=1e-4)


def test_modulation_layout(tiny, tmp_path):
    """Closed gates (chunks 2 and 5 of each layer's 6) skip every encoder layer; the pooled output is then
    post_layernorm(class token) * (1 + scale) + shift with (shift, scale) the two chunks of the last adaLN."""
    from transformers import AutoTokenizer, CLIPModel

    sd = torch.load(tiny["spo_pm_checkpoint"], weights_only=True)
    width = sd["model.t_embedder.mlp.2.weight"].shape[0]
    for key in [k for k in sd if "encoder.layers" in k and "adaLN_modulation" in k]:
        sd[key] = torch.zeros_like(sd[key])
    shift, scale = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    sd["model.vision_model.adaLN_modulation.1.weight"] = torch.zeros(2 * width, width)
    sd["model.vision_model.adaLN_modulation.1.bias"] = torch.cat([shift, scale])
    torch.save(sd, tmp_path / "gated.bin")
    reward_fn = rewards.build_reward("spo_pm", **{**tiny, "spo_pm_checkpoint": str(tmp_path / "gated.bin")})

    clip = CLIPModel.from_pretrained(tiny["spo_pm_model"]).eval()
    x = images()
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    tokens = AutoTokenizer.from_pretrained(tiny["spo_pm_processor"])(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        vision = clip.vision_model
        cls = vision.pre_layrnorm(vision.embeddings((x - mean.view(3, 1, 1)) / std.view(3, 1, 1)))[:, 0]
        image_embeds = clip.visual_projection(vision.post_layernorm(cls) * (1 + scale) + shift)
        text_embeds = clip.get_text_features(**tokens).pooler_output
        expected = clip.logit_scale.exp() * F.cosine_similarity(image_embeds, text_embeds)
    torch.testing.assert_close(reward_fn(x, PROMPTS, timesteps=700), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("legacy_position_ids", [True, False])
def test_official_layout_loads_strictly(tiny, tmp_path, legacy_position_ids):
    path = tiny_rewards.build_spo_pm(tmp_path / "spm.bin", tiny["spo_pm_model"],
                                     legacy_position_ids=legacy_position_ids)
    sd = torch.load(path, weights_only=True)
    assert all(k.startswith("model.") for k in sd) and "model.t_embedder.mlp.0.weight" in sd
    assert "model.vision_model.encoder.layers.1.adaLN_modulation.1.weight" in sd
    reward_fn = rewards.build_reward("spo_pm", **{**tiny, "spo_pm_checkpoint": str(path)})
    torch.testing.assert_close(reward_fn(images(), PROMPTS, timesteps=10),
                               rewards.build_reward("spo_pm", **tiny)(images(), PROMPTS, timesteps=10))


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("model.vision_model.adaLN_modulation.1.bias"), "missing keys.*adaLN"),
    (lambda sd: sd.update({"model.extra.weight": torch.zeros(1)}), "unexpected keys.*extra"),
    (lambda sd: sd.update({"model.text_model.embeddings.position_ids": torch.zeros(1, 77, dtype=torch.long)}),
     "unexpected key.*position_ids"),
    (lambda sd: sd.update({k.removeprefix("model."): sd.pop(k) for k in list(sd)}), "unexpected key"),  # no model.
])
def test_other_layouts_fail(tiny, tmp_path, edit, match):
    sd = torch.load(tiny["spo_pm_checkpoint"], weights_only=True)
    edit(sd)
    torch.save(sd, tmp_path / "edited.bin")
    with pytest.raises(RuntimeError, match=match):
        rewards.build_reward("spo_pm", **{**tiny, "spo_pm_checkpoint": str(tmp_path / "edited.bin")})


def test_hub_reference_offline(tiny, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    options = {k: v for k, v in tiny.items() if k != "spo_pm_checkpoint"}
    with pytest.raises(rewards.RewardLoadError, match="Step-Aware_Preference_Models.*spo_pm_checkpoint=/path/"):
        rewards.build_reward("spo_pm", **options)


# --- spo.py ----------------------------------------------------------------------------------------------


def test_paper_presets_use_the_spm():
    sd15, sdxl = spo.parse_args(["--preset", "sd15-paper"]), spo.parse_args(["--preset", "sdxl-paper"])
    assert sd15.reward == sdxl.reward == "spo_pm" and sd15.reward_options == ""  # the SD1.5 checkpoint: the default
    assert rewards.parse_options(sdxl.reward_options) == {
        "spo_pm_checkpoint": "SPO-Diffusion-Models/Step-Aware_Preference_Models/sdxl_step-aware_preference_model.bin"}
    plain = spo.parse_args(["--preset", "sd15-paper", "--reward", "pickscore"])  # plain-reward scoring
    assert plain.reward == "pickscore" and spo.parse_args([]).reward == "pickscore"


def test_unclamped_images_are_resized_before_the_clamp(tiny, identity):
    """The official SPM resizes the decoder's output, then clamps: images outside [0, 1] (x_0 predictions overshoot)
    score as resize -> clamp -> normalize, not clamp -> resize; a plain reward in the same sum sees them clamped."""
    x = images(2, 40, 40) * 1.6 - 0.3  # in [-0.3, 1.3]
    pixels = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    expected = plain_clip_score(tiny, pixels)
    torch.testing.assert_close(identity(x, PROMPTS, timesteps=300), expected, rtol=1e-4, atol=1e-4)
    assert (identity(x.clamp(0, 1), PROMPTS, timesteps=300) - expected).abs().max() > 1e-3  # the order matters
    symmetry = rewards.build_reward("symmetry")
    torch.testing.assert_close(symmetry(x, PROMPTS), symmetry(x.clamp(0, 1), PROMPTS))


def test_preference_model_gives_the_timestep(tiny):
    args = spo.parse_args(tiny_argv(TINY_SD, "unused", reward="spo_pm"))
    reward_fn = rewards.build_reward("spo_pm", **tiny)
    score = spo.build_preference_model(reward_fn, args)
    x = images()
    torch.testing.assert_close(score(x, PROMPTS, 801), reward_fn(x, PROMPTS, timesteps=801))
    torch.testing.assert_close(score(x, PROMPTS, 0), reward_fn(x, PROMPTS))
    plain = spo.build_preference_model(rewards.build_reward("symmetry"), args)  # a plain reward ignores t
    torch.testing.assert_close(plain(x, PROMPTS, 801), plain(x, PROMPTS, 0))


def test_spo_runs_with_the_spm(tiny, tmp_path, monkeypatch):
    """Two SPO steps on the tiny SD pipeline with the tiny SPM as the preference model; every scoring call gets
    the candidates' timestep (that of their x_t, 0 for the final images)."""
    options = ",".join(f"{k}={tiny[k]}" for k in ("spo_pm_checkpoint", "spo_pm_model", "spo_pm_processor"))
    argv = tiny_argv(TINY_SD, str(tmp_path / "run"), reward="spo_pm", reward_options=options, num_inference_steps=4,
                     warm_steps=1, num_candidates=2, pair_threshold=0.0, validation_steps=2)
    seen = []
    original = rewards.Reward.__call__

    def spy(self, images, prompts, timesteps=None):
        seen.append(timesteps)
        return original(self, images, prompts, timesteps)

    monkeypatch.setattr(rewards.Reward, "__call__", spy)
    row = spo.main(spo.parse_args(argv))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2] and row["pairs"] > 0 and "raw_spo_pm" in row
    args = spo.parse_args(argv)
    spo.check_arguments(args)
    scheduler = spo.make_scheduler(args)
    scheduler.set_timesteps(4)
    compared = {int(t) for t in scheduler.timesteps[2:]} | {0}  # after W = 1 and the first branching step
    assert {t for t in seen if t is not None} == compared
