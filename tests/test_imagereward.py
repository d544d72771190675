"""rewards.py's imagereward on a tiny random checkpoint in the published ImageReward.pt layout: the score against a
plain-tensor forward of the published architecture written from its key names, strict loading, the published
normalization, and the offline error. The shape, gradient and row-wise checks every reward gets are in
test_rewards.py."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import rewards
import tiny_rewards

PROMPTS = ["a red cube", "a book on a wooden table, 2 chairs"]
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    checkpoint, tokenizer = tiny_rewards.build_imagereward(tmp_path_factory.mktemp("imagereward"))
    return dict(imagereward_checkpoint=str(checkpoint), imagereward_tokenizer=str(tokenizer))


@pytest.fixture(scope="module")
def reward_fn(tiny):
    return rewards.build_reward("imagereward", **tiny)


def attention(q, k, v, heads, mask=None):
    """Multi-head scaled dot-product attention on (B, N, D) projections; mask (B, 1, 1, M) additive."""
    b, n, d = q.shape
    q, k, v = (x.view(b, -1, heads, d // heads).transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def params(sd, prefix):
    """name -> (weight, bias) of the state dict's module prefix + name."""
    return lambda name: (sd[f"{prefix}{name}.weight"], sd[f"{prefix}{name}.bias"])


def reference_scores(sd, pixel_values, input_ids, attention_mask):
    """The published network from its state dict with plain tensor ops: BLIP's ViT (pre-norm blocks, fused qkv,
    final LayerNorm, eps 1e-6), BLIP's BERT (post-norm layers: self-attention, cross-attention to every image
    token, feed-forward; eps 1e-12), the MLP on the [CLS] state, then (raw - mean) / std."""
    v, e = "blip.visual_encoder.", "blip.text_encoder."
    width, heads = sd[v + "cls_token"].shape[-1], sd[v + "cls_token"].shape[-1] // 64
    patch = sd[v + "patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixel_values, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(tiny_rewards.IMAGEREWARD_VIT["depth"]):
        p = params(sd, f"{v}blocks.{i}.")
        h = F.layer_norm(x, (width,), *p("norm1"), eps=1e-6)
        x = x + F.linear(attention(*F.linear(h, *p("attn.qkv")).chunk(3, -1), heads), *p("attn.proj"))
        h = F.layer_norm(x, (width,), *p("norm2"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, *p("mlp.fc1"))), *p("mlp.fc2"))
    image = F.layer_norm(x, (width,), sd[v + "norm.weight"], sd[v + "norm.bias"], eps=1e-6)

    hidden = sd[e + "embeddings.word_embeddings.weight"].shape[-1]
    t = sd[e + "embeddings.word_embeddings.weight"][input_ids]
    t = t + sd[e + "embeddings.position_embeddings.weight"][: input_ids.shape[1]]
    t = F.layer_norm(t, (hidden,), *params(sd, e)("embeddings.LayerNorm"), eps=1e-12)
    mask = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
    for i in range(tiny_rewards.IMAGEREWARD_TEXT["depth"]):
        p = params(sd, f"{e}encoder.layer.{i}.")
        for block, source, block_mask in (("attention", None, mask), ("crossattention", image, None)):
            keys = t if source is None else source
            a = attention(F.linear(t, *p(f"{block}.self.query")), F.linear(keys, *p(f"{block}.self.key")),
                          F.linear(keys, *p(f"{block}.self.value")), hidden // 64, block_mask)
            t = F.layer_norm(t + F.linear(a, *p(f"{block}.output.dense")), (hidden,), *p(f"{block}.output.LayerNorm"),
                             eps=1e-12)
        ff = F.linear(F.gelu(F.linear(t, *p("intermediate.dense"))), *p("output.dense"))
        t = F.layer_norm(t + ff, (hidden,), *p("output.LayerNorm"), eps=1e-12)
    raw = t[:, 0]
    for index in (0, 2, 4, 6, 7):  # the head: linear layers only, dropouts between
        raw = F.linear(raw, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    return (raw.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_matches_the_published_architecture(tiny, reward_fn):
    from transformers import AutoTokenizer

    sd = torch.load(tiny["imagereward_checkpoint"], weights_only=True)
    tokens = AutoTokenizer.from_pretrained(tiny["imagereward_tokenizer"])(
        PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # the tiny input size
    with torch.no_grad():
        expected = reference_scores(sd, (images - CLIP_MEAN) / CLIP_STD, tokens.input_ids, tokens.attention_mask)
    scores = reward_fn(images, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reward_fn.last_raw["imagereward"], scores)
    assert expected.std() > 0.01  # the check has teeth: the two scores differ


def test_prompt_and_padding(reward_fn):
    images = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    scores = reward_fn(images, PROMPTS)
    assert (scores[0] - scores[1]).abs() > 1e-4
    long_prompt = " ".join(["word"] * 60)  # longer than the 35 tokens: truncated, not an error
    assert torch.isfinite(reward_fn(images[:1], [long_prompt])).all()


def test_published_constants():
    assert (rewards.IMAGEREWARD_MEAN, rewards.IMAGEREWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    assert rewards.OPTIONS["imagereward_checkpoint"] == "THUDM/ImageReward/ImageReward.pt"


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("blip.text_proj.bias"), "missing keys.*text_proj"),
    (lambda sd: sd.update({"blip.itm_head.weight": torch.zeros(2, 128)}), "unexpected keys.*itm_head"),
    (lambda sd: sd.update({"blip.text_encoder.embeddings.position_ids": torch.zeros(1, 40, dtype=torch.long)}),
     "unexpected key.*position_ids"),
    (lambda sd: sd.pop("blip.visual_encoder.cls_token"), "not in the published ImageReward layout"),
])
def test_loaded_strictly(tiny, tmp_path, edit, match):
    sd = torch.load(tiny["imagereward_checkpoint"], weights_only=True)
    edit(sd)
    torch.save(sd, tmp_path / "edited.pt")
    with pytest.raises(RuntimeError, match=match):
        rewards.build_reward("imagereward", **{**tiny, "imagereward_checkpoint": str(tmp_path / "edited.pt")})


def test_weights_only_load(tiny, tmp_path):
    """A pickle that is more than tensors is refused (torch.load weights_only=True), not executed."""
    sd = torch.load(tiny["imagereward_checkpoint"], weights_only=True)
    sd["config"] = argparse.Namespace(vit="large")  # any class outside weights_only's allowlist
    torch.save(sd, tmp_path / "pickled.pt")
    refused = r"[Ww]eights only load failed|Unsupported global|weights_only=True\) refuses it"  # torch's, or ours
    with pytest.raises(Exception, match=refused):
        rewards.build_reward("imagereward", **{**tiny, "imagereward_checkpoint": str(tmp_path / "pickled.pt")})


@pytest.mark.parametrize("option, ref", [
    ("imagereward_checkpoint", "THUDM/ImageReward/ImageReward.pt"),
    ("imagereward_tokenizer", "google-bert/bert-base-uncased"),
])
def test_hub_reference_offline(tiny, monkeypatch, tmp_path, option, ref):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    options = {k: v for k, v in tiny.items() if k != option}
    with pytest.raises(rewards.RewardLoadError) as error:
        rewards.build_reward("imagereward", **options)
    assert ref in str(error.value) and f"--reward_options {option}=/path/" in str(error.value)
