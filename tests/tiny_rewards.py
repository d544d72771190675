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


def reward_options(directory):
    """Build every tiny model under `directory`; return the build_reward options that select them."""
    directory = Path(directory)
    clip = build_clip(directory / "clip")
    name, checkpoint = build_open_clip(directory)
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
    }
