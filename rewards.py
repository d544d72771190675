"""Rewards for text-to-image fine-tuning: the seven of DRTune's Table 1 (and DDPO's JPEG size), ReFL's ImageReward
and SPO's step-aware preference model, one signature.

    reward_fn = rewards.build_reward("symmetry:1,clipscore:0.1", device="cuda", dtype=torch.float16)
    scores = reward_fn(images, prompts)  # images (B, 3, H, W) in [0, 1], prompts list[str] -> (B,) float32
    reward_fn.last_raw                   # {"symmetry": eq. 6 values, "clipscore": cosines}, detached (B,) each
    spm = rewards.build_reward("spo_pm")
    spm(images, prompts, timesteps=t)    # a step-aware reward also takes the timestep (an int or (B,)) that the
                                         # images (x_0 predictions) were made at; None (or 0): final images

A spec is a weighted sum `name[:weight],...` (weight 1 by default). Higher is always better: rewards the paper
minimizes enter the sum with a minus sign, while `last_raw` keeps the paper's own value for logging. Image i is
scored against prompt i. Gradients flow to the images for every reward but `jpeg_size`.

| name            | raw value (`last_raw`)                          | reward                 | model                  |
| --------------- | ----------------------------------------------- | ---------------------- | ---------------------- |
| aesthetic       | LAION aesthetic score, 1..10 scale              | raw                    | CLIP ViT-L/14 + MLP    |
| clipscore       | cos(image, prompt), no logit scale              | raw                    | open_clip ViT-H-14     |
| pickscore       | logit_scale.exp() * cos(image, prompt)          | raw                    | PickScore v1           |
| hpsv21          | cos(image, prompt), no logit scale              | raw                    | open_clip ViT-H-14     |
| symmetry        | eq. 6: mean abs(I - flip(I)) / std(I)           | -raw + w * clipscore   | none (+ CLIP if w > 0) |
| compressibility | eq. 7: mean (I - d(c(I)))^2                     | -raw                   | kornia JPEG            |
| objectness      | max over boxes of sigmoid(logit) for the query  | -raw                   | OWL-ViT                |
| jpeg_size       | JPEG file size in kB (DDPO), not differentiable | -raw                   | PIL encoder            |
| imagereward     | ImageReward: (MLP(BLIP) - mean) / std           | raw                    | BLIP ViT-L + BERT      |
| spo_pm          | logit_scale.exp() * cos(image at t, prompt)     | raw                    | PickScore + adaLN(t)   |

Choices the paper leaves open:
- aesthetic: the CLIP image embedding is L2-normalized before the MLP 768-1024-128-64-16-1 (no activations),
  whose weights are `sac+logos+ava1-l14-linearMSE.pth` of LAION's improved aesthetic predictor; the default
  file is the hub copy TRL's DDPO example loads (`trl-lib/ddpo-aesthetic-predictor`, `aesthetic-model.pth`).
- symmetry (eq. 6): flip is the left-right mirror; ||.||_1 is the mean over channels and pixels (so values do
  not depend on resolution); std is the population std over all C*H*W values, taken as sqrt(var + 1e-8) so
  that a constant image scores 0 with a finite gradient. `symmetry_clip_weight` w adds the paper's CLIPScore
  regularizer (the same as adding `clipscore:w` to the spec).
- compressibility (eq. 7): ||.||_2^2 is the mean squared error per value (resolution independent), through
  `kornia.enhance.jpeg_codec_differentiable` at `jpeg_quality` (the paper gives no quality; default 50).
- objectness: the query is fixed text (`objectness_query`, the paper's "book"), not the prompt; the image is
  resized to the detector's square input without cropping, as the OWL-ViT processor does, so that objects at
  the borders count.
- jpeg_size: DDPO's compressibility, the size of the 8-bit image encoded by PIL at `jpeg_quality` (DDPO used
  95); no gradient, for the methods that need none (DPO, SPO).
- Model inputs: on tensors, bicubic with antialias to the model's input size (shorter side, then center crop),
  clamped to [0, 1] as an 8-bit image would be, then the model's mean/std. Size and mean/std come from the
  model's config / processor config. Models are frozen, in eval mode, on the given device and dtype.
- imagereward (ReFL's reward; the `image-reward` package does not import with transformers 5): the published
  ImageReward.pt on transformers' BLIP parts, which hold its weights under other names: BLIP's ViT (the file's
  blip.visual_encoder.*: cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp},
  norm) is BlipVisionModel after a key mapping, BLIP's BERT with cross-attention (blip.text_encoder.*) is
  BlipTextModel under its own names, and the head (mlp.layers.0/2/4/6/7, 768-1024-128-64-16-1, no activations)
  is the aesthetic head's. The file's blip.vision_proj / blip.text_proj are loaded (strictly) but unused by the
  score. Sizes come from the tensors' shapes; head counts are width / 64 (ViT-L 16, BERT-base 12) and LayerNorm
  eps 1e-6 / 1e-12, as in the official code. Score: the text encoder's [CLS] state, the prompt attending to every
  image token, through the MLP, then (raw - 0.16717362830052426) / 1.0333394966054072 (the published mean/std);
  prompts as the official tokenizer (bert-base-uncased plus BLIP's [DEC] and [ENC]) pads and truncates them, to
  35 tokens, [CLS] first. Images: 224 px, bicubic shorter side + center crop (the published PIL transform, here
  on tensors with antialias), OpenAI CLIP mean/std.
- spo_pm (SPO's step-aware preference model, SPM): a transformers CLIPModel with PickScore's configuration
  (spo_pm_model; only its config is read) whose vision tower is conditioned on the timestep t: a sinusoidal
  embedding of t (256 features) through an MLP gives c; in every vision encoder layer a Linear on SiLU(c) gives
  shift, scale and gate for the attention and the MLP branch (x * (1 + scale) + shift after each LayerNorm, the
  branch output times its gate), and one more modulates the pooled output (after post_layernorm, before the
  projection). Weights: the released file (a torch.save'd state dict, every key under `model.`, as the official
  loader wants); spo_pm_checkpoint names the SD1.5 one by default, sdxl_step-aware_preference_model.bin is the
  SDXL one. Score as PickScore: logit_scale.exp() * cosine. Preprocessing is the official SPO code's (not the
  CLIP processor's): bicubic without antialias to the processor's shortest edge (sizes rounded half up),
  torchvision's center crop, clamp, CLIP mean/std; prompts padded to the full context, no attention mask (CLIP's
  causal mask makes that the same). Called without timesteps it scores at t = 0, as the official code scores the
  final images.
- random_shift (FDXL, Sec. 5): before resizing to the model's input size r_in, crop m = ceil(max(H, W) / r_in)
  pixels off each axis, split at random between the two sides and per image, i.e. the sampling grid moves by
  0..m pixels.

Options (keyword arguments of `build_reward`; `--reward_options key=value,...` on the command line). Every
model option takes a hub id or a local path; hub files are written `owner/repo/filename`.

| option               | default                                                     | used by                    |
| -------------------- | ----------------------------------------------------------- | -------------------------- |
| aesthetic_clip       | openai/clip-vit-large-patch14 (transformers CLIP)           | aesthetic                  |
| aesthetic_mlp        | trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth        | aesthetic                  |
| aesthetic_head       | linear (`relu`: LAION's ava+logos-l14-reluMSE.pth head)     | aesthetic                  |
| clip_model           | ViT-H-14 (open_clip architecture name, or a local .json)    | clipscore, symmetry        |
| clip_pretrained      | laion2b_s32b_b79k (open_clip tag, or a checkpoint file)     | clipscore, symmetry        |
| pickscore_model      | yuvalkirstain/PickScore_v1 (transformers CLIP)              | pickscore                  |
| pickscore_processor  | laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer, mean/std) | pickscore                  |
| hps_model            | ViT-H-14 (open_clip architecture name, or a local .json)    | hpsv21                     |
| hps_checkpoint       | xswu/HPSv2/HPS_v2.1_compressed.pt ({'state_dict': ...})     | hpsv21                     |
| symmetry_clip_weight | 0.0                                                         | symmetry                   |
| jpeg_quality         | 50 (1..100)                                                 | compressibility, jpeg_size |
| owlvit_model         | google/owlvit-base-patch32                                  | objectness                 |
| objectness_query     | book                                                        | objectness                 |
| random_shift         | False                                                       | every model reward         |
| imagereward_checkpoint | THUDM/ImageReward/ImageReward.pt (the published state dict) | imagereward              |
| imagereward_tokenizer | google-bert/bert-base-uncased                              | imagereward                |
| spo_pm_checkpoint    | SPO-Diffusion-Models/Step-Aware_Preference_Models/SD15_SPM  | spo_pm                     |
| spo_pm_model         | yuvalkirstain/PickScore_v1 (only its CLIPConfig)            | spo_pm                     |
| spo_pm_processor     | laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer, mean/std) | spo_pm                     |

SD15_SPM is sd-v1-5_step-aware_preference_model.bin; the SDXL model is sdxl_step-aware_preference_model.bin.

Checkpoints are read with safetensors or torch.load(weights_only=True), never with remote code. A hub
reference that cannot be fetched (offline, not cached) or a local path that does not exist raises
RewardLoadError naming it and the option that takes a local path; `check_options` runs the cheap checks
without loading anything.

Score a folder of images (prompts from a file, else NAME.txt beside each image, else ""):

    python rewards.py --reward pickscore --images samples/ --prompts prompts.txt --device cuda
    python rewards.py --reward symmetry --images samples/ --json
"""

import argparse
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

OPTIONS = {
    "aesthetic_clip": "openai/clip-vit-large-patch14",
    "aesthetic_mlp": "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
    "aesthetic_head": "linear",
    "clip_model": "ViT-H-14",
    "clip_pretrained": "laion2b_s32b_b79k",
    "pickscore_model": "yuvalkirstain/PickScore_v1",
    "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "hps_model": "ViT-H-14",
    "hps_checkpoint": "xswu/HPSv2/HPS_v2.1_compressed.pt",
    "symmetry_clip_weight": 0.0,
    "jpeg_quality": 50,
    "owlvit_model": "google/owlvit-base-patch32",
    "objectness_query": "book",
    "random_shift": False,
    "imagereward_checkpoint": "THUDM/ImageReward/ImageReward.pt",
    "imagereward_tokenizer": "google-bert/bert-base-uncased",
    "spo_pm_checkpoint": "SPO-Diffusion-Models/Step-Aware_Preference_Models/sd-v1-5_step-aware_preference_model.bin",
    "spo_pm_model": "yuvalkirstain/PickScore_v1",
    "spo_pm_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
}

# How each path option may name a hub object when it is not an existing local path.
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/repo: a transformers folder
_HUB_FILE = re.compile(r"[\w.-]+/[\w.-]+/[\w.+-]+")  # owner/repo/filename
_OPEN_CLIP_TAG = re.compile(r"[\w-]+")  # an open_clip pretrained tag such as laion2b_s32b_b79k
_PATH_OPTIONS = {
    "aesthetic_clip": _HUB_ID,
    "aesthetic_mlp": _HUB_FILE,
    "clip_model": _OPEN_CLIP_TAG,  # an open_clip architecture name, or a local .json model config
    "clip_pretrained": _OPEN_CLIP_TAG,
    "hps_model": _OPEN_CLIP_TAG,
    "pickscore_model": _HUB_ID,
    "pickscore_processor": _HUB_ID,
    "hps_checkpoint": _HUB_FILE,
    "owlvit_model": _HUB_ID,
    "imagereward_checkpoint": _HUB_FILE,
    "imagereward_tokenizer": _HUB_ID,
    "spo_pm_checkpoint": _HUB_FILE,
    "spo_pm_model": _HUB_ID,
    "spo_pm_processor": _HUB_ID,
}
_STD_EPS = 1e-8  # eq. 6: std = sqrt(var + eps), finite value and gradient for a constant image


class RewardLoadError(RuntimeError):
    """A reward model could not be found: a missing local path, or a hub object that is not reachable."""


# ---------------------------------------------------------------------------------------------------------
# Loading: local path or hub reference, one clear error either way
# ---------------------------------------------------------------------------------------------------------


def _is_local(reward, option, value):
    """True for an existing local path, False for something shaped like a hub reference; else raise."""
    if os.path.exists(value):
        return True
    if _PATH_OPTIONS[option].fullmatch(value):
        return False
    raise RewardLoadError(f"{reward}: {option}={value!r}: no such file or directory")


def _check_local(reward, option, value):
    """A local path is what its option says, read cheaply before any model loads: a checkpoint file that
    safetensors or torch.load(weights_only=True) opens (memory-mapped: no weights read), a model folder (hub id
    options), an open_clip JSON config; else RewardLoadError naming the option and the fix."""
    kind = _PATH_OPTIONS[option]
    if kind is _HUB_ID:
        if not os.path.isdir(value):
            raise RewardLoadError(f"{reward}: {option}={value!r} is a file; give a model folder (with config.json) "
                                  f"or a hub id in --reward_options")
        return
    if option in ("clip_model", "hps_model"):
        if not str(value).endswith(".json") or not os.path.isfile(value):
            raise RewardLoadError(f"{reward}: {option}={value!r}: give an open_clip architecture name (e.g. "
                                  f"ViT-H-14) or a local open_clip model config .json in --reward_options")
        try:
            json.loads(Path(value).read_text())
        except (OSError, ValueError) as e:
            raise RewardLoadError(f"{reward}: {option}={value!r} is not a JSON open_clip model config "
                                  f"({type(e).__name__}); fix it in --reward_options") from e
        return
    if os.path.isdir(value):
        raise RewardLoadError(f"{reward}: {option}={value!r} is a folder; give the checkpoint file in --reward_options")
    try:
        if str(value).endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(value, framework="pt"):
                pass
        else:
            try:
                torch.load(value, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # not torch's zip format: no memory map, read it
                if "mmap" not in str(e):
                    raise
                torch.load(value, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the file is, the user's fix is the same: another file
        first = (str(e).strip().splitlines() or [""])[0][:160]
        with open(value, "rb") as f:
            head = f.read(12)
        image = head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")) or head[8:12] == b"WEBP"
        refused = "pickle" in str(e).lower() or "weights_only" in str(e)
        why = ("an image file" if image else "torch.load(weights_only=True) refuses it: pickled objects beyond "
               "tensors, or not a torch.save file" if refused else f"{type(e).__name__}: {first}")
        raise RewardLoadError(f"{reward}: {option}={value!r} is not a readable checkpoint ({why}); give a "
                              f"safetensors or plain torch.save state-dict file in --reward_options") from e


def _check_open_clip_name(reward, option, value):
    """An open_clip architecture name that open_clip knows (a hub reference is not checked here)."""
    import open_clip
    if value not in open_clip.list_models() and not value.startswith("hf-hub:"):
        close = [m for m in open_clip.list_models() if value.lower().replace("/", "-") in m.lower()][:5]
        raise RewardLoadError(f"{reward}: {option}={value!r} is not an open_clip architecture "
                              f"({'did you mean ' + ', '.join(close) + '? ' if close else ''}e.g. ViT-H-14, or a "
                              f"local .json model config) in --reward_options")


def _unreachable(reward, option, what, example):
    return RewardLoadError(
        f"{reward}: could not load {what} (offline or not cached); "
        f"pass a local path with --reward_options {option}={example}"
    )


def _from_pretrained(cls, reward, option, value):
    """`cls.from_pretrained` on a local folder or a hub id."""
    if _is_local(reward, option, value):
        return cls.from_pretrained(value)
    try:
        return cls.from_pretrained(value)
    except OSError as e:
        raise _unreachable(reward, option, repr(value), f"/path/{value.split('/')[-1]}") from e


def _checkpoint_file(reward, option, value):
    """Local path of a checkpoint given as a local file or as `owner/repo/filename` on the hub."""
    if _is_local(reward, option, value):
        return value
    from huggingface_hub import hf_hub_download

    repo_id, filename = value.rsplit("/", 1)
    try:
        return hf_hub_download(repo_id, filename)
    except OSError as e:
        raise _unreachable(reward, option, repr(value), f"/path/{filename}") from e


def _load_state_dict(path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_into_empty(build, state_dict, reward, path):
    """build() constructed without allocating its parameters, then every parameter taken from state_dict,
    strictly. Non-persistent buffers are built normally; `*.position_ids` entries that older transformers
    versions wrote into checkpoints are accepted when they equal the buffer (as the official loaders accept them)
    and dropped."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    buffers = dict(model.named_buffers())
    state_dict = dict(state_dict)
    for key in [k for k in state_dict if k.endswith("position_ids")]:
        value = state_dict.pop(key)
        if key not in buffers or not torch.equal(value.to(buffers[key].dtype), buffers[key]):
            raise RuntimeError(f"{reward}: {path}: unexpected key {key!r}")
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"{reward}: {path} is not in the expected layout: missing keys "
                           f"{result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}")
    return model


def _open_clip_config(path):
    """Register a local open_clip model config (a JSON file, e.g. the tiny world's CLIP) under its file stem; a
    `text_cfg.hf_tokenizer_name` relative to the file names a transformers tokenizer folder. -> (name, tokenizer)"""
    import open_clip

    path = Path(path).resolve()
    open_clip.add_model_config(path)
    text_cfg = json.loads(path.read_text()).get("text_cfg", {})
    tokenizer = None
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer = open_clip.tokenizer.HFTokenizer(str(path.parent / text_cfg["hf_tokenizer_name"]),
                                                    context_length=text_cfg.get("context_length", 77))
    return path.stem, tokenizer


def _open_clip(reward, option, name, pretrained):
    """open_clip model `name` (an architecture name or a local JSON config) with weights from a local checkpoint
    or an open_clip pretrained tag."""
    import open_clip

    tokenizer = None
    if name.endswith(".json"):
        name, tokenizer = _open_clip_config(name)
    if not _is_local(reward, option, pretrained):
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise RewardLoadError(f"{reward}: {option}={pretrained!r} is neither a file nor a tag of {name} {tags}")
        try:  # fetch first so that offline use fails here; create_model then finds the file in the cache
            open_clip.download_pretrained(cfg)
        except OSError as e:
            source = cfg.get("hf_hub", "").rstrip("/") or cfg.get("url")
            what = f"open_clip {name} {pretrained!r} from {source!r}"
            raise _unreachable(reward, option, what, "/path/open_clip_model.safetensors") from e
    return open_clip.create_model(name, pretrained=pretrained), tokenizer or open_clip.get_tokenizer(name)


def _frozen(model, device, dtype):
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _features(output):
    """transformers 5 returns an output object from get_*_features (4.x returned the tensor)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ---------------------------------------------------------------------------------------------------------
# Preprocessing on tensors
# ---------------------------------------------------------------------------------------------------------


def _random_shift(images, r_in):
    """FDXL: move the downsampling grid by 0..ceil(r_out / r_in) pixels, per image, by cropping."""
    h, w = images.shape[-2:]
    m = math.ceil(max(h, w) / r_in)
    offsets = torch.randint(0, m + 1, (len(images), 2)).tolist()
    return torch.stack([img[:, dy : h - m + dy, dx : w - m + dx] for img, (dy, dx) in zip(images, offsets)])


def _preprocess(images, size, mean, std, *, random_shift, crop=True, device, dtype):
    """(B, 3, H, W) in [0, 1] -> normalized (B, 3, *size) model input; crop=False squashes instead."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if random_shift:
        images = _random_shift(images, min(size))
    h, w = images.shape[-2:]
    if crop:  # shorter side to size, then center crop, rounding as torchvision's Resize and CenterCrop do
        scale = max(size[0] / h, size[1] / w)
        resized = (max(size[0], int(h * scale)), max(size[1], int(w * scale)))
    else:
        resized = size
    x = F.interpolate(images, size=resized, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = round((resized[0] - size[0]) / 2), round((resized[1] - size[1]) / 2)
    x = x[..., top : top + size[0], left : left + size[1]]
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Reward factories: factory(device, dtype, options) -> score(images, prompts) -> (reward, raw), each (B,)
# ---------------------------------------------------------------------------------------------------------


class _AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor head, state-dict keys as published: layers.0/2/4/6/7 for the linear head
    (sac+logos+ava1-l14-linearMSE.pth), layers.0/3/6/9/11 for the one with a ReLU after each hidden layer
    (ava+logos-l14-reluMSE.pth)."""

    KEYS = {"linear": (0, 2, 4, 6, 7), "relu": (0, 3, 6, 9, 11)}

    def __init__(self, in_features, head="linear"):
        super().__init__()
        sizes, dropouts = [in_features, 1024, 128, 64, 16], [0.2, 0.2, 0.1]
        modules = []
        for i in range(4):
            modules.append(nn.Linear(sizes[i], sizes[i + 1]))
            modules += [nn.ReLU()] if head == "relu" else []
            modules += [nn.Dropout(dropouts[i])] if i < 3 else []
        self.layers = nn.Sequential(*modules, nn.Linear(16, 1))

    def forward(self, embeds):
        return self.layers(embeds).squeeze(-1)


def _aesthetic(device, dtype, o):
    from transformers import CLIPImageProcessor, CLIPModel

    clip = _from_pretrained(CLIPModel, "aesthetic", "aesthetic_clip", o.aesthetic_clip)
    processor = _from_pretrained(CLIPImageProcessor, "aesthetic", "aesthetic_clip", o.aesthetic_clip)
    mlp = _AestheticMLP(clip.config.projection_dim, o.aesthetic_head)
    state_dict = _load_state_dict(_checkpoint_file("aesthetic", "aesthetic_mlp", o.aesthetic_mlp))
    layers = tuple(sorted({int(k.split(".")[1]) for k in state_dict if re.fullmatch(r"layers\.\d+\.(weight|bias)", k)}))
    head = next((name for name, keys in _AestheticMLP.KEYS.items() if keys == layers), None)
    if head is None or len(state_dict) != 2 * len(layers):
        raise RewardLoadError(f"aesthetic: aesthetic_mlp={o.aesthetic_mlp!r} is not a LAION aesthetic head (keys "
                              f"{', '.join(sorted(state_dict))[:120]}; expected layers.0/2/4/6/7 or layers.0/3/6/9/11)")
    if head != o.aesthetic_head:
        raise RewardLoadError(f"aesthetic: aesthetic_mlp={o.aesthetic_mlp!r} is the {head} head (keys layers."
                              f"{'/'.join(map(str, layers))}); pass --reward_options aesthetic_head={head}")
    try:
        mlp.load_state_dict(state_dict)
    except RuntimeError as e:  # the right keys, the wrong shapes
        raise RewardLoadError(f"aesthetic: aesthetic_mlp={o.aesthetic_mlp!r} does not fit CLIP "
                              f"{o.aesthetic_clip!r}: {' '.join(str(e).split())[:200]}") from e
    clip, mlp = _frozen(clip, device, dtype), _frozen(mlp, device, dtype)
    size = clip.config.vision_config.image_size

    def score(images, prompts):
        x = _preprocess(images, size, processor.image_mean, processor.image_std,
                        random_shift=o.random_shift, device=device, dtype=dtype)
        embeds = F.normalize(_features(clip.get_image_features(pixel_values=x)), dim=-1)
        value = mlp(embeds).float()
        return value, value

    return score


def _open_clip_cosine(model, tokenizer, device, dtype, random_shift):
    """score(images, prompts) -> row-wise cosine of an open_clip model's image and text embeddings."""
    cfg = model.visual.preprocess_cfg

    def cosine(images, prompts):
        x = _preprocess(images, cfg["size"], cfg["mean"], cfg["std"], random_shift=random_shift,
                        device=device, dtype=dtype)
        image_embeds = model.encode_image(x, normalize=True)
        text_embeds = model.encode_text(tokenizer(prompts).to(device), normalize=True)
        value = (image_embeds * text_embeds).sum(-1).float()
        return value, value

    return cosine


def _clipscore(device, dtype, o):
    model, tokenizer = _open_clip("clipscore", "clip_pretrained", o.clip_model, o.clip_pretrained)
    return _open_clip_cosine(_frozen(model, device, dtype), tokenizer, device, dtype, o.random_shift)


def _hpsv21(device, dtype, o):
    checkpoint = _checkpoint_file("hpsv21", "hps_checkpoint", o.hps_checkpoint)
    model, tokenizer = _open_clip("hpsv21", "hps_checkpoint", o.hps_model, checkpoint)
    return _open_clip_cosine(_frozen(model, device, dtype), tokenizer, device, dtype, o.random_shift)


def _pickscore(device, dtype, o):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = _frozen(_from_pretrained(CLIPModel, "pickscore", "pickscore_model", o.pickscore_model), device, dtype)
    tokenizer = _from_pretrained(AutoTokenizer, "pickscore", "pickscore_processor", o.pickscore_processor)
    processor = _from_pretrained(CLIPImageProcessor, "pickscore", "pickscore_processor", o.pickscore_processor)
    size = model.config.vision_config.image_size
    max_length = model.config.text_config.max_position_embeddings

    def score(images, prompts):
        x = _preprocess(images, size, processor.image_mean, processor.image_std,
                        random_shift=o.random_shift, device=device, dtype=dtype)
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        image_embeds = F.normalize(_features(model.get_image_features(pixel_values=x)), dim=-1)
        text_embeds = F.normalize(_features(model.get_text_features(**tokens.to(device))), dim=-1)
        value = (model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)).float()
        return value, value

    return score


def _symmetry(device, dtype, o):
    clip = _clipscore(device, dtype, o) if o.symmetry_clip_weight > 0 else None

    def score(images, prompts):
        x = images.float()
        l1 = (x - x.flip(-1)).abs().mean(dim=(1, 2, 3))
        std = torch.sqrt(x.var(dim=(1, 2, 3), correction=0) + _STD_EPS)
        value = l1 / std  # eq. 6
        reward = -value
        if clip is not None:
            reward = reward + o.symmetry_clip_weight * clip(images, prompts)[0]
        return reward, value

    return score


def _compressibility(device, dtype, o):
    from kornia.enhance import jpeg_codec_differentiable

    def score(images, prompts):
        x = images.float()
        quality = torch.full((len(x),), float(o.jpeg_quality), device=x.device)
        error = (x - jpeg_codec_differentiable(x, quality)).square().mean(dim=(1, 2, 3))  # eq. 7
        return -error, error

    return score


def _objectness(device, dtype, o):
    from transformers import AutoTokenizer, OwlViTForObjectDetection, OwlViTImageProcessor

    model = _frozen(_from_pretrained(OwlViTForObjectDetection, "objectness", "owlvit_model", o.owlvit_model),
                    device, dtype)
    tokenizer = _from_pretrained(AutoTokenizer, "objectness", "owlvit_model", o.owlvit_model)
    processor = _from_pretrained(OwlViTImageProcessor, "objectness", "owlvit_model", o.owlvit_model)
    size = model.config.vision_config.image_size
    query = tokenizer([o.objectness_query], padding="max_length", truncation=True,
                      max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(device)

    def score(images, prompts):
        x = _preprocess(images, size, processor.image_mean, processor.image_std,
                        random_shift=o.random_shift, crop=False, device=device, dtype=dtype)
        n = len(x)
        logits = model(input_ids=query.input_ids.expand(n, -1), attention_mask=query.attention_mask.expand(n, -1),
                       pixel_values=x).logits  # (B, boxes, 1)
        max_prob = logits[..., 0].amax(dim=1).float().sigmoid()
        return -max_prob, max_prob

    return score


def _jpeg_size(device, dtype, o):
    from PIL import Image

    def score(images, prompts):
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        sizes = []
        for array in pixels.numpy():
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=o.jpeg_quality)
            sizes.append(buffer.tell() / 1000)
        kilobytes = torch.tensor(sizes, device=images.device)
        return -kilobytes, kilobytes

    return score


# ---------------------------------------------------------------------------------------------------------
# SPO's step-aware preference model (spo_pm): PickScore's CLIP with a timestep-conditioned vision tower
# ---------------------------------------------------------------------------------------------------------


class _TimestepEmbedder(nn.Module):
    """t (B,) -> (B, width): 256 sinusoidal features (cosines of the 128 frequencies 10000^(-i/128), then their
    sines), then Linear-SiLU-Linear; keys mlp.0 and mlp.2 as in the SPM checkpoints."""

    def __init__(self, width, frequencies=256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, timesteps):
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=timesteps.device) / half)
        angles = timesteps.float()[:, None] * freqs[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class _StepAwareCLIP(nn.Module):
    """The SPM checkpoint layout: `model.` + a transformers CLIPModel state dict (PickScore's architecture) + the
    modules below, with the names of the official code so that the released files load strictly:
        model.t_embedder.mlp.{0,2}                          timestep embedding c (B, D), D the vision width
        model.vision_model.encoder.layers.N.adaLN_modulation.1   Linear(D, 6D) on SiLU(c): shift, scale, gate of
                                                            the attention branch, then of the MLP branch
        model.vision_model.adaLN_modulation.1               Linear(D, 2D) on SiLU(c): shift, scale of the pooled
                                                            output (after post_layernorm, before the projection)
    The text tower is PickScore's, untouched."""

    def __init__(self, config):
        from transformers import CLIPModel

        super().__init__()
        self.model = CLIPModel(config)
        width = config.vision_config.hidden_size
        for layer in self.model.vision_model.encoder.layers:
            layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.model.vision_model.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.model.t_embedder = _TimestepEmbedder(width)

    def image_features(self, pixel_values, timesteps):
        """(B, 3, S, S) normalized pixels, (B,) timesteps -> (B, projection_dim) unnormalized image embeddings."""
        vision = self.model.vision_model
        cond = self.model.t_embedder(timesteps)  # (B, D)
        hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))  # (B, 1 + patches, D)
        for layer in vision.encoder.layers:
            # DiT-style adaLN: x * (1 + scale) + shift after each pre-norm, the branch output times its gate
            shift1, scale1, gate1, shift2, scale2, gate2 = layer.adaLN_modulation(cond)[:, None].chunk(6, dim=-1)
            attn_out = layer.self_attn(hidden_states=layer.layer_norm1(hidden) * (1 + scale1) + shift1)[0]
            hidden = hidden + gate1 * attn_out
            hidden = hidden + gate2 * layer.mlp(layer.layer_norm2(hidden) * (1 + scale2) + shift2)
        shift, scale = vision.adaLN_modulation(cond).chunk(2, dim=-1)
        pooled = vision.post_layernorm(hidden[:, 0]) * (1 + scale) + shift  # the class token
        return self.model.visual_projection(pooled)


def _spo_pm_inputs(images, size, mean, std, *, random_shift, device, dtype):
    """The official SPO preprocessing of the decoded x_0 predictions: bicubic without antialiasing to a shorter
    side of `size` (sizes rounded half up), center crop as torchvision's CenterCrop, clamp, CLIP mean/std."""
    if random_shift:
        images = _random_shift(images, size)
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    resized = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = F.interpolate(images, size=resized, mode="bicubic", align_corners=False)
    top, left = int(round((resized[0] - size) / 2)), int(round((resized[1] - size) / 2))
    x = x[..., top : top + size, left : left + size].clamp(0, 1)
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device=device, dtype=dtype)


def _spo_pm(device, dtype, o):
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor

    config = _from_pretrained(CLIPConfig, "spo_pm", "spo_pm_model", o.spo_pm_model)
    tokenizer = _from_pretrained(AutoTokenizer, "spo_pm", "spo_pm_processor", o.spo_pm_processor)
    processor = _from_pretrained(CLIPImageProcessor, "spo_pm", "spo_pm_processor", o.spo_pm_processor)
    path = _checkpoint_file("spo_pm", "spo_pm_checkpoint", o.spo_pm_checkpoint)
    model = _load_into_empty(lambda: _StepAwareCLIP(config), _load_state_dict(path), "spo_pm", path)
    model = _frozen(model, device, dtype)
    size = processor.size["shortest_edge"]
    max_length = config.text_config.max_position_embeddings

    def score(images, prompts, timesteps=None):
        x = _spo_pm_inputs(images, size, processor.image_mean, processor.image_std, random_shift=o.random_shift,
                           device=device, dtype=dtype)
        t = torch.zeros(len(x)) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float32)
        t = t.reshape(-1).expand(len(x)).to(device)
        # padded to the full context and no attention mask, as the official code; CLIP's causal mask makes the
        # pooled EOS state independent of the padding anyway
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length,
                           return_tensors="pt").input_ids.to(device)
        image_embeds = F.normalize(model.image_features(x, t), dim=-1)
        text_embeds = F.normalize(_features(model.model.get_text_features(input_ids=tokens)), dim=-1)
        value = (model.model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)).float()
        return value, value

    return score


# ---------------------------------------------------------------------------------------------------------
# ImageReward: BLIP (ViT image encoder, BERT text encoder with cross-attention) + MLP head
# ---------------------------------------------------------------------------------------------------------

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # published: reward = (raw - mean) / std
_IMAGEREWARD_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the published transform: OpenAI CLIP's mean/std
_IMAGEREWARD_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGEREWARD_MAX_TOKENS = 35
# The published visual encoder is BLIP's timm-style ViT; transformers' BlipVisionModel is the same network under
# other names (the text encoder's names are already transformers' BlipTextModel's). Published suffix -> ours.
_IMAGEREWARD_VIT_KEYS = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"norm\.", "post_layernorm."),
]
_IMAGEREWARD_VIT = "blip.visual_encoder."


def _imagereward_keys(state_dict):
    """Published ImageReward.pt keys -> the module below (only blip.visual_encoder.* is renamed)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_IMAGEREWARD_VIT):
            suffix = key[len(_IMAGEREWARD_VIT):]
            for pattern, replacement in _IMAGEREWARD_VIT_KEYS:
                renamed, n = re.subn(f"^{pattern}", replacement, suffix)
                if n:
                    key = _IMAGEREWARD_VIT + renamed
                    break
        out[key] = value
    return out


def _imagereward_configs(state_dict, path):
    """BlipVisionConfig and BlipTextConfig read off the published tensors' shapes (ViT-L/16 at 224 and BERT-base
    for the released file). Not in the shapes: the head counts, taken as width / 64 (ViT-L: 16, BERT-base: 12),
    and the constants of the official code: LayerNorm eps 1e-6 (ViT) and 1e-12 (BERT), exact GELU."""
    from transformers import BlipTextConfig, BlipVisionConfig

    try:
        width = state_dict["blip.visual_encoder.cls_token"].shape[-1]
        patch = state_dict["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
        positions = state_dict["blip.visual_encoder.pos_embed"].shape[1]
        vision_depth = len({k.split(".")[3] for k in state_dict if k.startswith("blip.visual_encoder.blocks.")})
        vision_mlp = state_dict["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
        vocab, hidden = state_dict["blip.text_encoder.embeddings.word_embeddings.weight"].shape
        max_positions = state_dict["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0]
        text_depth = len({k.split(".")[4] for k in state_dict if k.startswith("blip.text_encoder.encoder.layer.")})
        text_mlp = state_dict["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]
        proj = state_dict["blip.vision_proj.weight"].shape[0]
    except KeyError as e:
        raise RuntimeError(f"imagereward: {path} is not in the published ImageReward layout: no {e}") from None
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=vision_mlp, num_hidden_layers=vision_depth,
                              num_attention_heads=width // 64, patch_size=patch,
                              image_size=patch * math.isqrt(positions - 1), layer_norm_eps=1e-6, hidden_act="gelu")
    # is_decoder builds the cross-attention layers; the forward runs as an encoder (bidirectional self-attention)
    text = BlipTextConfig(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width, intermediate_size=text_mlp,
                          num_hidden_layers=text_depth, num_attention_heads=hidden // 64,
                          max_position_embeddings=max_positions, layer_norm_eps=1e-12, hidden_act="gelu",
                          pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None, is_decoder=True)
    return vision, text, proj


class _ImageReward(nn.Module):
    """The published layout: blip.visual_encoder (ViT), blip.text_encoder (BERT, cross-attention in every layer),
    blip.vision_proj and blip.text_proj (in the file, unused by the score), mlp (the aesthetic head's layout)."""

    def __init__(self, vision_config, text_config, proj_dim):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = BlipVisionModel(vision_config)
        self.blip.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.blip.vision_proj = nn.Linear(vision_config.hidden_size, proj_dim)
        self.blip.text_proj = nn.Linear(text_config.hidden_size, proj_dim)
        self.mlp = _AestheticMLP(text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        """-> (B,) raw scores: the [CLS] state of the text encoder attending to the image, through the MLP."""
        image_embeds = self.blip.visual_encoder(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, Dv)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                      encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        return self.mlp(text.last_hidden_state[:, 0])


def _imagereward(device, dtype, o):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, "imagereward", "imagereward_tokenizer", o.imagereward_tokenizer)
    # the official tokenizer adds BLIP's two special tokens (ids 30522, 30523 of the 30524 rows); prompts never use them
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    path = _checkpoint_file("imagereward", "imagereward_checkpoint", o.imagereward_checkpoint)
    state_dict = _load_state_dict(path)
    vision, text, proj = _imagereward_configs(state_dict, path)
    model = _load_into_empty(lambda: _ImageReward(vision, text, proj), _imagereward_keys(state_dict),
                             "imagereward", path)
    model = _frozen(model, device, dtype)

    def score(images, prompts):
        x = _preprocess(images, vision.image_size, _IMAGEREWARD_PIXEL_MEAN, _IMAGEREWARD_PIXEL_STD,
                        random_shift=o.random_shift, device=device, dtype=dtype)
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=_IMAGEREWARD_MAX_TOKENS,
                           return_tensors="pt").to(device)
        raw = model(x, tokens.input_ids, tokens.attention_mask).float()
        value = (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
        return value, value

    return score


class RewardInfo(NamedTuple):
    factory: Callable  # factory(device, dtype, options) -> score(images, prompts) -> (reward, raw)
    differentiable: bool
    minimized: bool  # the paper minimizes the raw value; the reward is its negative
    doc: str
    step_aware: bool = False  # the factory's score also takes timesteps: score(images, prompts, timesteps)


REWARDS = {
    "aesthetic": RewardInfo(_aesthetic, True, False, "LAION aesthetic predictor on CLIP ViT-L/14, 1..10"),
    "clipscore": RewardInfo(_clipscore, True, False, "open_clip ViT-H-14 cosine(image, prompt)"),
    "pickscore": RewardInfo(_pickscore, True, False, "PickScore v1: logit_scale.exp() * cosine"),
    "hpsv21": RewardInfo(_hpsv21, True, False, "HPS v2.1 (open_clip ViT-H-14) cosine"),
    "symmetry": RewardInfo(_symmetry, True, True, "eq. 6 ||I - flip(I)||_1 / std(I), optional CLIPScore term"),
    "compressibility": RewardInfo(_compressibility, True, True, "eq. 7 ||I - jpeg(I)||_2^2, differentiable JPEG"),
    "objectness": RewardInfo(_objectness, True, True, "OWL-ViT max sigmoid(logit) of the query over boxes"),
    "jpeg_size": RewardInfo(_jpeg_size, False, True, "JPEG file size in kB (DDPO's compressibility)"),
    "imagereward": RewardInfo(_imagereward, True, False, "ImageReward (BLIP + MLP), normalized as published"),
    "spo_pm": RewardInfo(_spo_pm, True, False, "SPO's step-aware preference model (PickScore + adaLN on t)", True),
}
# Path options each reward loads, for check_options (symmetry adds clipscore's when its weight is > 0).
_REWARD_PATHS = {
    "aesthetic": ("aesthetic_clip", "aesthetic_mlp"),
    "clipscore": ("clip_model", "clip_pretrained"),
    "pickscore": ("pickscore_model", "pickscore_processor"),
    "hpsv21": ("hps_model", "hps_checkpoint"),
    "objectness": ("owlvit_model",),
    "imagereward": ("imagereward_checkpoint", "imagereward_tokenizer"),
    "spo_pm": ("spo_pm_checkpoint", "spo_pm_model", "spo_pm_processor"),
}


# ---------------------------------------------------------------------------------------------------------
# Plug-in rewards: your own function, named on the command line
# ---------------------------------------------------------------------------------------------------------

_PLUGINS = {}  # reference -> (RewardInfo, function), each module imported once per process


def _load_plugin(ref):
    """The function of a plug-in reference: 'path/to/file.py:function' imports that file (relative to the working
    directory), 'package.module:function' imports the module from sys.path. Raises ValueError, one line."""
    target, _, function = ref.rpartition(":")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ValueError(f"plug-in reward {ref!r}: no such file {target!r}")
        import importlib.util

        name = "reward_plugin_" + re.sub(r"\W", "_", path)
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None:
                raise ValueError(f"plug-in reward {ref!r}: {target!r} is not a Python file")
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - the user's file: report whatever it raised, in one line
                raise ValueError(f"plug-in reward {ref!r}: importing {target} failed: {type(e).__name__}: {e}") from e
            sys.modules[name] = module
    else:
        import importlib

        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"plug-in reward {ref!r}: cannot import module {target!r} ({e}); give a file as "
                             f"path/to/file.py:{function} or put its package on PYTHONPATH") from e
    fn = getattr(module, function, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ValueError(f"plug-in reward {ref!r}: {target} has no function {function!r}"
                         + (f" (it has {', '.join(found)})" if found else ""))
    return fn


def _plugin_scores(ref, out, images):
    """A plug-in's return value as a float32 tensor (B,) on the images' device; a wrong shape is one line."""
    if not torch.is_tensor(out):
        try:
            out = torch.as_tensor(out, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"plug-in reward {ref!r} returned {type(out).__name__}, not one number per image "
                             f"(a tensor, array or list of {len(images)})") from e
    if out.shape != (len(images),):
        raise ValueError(f"plug-in reward {ref!r} returned shape {tuple(out.shape)} for {len(images)} images; it must "
                         f"return one score per image, shape ({len(images)},)")
    return out.to(images.device, torch.float32)


def _plugin(ref):
    """(RewardInfo, function) of a plug-in reference, imported on first use."""
    if ref not in _PLUGINS:
        fn = _load_plugin(ref)

        def factory(device, dtype, o):
            def score(images, prompts):
                scores = _plugin_scores(ref, fn(images, list(prompts)), images)
                return scores, scores
            return score
        differentiable = bool(getattr(fn, "differentiable", False))
        _PLUGINS[ref] = RewardInfo(factory, differentiable, False, (fn.__doc__ or ref).strip().split("\n")[0]), fn
    return _PLUGINS[ref]


def _probe_plugin(ref, prompts, image_size):
    """Call a plug-in once on random images with the run's first prompts: a failure, a wrong shape, or a function
    that says it is differentiable but returns no gradient is one line before any model loads."""
    info, fn = _plugin(ref)
    images = torch.rand(len(prompts), 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    images.requires_grad_(info.differentiable)
    try:
        out = fn(images, list(prompts))
    except Exception as e:  # noqa: BLE001 - the user's function: report whatever it raised, in one line
        raise ValueError(f"plug-in reward {ref!r} failed on {len(prompts)} random {image_size}x{image_size} images: "
                         f"{type(e).__name__}: {e}") from e
    scores = _plugin_scores(ref, out, images)
    if info.differentiable and not scores.requires_grad:
        raise ValueError(f"plug-in reward {ref!r} sets differentiable = True but its scores carry no gradient to "
                         f"the images; compute them with torch ops on the images, or drop the flag")


def reward_info(name):
    """The RewardInfo of a rewards.py reward or of a plug-in reference (importing its module)."""
    return REWARDS[name] if name in REWARDS else _plugin(name)[0]


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _split_item(item):
    """'name[:weight]' or a plug-in 'file.py:function[:weight]' / 'package.module:function[:weight]' ->
    (name, weight text); a plug-in's name is its 'file.py:function' reference."""
    parts = [s.strip() for s in item.split(":")]
    if parts[0] in REWARDS or len(parts) == 1:
        return parts[0], ":".join(parts[1:])
    if parts[1].isidentifier():
        return f"{parts[0]}:{parts[1]}", ":".join(parts[2:])
    return parts[0], ":".join(parts[1:])


def is_plugin(name):
    """True for a plug-in reference 'path/to/file.py:function' or 'package.module:function'."""
    return name not in REWARDS and ":" in name


def parse_spec(spec):
    """'symmetry:1,clipscore:0.1' -> [('symmetry', 1.0), ('clipscore', 0.1)]; the weight defaults to 1. A plug-in
    reward is written 'path/to/file.py:function[:weight]' or 'package.module:function[:weight]'."""
    if not spec.strip():
        raise ValueError("empty reward spec; give NAME[:WEIGHT],...")
    components = []
    for item in spec.split(","):
        name, weight = _split_item(item)
        if name not in REWARDS and not is_plugin(name):
            raise ValueError(f"unknown reward {name!r} in {spec!r}; known: {', '.join(REWARDS)}, or your own as "
                             f"path/to/file.py:function or package.module:function")
        if name in dict(components):
            raise ValueError(f"reward {name!r} appears twice in {spec!r}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"bad weight {weight!r} for reward {name!r} in {spec!r}")
        components.append((name, value))
    return components


def _convert(name, value):
    """An option value in its default's type; strings (from the command line) are parsed."""
    if name not in OPTIONS:
        raise ValueError(f"unknown reward option {name!r}; known: {', '.join(OPTIONS)}")
    default = OPTIONS[name]
    if not isinstance(value, str) or isinstance(default, str):
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"reward option {name}={value!r}: expected true or false")
        return value.lower() in ("true", "1")
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"reward option {name}={value!r}: expected {type(default).__name__}") from None


def parse_options(text):
    """'jpeg_quality=50,objectness_query=book' -> {'jpeg_quality': 50, 'objectness_query': 'book'}."""
    options = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"reward option {item!r} is not key=value")
        options[name.strip()] = _convert(name.strip(), value.strip())
    return options


def _resolve(options):
    return SimpleNamespace(**{**OPTIONS, **{name: _convert(name, value) for name, value in options.items()}})


def check_options(spec, options=None, prompts=None, image_size=64, probe=True):
    """Validate the spec, option names and values, and that local paths exist, without loading a model; a plug-in
    reward is imported and (probe) called once on random images of image_size px with `prompts` (default two copies
    of "a photo")."""
    o = _resolve(options or {})
    if not 1 <= o.jpeg_quality <= 100:
        raise ValueError(f"reward option jpeg_quality={o.jpeg_quality}: must be in 1..100")
    if not math.isfinite(o.symmetry_clip_weight) or o.symmetry_clip_weight < 0:
        raise ValueError(f"reward option symmetry_clip_weight={o.symmetry_clip_weight}: must be a number >= 0")
    if o.aesthetic_head not in _AestheticMLP.KEYS:
        raise ValueError(f"reward option aesthetic_head={o.aesthetic_head!r}: must be one of "
                         f"{', '.join(_AestheticMLP.KEYS)}")
    for name, _ in parse_spec(spec):
        uses = [name] + (["clipscore"] if name == "symmetry" and o.symmetry_clip_weight > 0 else [])
        for reward in uses:
            for option in _REWARD_PATHS.get(reward, ()):
                if _is_local(name, option, getattr(o, option)):
                    _check_local(name, option, getattr(o, option))
                elif option in ("clip_model", "hps_model"):
                    _check_open_clip_name(name, option, getattr(o, option))
        if is_plugin(name) and probe:
            _probe_plugin(name, list(prompts or ["a photo"] * 2)[:2], image_size)


def is_differentiable(spec):
    """True when every reward of `spec` passes gradients to the images; loads no model (imports plug-ins)."""
    return all(reward_info(name).differentiable for name, _ in parse_spec(spec))


class Reward:
    """Weighted sum of rewards: reward_fn(images, prompts, timesteps=None) -> (B,) float32; see the module
    docstring. `timesteps` (an int or (B,)) reaches the step-aware rewards only (`step_aware` says if there is
    one); None scores final images (t = 0). Images outside [0, 1] are clamped for every reward but the step-aware
    ones, which resize before they clamp, as SPO's official preference model does with the decoder's output."""

    def __init__(self, components):
        self.components = components  # [(name, weight, score)]
        self.differentiable = all(reward_info(name).differentiable for name, _, _ in components)
        self.step_aware = any(reward_info(name).step_aware for name, _, _ in components)
        self.last_raw = {}

    def __call__(self, images, prompts, timesteps=None):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        total, raw, clamped = 0.0, {}, None
        for name, weight, score in self.components:
            if reward_info(name).step_aware:
                reward, raw[name] = score(images, list(prompts), timesteps)
            else:
                clamped = images.clamp(0, 1) if clamped is None else clamped
                reward, raw[name] = score(clamped, list(prompts))
            total = total + weight * reward
        self.last_raw = {name: value.detach().float() for name, value in raw.items()}
        return total.float()


def build_reward(spec, device="cpu", dtype=torch.float32, **options):
    """Load the models of `spec` once and return a `Reward`; options are listed in the module docstring."""
    check_options(spec, options, probe=False)
    o = _resolve(options)
    parts = []
    for name, weight in parse_spec(spec):
        try:
            parts.append((name, weight, reward_info(name).factory(device, dtype, o)))
        except RewardLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - a file that is not what its option says, however it fails: one line
            named = ", ".join(f"{k}={getattr(o, k)!r}" for k in _REWARD_PATHS.get(name, ()))
            first = " ".join(str(e).split())[:300]
            raise RewardLoadError(f"{name}: could not load its model ({type(e).__name__}: {first})"
                                  f"{'; check ' + named + ' in --reward_options' if named else ''}") from e
    return Reward(parts)


# ---------------------------------------------------------------------------------------------------------
# Command line: score a folder of images
# ---------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _read_image(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def _image_size(path):
    """(width, height) of an image file that decodes in full; None for a corrupt, truncated or fake one."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.convert("RGB")  # decodes every pixel: a truncated file fails here
            return image.size
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bad files
        return None


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _check_device(parser, name):
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        parser.error(f"--device {name}: no such CUDA GPU on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {name}: MPS is not available on this machine; use --device cpu")


def main(argv=None):
    parser = _OneLineParser(prog="rewards.py", description="Score every image in a folder with a rewards.py spec.")
    parser.add_argument("--reward", required=True, help=f"NAME[:WEIGHT],... of {', '.join(REWARDS)}")
    parser.add_argument("--images", required=True, type=Path, help="folder of .png/.jpg/.jpeg/.webp files")
    parser.add_argument("--prompts", type=Path,
                        help="one prompt per line in sorted file order (default: NAME.txt beside each image, else '')")
    parser.add_argument("--reward_options", default="", help=f"key=value,... of {', '.join(OPTIONS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object {scores, mean, raw}")
    args = parser.parse_args(argv)

    # Every check that needs no model first: a bad flag, path or image fails before a reward model loads.
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    _check_device(parser, args.device)
    try:
        options = parse_options(args.reward_options)
        check_options(args.reward, options)
    except (ValueError, RewardLoadError) as e:
        parser.error(" ".join(str(e).split()))
    if not args.images.is_dir():
        parser.error(f"--images {args.images} is not a folder")
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        parser.error(f"no {'/'.join(IMAGE_SUFFIXES)} files in {args.images}")
    if args.prompts:
        if not args.prompts.is_file():
            parser.error(f"--prompts {args.prompts}: no such file")
        prompts = args.prompts.read_text(encoding="utf-8", errors="replace").splitlines()
        if len(prompts) != len(files):
            parser.error(f"{args.prompts} has {len(prompts)} lines for {len(files)} images")
    else:
        prompts = [p.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
                   if p.with_suffix(".txt").is_file() else "" for p in files]
    sizes = [_image_size(path) for path in files]
    for path, size in zip(files, sizes):
        if size is None:
            print(f"rewards.py: warning: skipping {path.name}: not a readable image", file=sys.stderr)
    readable = [(path, prompt, size) for path, prompt, size in zip(files, prompts, sizes) if size is not None]
    if not readable:
        parser.error(f"--images {args.images}: no readable image")
    files, prompts, sizes = (list(column) for column in zip(*readable))
    try:
        reward_fn = build_reward(args.reward, device=args.device, **options)
    except (ValueError, RewardLoadError) as e:
        parser.error(" ".join(str(e).split()))

    batches = []  # consecutive files of the same size
    for i, size in enumerate(sizes):
        if batches and len(batches[-1][1]) < args.batch_size and batches[-1][0] == size:
            batches[-1][1].append(i)
        else:
            batches.append((size, [i]))

    scores, raw = {}, {}
    with torch.inference_mode():
        for _, indices in batches:
            images = torch.stack([_read_image(files[i]) for i in indices]).to(args.device)
            values = reward_fn(images, [prompts[i] for i in indices]).tolist()
            for k, i in enumerate(indices):
                scores[files[i].name] = values[k]
                for name, value in reward_fn.last_raw.items():
                    raw.setdefault(name, {})[files[i].name] = value[k].item()
    mean = sum(scores.values()) / len(scores)
    if args.json:
        print(json.dumps({"scores": scores, "mean": mean, "raw": raw}))
    else:
        for name, value in scores.items():
            print(f"{name}\t{value:.6f}")
        print(f"mean\t{mean:.6f}")


if __name__ == "__main__":
    sys.exit(main())
