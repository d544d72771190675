"""Tiny random reward models, built offline from configs, in the layouts the real checkpoints use.

`reward_options(directory)` builds all of them and returns the `build_reward` options that point at them:

    options = tiny_rewards.reward_options(tmp_path)
    reward_fn = rewards.build_reward("pickscore:1,hpsv21:1", **options)

Each builder is deterministic (seeded inside, without touching the caller's RNG) and takes well under a
second on a CPU once the libraries are imported.
"""

import gzip
import json
from pathlib import Path

import torch

TINY_OPEN_CLIP = "tiny-open-clip"  # registered with open_clip by build_open_clip
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8)


def _text_config(max_positions):
    # Full CLIP vocabulary (49408) so the real token ids fit; EOS is the highest id, as pooling expects.
    return dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=max_positions, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def clip_tokenizer():
    """The real CLIP BPE tokenizer, rebuilt from the vocabulary file shipped inside open_clip (no network)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    n_merges = 49408 - 2 * 256 - 2  # the vocabulary: bytes, bytes + "</w>", merges, two special tokens
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]  # line 0 is a header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)


def build_clip(directory):
    """transformers CLIPModel folder (projection 768, as the aesthetic MLP expects) + tokenizer + processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(text_config=_text_config(77), vision_config=_VISION, projection_dim=768)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(directory)
    clip_tokenizer().save_pretrained(directory)
    size = _VISION["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(directory)
    return Path(directory)


def build_aesthetic_mlp(path, head="linear"):
    """Aesthetic head state dict: published keys layers.0/2/4/6/7 (head "relu": layers.0/3/6/9/11), shapes
    768-1024-128-64-16-1; .pth or .safetensors."""
    shapes = dict(zip((0, 2, 4, 6, 7) if head == "linear" else (0, 3, 6, 9, 11),
                      [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]))
    state_dict = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for index, (fan_in, fan_out) in shapes.items():
            layer = torch.nn.Linear(fan_in, fan_out)
            state_dict[f"layers.{index}.weight"] = layer.weight.detach()
            state_dict[f"layers.{index}.bias"] = layer.bias.detach()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path


def build_open_clip(directory):
    """Register `TINY_OPEN_CLIP` with open_clip and write its weights as {'state_dict': ...} (the HPS v2.1 layout)."""
    import open_clip

    directory = Path(directory)
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    config_path = directory / f"{TINY_OPEN_CLIP}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model(TINY_OPEN_CLIP)
    checkpoint = directory / f"{TINY_OPEN_CLIP}.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return TINY_OPEN_CLIP, checkpoint


def build_owlvit(directory):
    """OwlViTForObjectDetection folder + tokenizer + processor config.

    A random class head saturates the sigmoid (logits ~ 80), which would make every gradient vanish; its shift
    is zeroed and its scale set to 1, so logits are the query/box cosine in [-1, 1].
    """
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor

    config = OwlViTConfig(text_config=_text_config(16), vision_config=_VISION, projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = OwlViTForObjectDetection(config)
    head = model.class_head
    for linear in (head.logit_shift, head.logit_scale):  # scale = elu(0) + 1 = 1
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    model.save_pretrained(directory)
    clip_tokenizer().save_pretrained(directory)
    size = {"height": _VISION["image_size"], "width": _VISION["image_size"]}
    OwlViTImageProcessor(size=size, crop_size=size).save_pretrained(directory)
    return Path(directory)


def build_spo_pm(path, clip_directory, identity=False, legacy_position_ids=True):
    """SPO step-aware preference model checkpoint in the official layout (a torch.save'd state dict of the
    official wrapper: every key under `model.`): the CLIP weights of `clip_directory` (a build_clip folder, which
    then serves as spo_pm_model and spo_pm_processor), a timestep embedder model.t_embedder.mlp.{0,2} (256 -> D -> D),
    model.vision_model.encoder.layers.N.adaLN_modulation.1 (D -> 6D) and model.vision_model.adaLN_modulation.1
    (D -> 2D), D the vision width. Random modulation by default; identity=True makes every adaLN the identity (zero
    weights; zero shift and scale, unit gates), so the model is plain CLIP. legacy_position_ids adds the
    embeddings' position_ids, which checkpoints written by transformers < 4.31 hold."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_directory)
    config = clip.config
    width = config.vision_config.hidden_size
    state_dict = {f"model.{k}": v for k, v in clip.state_dict().items()}
    if legacy_position_ids:
        for tower, n in (("text", config.text_config.max_position_embeddings),
                         ("vision", (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1)):
            state_dict[f"model.{tower}_model.embeddings.position_ids"] = torch.arange(n)[None]
    gates = torch.zeros(6, width)
    gates[[2, 5]] = 1  # shift, scale, gate of the attention branch, then of the MLP branch
    with torch.random.fork_rng():
        torch.manual_seed(1)
        modules = {"t_embedder.mlp.0": torch.nn.Linear(256, width), "t_embedder.mlp.2": torch.nn.Linear(width, width),
                   "vision_model.adaLN_modulation.1": torch.nn.Linear(width, 2 * width)}
        for i in range(config.vision_config.num_hidden_layers):
            modules[f"vision_model.encoder.layers.{i}.adaLN_modulation.1"] = torch.nn.Linear(width, 6 * width)
    for name, linear in modules.items():
        weight, bias = linear.weight.detach(), linear.bias.detach()
        if "adaLN" in name:
            if identity:
                weight, bias = torch.zeros_like(weight), torch.zeros_like(bias)
            if bias.numel() == 6 * width:
                bias = bias + gates.flatten()
        state_dict[f"model.{name}.weight"], state_dict[f"model.{name}.bias"] = weight, bias
    torch.save(state_dict, path)
    return Path(path)


def bert_tokenizer():
    """A small lowercase WordPiece tokenizer (special tokens, characters and their ## continuations): any prompt
    tokenizes, with BERT's [CLS] ... [SEP] [PAD] framing."""
    from transformers import BertTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})


# The tiny ImageReward: ViT (width 128, 2 heads of 64, patch 8 at 32 px, 2 blocks) and BERT (width 128, 2 layers).
IMAGEREWARD_VIT = dict(width=128, patch=8, image_size=32, depth=2)
IMAGEREWARD_TEXT = dict(width=128, depth=2, max_positions=40)


def imagereward_shapes(vocab_size, vit=IMAGEREWARD_VIT, text=IMAGEREWARD_TEXT, proj=16):
    """Key -> shape of an ImageReward.pt (the published names: BLIP's timm-style ViT as blip.visual_encoder, BLIP's
    BERT with cross-attention as blip.text_encoder, the two BLIP projections, the MLP head)."""
    d, t = vit["width"], text["width"]
    v = "blip.visual_encoder."
    shapes = {v + "cls_token": (1, 1, d), v + "pos_embed": (1, (vit["image_size"] // vit["patch"]) ** 2 + 1, d),
              v + "patch_embed.proj.weight": (d, 3, vit["patch"], vit["patch"]), v + "patch_embed.proj.bias": (d,),
              v + "norm.weight": (d,), v + "norm.bias": (d,)}
    for i in range(vit["depth"]):
        b = f"{v}blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (4 * d, d),
                       b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    e = "blip.text_encoder."
    shapes.update({e + "embeddings.word_embeddings.weight": (vocab_size, t),
                   e + "embeddings.position_embeddings.weight": (text["max_positions"], t),
                   e + "embeddings.LayerNorm.weight": (t,), e + "embeddings.LayerNorm.bias": (t,)})
    for i in range(text["depth"]):
        b = f"{e}encoder.layer.{i}."
        for block, kv_width in (("attention", t), ("crossattention", d)):
            shapes.update({f"{b}{block}.self.query.weight": (t, t), f"{b}{block}.self.query.bias": (t,),
                           f"{b}{block}.self.key.weight": (t, kv_width), f"{b}{block}.self.key.bias": (t,),
                           f"{b}{block}.self.value.weight": (t, kv_width), f"{b}{block}.self.value.bias": (t,),
                           f"{b}{block}.output.dense.weight": (t, t), f"{b}{block}.output.dense.bias": (t,),
                           f"{b}{block}.output.LayerNorm.weight": (t,), f"{b}{block}.output.LayerNorm.bias": (t,)})
        shapes.update({b + "intermediate.dense.weight": (4 * t, t), b + "intermediate.dense.bias": (4 * t,),
                       b + "output.dense.weight": (t, 4 * t), b + "output.dense.bias": (t,),
                       b + "output.LayerNorm.weight": (t,), b + "output.LayerNorm.bias": (t,)})
    shapes.update({"blip.vision_proj.weight": (proj, d), "blip.vision_proj.bias": (proj,),
                   "blip.text_proj.weight": (proj, t), "blip.text_proj.bias": (proj,)})
    for index, (fan_in, fan_out) in {0: (t, 1024), 2: (1024, 128), 4: (128, 64), 6: (64, 16), 7: (16, 1)}.items():
        shapes.update({f"mlp.layers.{index}.weight": (fan_out, fan_in), f"mlp.layers.{index}.bias": (fan_out,)})
    return shapes


def build_imagereward(directory):
    """ImageReward.pt in the published layout (random weights; LayerNorms near the identity; the text
    encoder's position_ids buffer, which BLIP's BERT saves) and a BERT tokenizer folder. Returns (checkpoint,
    tokenizer folder)."""
    directory = Path(directory)
    tokenizer = bert_tokenizer()
    tokenizer.save_pretrained(directory / "bert")
    vocab_size = len(tokenizer) + 2  # + BLIP's [DEC] and [ENC], as the published 30522 + 2 rows
    state_dict = {}
    generator = torch.Generator().manual_seed(0)
    for key, shape in imagereward_shapes(vocab_size).items():
        value = torch.randn(shape, generator=generator)
        if "LayerNorm" in key or "norm" in key.rsplit(".", 2)[-2]:
            value = (1.0 if key.endswith("weight") else 0.0) + 0.1 * value
        elif not key.startswith("mlp."):
            value = 0.05 * value
        else:  # the head: roughly unit-variance outputs
            value = value / shape[-1] ** 0.5 if key.endswith("weight") else 0.0 * value
        state_dict[key] = value
    max_positions = IMAGEREWARD_TEXT["max_positions"]
    state_dict["blip.text_encoder.embeddings.position_ids"] = torch.arange(max_positions)[None]
    checkpoint = directory / "ImageReward.pt"
    torch.save(state_dict, checkpoint)
    return checkpoint, directory / "bert"


def reward_options(directory):
    """Build every tiny model under `directory`; return the build_reward options that select them."""
    directory = Path(directory)
    clip = build_clip(directory / "clip")
    name, checkpoint = build_open_clip(directory)
    imagereward_checkpoint, bert = build_imagereward(directory / "imagereward")
    return {
        "aesthetic_clip": str(clip),
        "aesthetic_mlp": str(build_aesthetic_mlp(directory / "aesthetic.pth")),
        "clip_model": name,
        "clip_pretrained": str(checkpoint),
        "pickscore_model": str(clip),
        "pickscore_processor": str(clip),
        "hps_model": name,
        "hps_checkpoint": str(checkpoint),
        "owlvit_model": str(build_owlvit(directory / "owlvit")),
        "imagereward_checkpoint": str(imagereward_checkpoint),
        "imagereward_tokenizer": str(bert),
        "spo_pm_checkpoint": str(build_spo_pm(directory / "spo_pm.bin", clip)),
        "spo_pm_model": str(clip),
        "spo_pm_processor": str(clip),
    }
