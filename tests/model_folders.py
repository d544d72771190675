"""Model folders that are incomplete in each way a download or a copy leaves them (weights, a config, a --variant's
files, a shard missing), and complete ones in each layout from_pretrained reads (a variant, sharded, pickled .bin),
built from the tiny pipelines in tiny_models/ for the one-line-error tests of the scripts and evaluate.py."""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {name: os.path.join(ROOT, "tiny_models", name) for name in ("sd15", "sdxl", "sd35", "flux")}
UNET = "unet/diffusion_pytorch_model.safetensors"


def copy(root, name, family="sd15"):
    path = os.path.join(root, name)
    shutil.copytree(TINY[family], path)
    return path


def shard(folder, stem="diffusion_pytorch_model", parts=2):
    """Split folder/{stem}.safetensors into `parts` shards and the index diffusers and transformers write."""
    state = load_file(os.path.join(folder, f"{stem}.safetensors"))
    keys, weight_map = sorted(state), {}
    for i in range(parts):
        name = f"{stem}-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = keys[i::parts]
        save_file({k: state[k] for k in part}, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    os.remove(os.path.join(folder, f"{stem}.safetensors"))
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump(dict(metadata={}, weight_map=weight_map), f)
    return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]


def to_variant(path, subfolders, variant="fp16"):
    for sub in subfolders:
        for name in os.listdir(os.path.join(path, sub)):
            if name.endswith(".safetensors"):
                stem = name.rsplit(".", 1)[0]
                os.rename(os.path.join(path, sub, name), os.path.join(path, sub, f"{stem}.{variant}.safetensors"))


def to_bin(folder, stem, bin_stem):
    state = load_file(os.path.join(folder, f"{stem}.safetensors"))
    torch.save(state, os.path.join(folder, f"{bin_stem}.bin"))
    os.remove(os.path.join(folder, f"{stem}.safetensors"))


def incomplete(root):
    """name -> (model folder, extra flags, the flag the line must name, what it must say)."""
    root = str(root)
    cases = {}
    path = copy(root, "no-unet-weights")
    os.remove(os.path.join(path, UNET))
    cases["unet weights"] = (path, {}, "--pretrained_model_name_or_path", "unet has no weights file")
    cases["variant"] = (TINY["sd15"], dict(variant="fp16"), "--variant fp16",
                        "unet/diffusion_pytorch_model.fp16.safetensors is missing")
    path = copy(root, "fp16-but-text-encoder")
    to_variant(path, ["unet", "vae"])
    cases["variant of one component"] = (path, dict(variant="fp16"), "--variant fp16",
                                         "text_encoder/model.fp16.safetensors is missing")
    path = copy(root, "no-text-encoder-config")
    os.remove(os.path.join(path, "text_encoder", "config.json"))
    cases["config"] = (path, {}, "--pretrained_model_name_or_path", "text_encoder/config.json is missing")
    path = copy(root, "missing-shard")
    os.remove(shard(os.path.join(path, "unet"))[1])
    cases["shard"] = (path, {}, "--pretrained_model_name_or_path",
                      "unet/diffusion_pytorch_model.safetensors.index.json names 2 shards, 1 missing")
    path = copy(root, "bad-index")
    shard(os.path.join(path, "unet"))
    with open(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        f.write("not json")
    cases["index"] = (path, {}, "--pretrained_model_name_or_path", "is not a shard index")
    path = copy(root, "sdxl-no-text-encoder-2", "sdxl")
    os.remove(os.path.join(path, "text_encoder_2", "model.safetensors"))
    cases["sdxl text_encoder_2"] = (path, {}, "--pretrained_model_name_or_path", "text_encoder_2 has no weights file")
    path = copy(root, "sd3-no-t5", "sd35")
    os.remove(os.path.join(path, "text_encoder_3", "model.safetensors"))
    cases["sd3 text_encoder_3"] = (path, {}, "--pretrained_model_name_or_path", "text_encoder_3 has no weights file")
    path = copy(root, "flux-no-vae", "flux")
    os.remove(os.path.join(path, "vae", "diffusion_pytorch_model.safetensors"))
    cases["flux vae"] = (path, {}, "--pretrained_model_name_or_path", "vae has no weights file")
    vae = os.path.join(root, "vae-without-weights")
    shutil.copytree(os.path.join(TINY["sd15"], "vae"), vae)
    os.remove(os.path.join(vae, "diffusion_pytorch_model.safetensors"))
    cases["--pretrained_vae_model_name_or_path"] = (TINY["sd15"], dict(pretrained_vae_model_name_or_path=vae),
                                                    "--pretrained_vae_model_name_or_path",
                                                    "the folder has no weights file")
    return cases


def complete(root):
    """name -> (model folder, extra flags): every component in one of the other layouts from_pretrained reads."""
    root = str(root)
    path = copy(root, "fp16")
    to_variant(path, ["unet", "vae", "text_encoder"])
    variant = (path, dict(variant="fp16"))
    path = copy(root, "sharded")
    shard(os.path.join(path, "unet"))
    shard(os.path.join(path, "text_encoder"), "model")
    sharded = (path, {})
    path = copy(root, "bin")
    to_bin(os.path.join(path, "unet"), "diffusion_pytorch_model", "diffusion_pytorch_model")
    to_bin(os.path.join(path, "text_encoder"), "model", "pytorch_model")
    return {"variant": variant, "sharded": sharded, "bin": (path, {})}


def hub_cache(cache, repo, remove=UNET):
    """Put a snapshot of the tiny SD1.5 pipeline, less `remove`, into the hub cache folder `cache` as `repo`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = os.path.join(str(cache), "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    shutil.copytree(TINY["sd15"], os.path.join(repo_dir, "snapshots", commit))
    if remove:
        os.remove(os.path.join(repo_dir, "snapshots", commit, remove))
    return str(cache)
