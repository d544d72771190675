"""Score a LoRA (or a --finetune full run's denoiser) the way the papers do: the plain diffusers pipeline, the same
seeds with and without the LoRA, any rewards.py reward, a table in the layout of the DRTune paper's Table 1 and a grid
of base vs tuned.

    python evaluate.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --lora outputs/drtune-sd15-hps --prompts hpsv2-benchmark \\
        --rewards hpsv21,pickscore,aesthetic,clipscore,symmetry,compressibility --seed 0
    # FDXL at the paper's LoRA scale, on 8 GPUs (the prompts are split across the processes)
    accelerate launch --num_processes 8 evaluate.py --pretrained_model_name_or_path \\
        stabilityai/stable-diffusion-xl-base-1.0 --lora outputs/drtune-sdxl --lora_scale 0.7 --prompts hpsv2-benchmark
    # objectness: the paper's prompts "[concept], and books."
    python evaluate.py --pretrained_model_name_or_path M --lora DIR --prompts concepts.txt \\
        --prompt_template "{}, and books." --rewards objectness
    # SD3.5 Medium or FLUX.1-dev at their pipelines' own settings, in bf16
    python evaluate.py --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --lora outputs/drtune-sd35 --mixed_precision bf16 --prompts hpsv2-benchmark
    # a --finetune full run (its unet/ or transformer/ folder; --run is the same flag as --lora)
    python evaluate.py --run outputs/drtune-full --prompts hpsv2-benchmark

What it does, and the choices made:
- Prompts: any source the training scripts' --eval_prompts take (read_prompt_set, duplicated from their scaffold
  and kept identical by tests/test_evaluate.py): hpsv2-benchmark (the 400 prompts of the DRTune paper, 100 per HPS v2
  style, in the order their docstring gives; NAME:/folder for a local copy of zhwang/HPDv2), pickapic-validation
  (the SPO paper's 500 Pick-a-Pic v1 validation_unique prompts), a .txt/.json file, ...
  --prompt_template puts each in a template; --num_prompts keeps the first N (the benchmark's order interleaves the
  styles, so any N covers them evenly).
- Images: the family's diffusers pipeline (FAMILY_PIPELINES), chosen from the model's components, never its name
  (an SD3Transformer2DModel: StableDiffusion3Pipeline; a FluxTransformer2DModel: FluxPipeline; two text encoders and a
  text_time UNet: StableDiffusionXLPipeline; another UNet: StableDiffusionPipeline), called as a user would, at its
  own resolution unless --resolution, with the papers' sampling settings by default for SD1.5 (50 steps, CFG 7.5)
  and SDXL (25 steps, CFG 5.0), the pipelines' own for SD3/SD3.5 (28 steps, CFG 7.0, 256 T5 tokens) and FLUX.1-dev
  (28 steps, 512 T5 tokens, guidance 3.5: FLUX.1-dev is guidance-distilled, the guidance scale is an input of the
  transformer and there is no CFG). SD1.5/SDXL sample with the pipeline's own scheduler unless --sampler (ddpm,
  ddim, dpmpp: the training scripts' samplers); SD3 and FLUX with their own flow-matching Euler scheduler. An SD3
  folder saved without T5 (text_encoder_3 null; the tiny SD3 world) is loaded without it; such a model samples as it
  was trained only at its training's --max_sequence_length (the tiny world: 77). Prompt i is generated from the
  seed SeedSequence([--seed, i]) with and without the LoRA (the family pipeline's load_lora_weights, then
  set_adapters(weights=--lora_scale)), so base and tuned differ by the LoRA alone and an image depends on its index,
  not on the number of processes (and on the batch only through the rounding of batched kernels: at most one 8-bit
  level in the tests). The safety checker is off: its black images would be scored.
- A training run's settings: with --lora a script's --output_dir, the flags left out come from its config.json
  (RUN_SETTINGS), so the LoRA is scored on images sampled as the run sampled its grids: the model (with its VAE,
  revision and variant) unless --pretrained_model_name_or_path is given, the sampler, DDIM's eta, steps, guidance
  (FLUX: the run's --guidance_embedding and --true_cfg scale), resolution, T5 length, --validation_lora_scale and
  --prompt_template. One line says which settings were used and where each came from (the run, the command line,
  the pipeline's defaults); a run's value that does not fit the model given is refused naming where it came from.
- A --finetune full run: --lora (or --run) its --output_dir, which holds the trained denoiser as a diffusers model
  folder (unet/ for SD1.5 and SDXL, transformer/ for SD3 and FLUX) instead of pytorch_lora_weights.safetensors. The
  base images are the base model's as above; for the tuned ones the pipeline's denoiser is replaced by the run's,
  loaded with the class of the pipeline's own (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel)
  in the pipeline's dtype. The settings come from the run as for a LoRA, except the grids' LoRA scale: there is no
  adapter to scale, and --lora_scale other than 1 is refused. The folder is checked against the model's denoiser
  (the same folder name, class and configuration; the weights file there) before any model loads.
- Resumable: images/base/NNNNN.png and images/tuned/NNNNN.png (NNNNN the prompt's index), each written to a
  temporary name and renamed; a rerun generates only the missing ones, each in the batch an uninterrupted run makes
  it in (so with the same pixels). images/settings.json records what the images depend on (model and its family,
  LoRA or full fine-tune, scale, prompts, seed, sampling, precision); a rerun with other settings in the same
  --output_dir is refused (scoring settings may change: scores are recomputed from the images every run).
- Several processes (accelerate launch or torchrun): prompt i is generated and scored by process i % N; the scores
  are gathered on the main process, which writes the outputs.
- Scores: every reward of --rewards separately, on the saved 8-bit images (what a user gets), the paper's raw values
  (rewards.py's last_raw: symmetry eq. 6, the compression error of eq. 7, ...), --reward_options passed through;
  --reward_resolution first down-samples the images (the DRTune paper: 224 for its 512 px SD1.5 images).
- eval.json: the settings, every prompt's raw values (base and tuned), the mean per style (a named set with styles,
  or a folder of JSON prompt files) and over all prompts, and the table's scale factors. table.md: rows base /
  tuned, a column per reward as Table 1 has them (TABLE_COLUMNS: HPS v2.1 x 100, PickScore as its cosine, i.e. the
  logit / 100, PickScore v1's logit scale; the others as computed), the arrows the paper's directions, then the
  same per style. grid.png: the first --grid_prompts prompts, base above, tuned below.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

import rewards

# Table 1's column for each reward: (heading, factor applied to the raw value, the direction the paper optimizes).
# HPS v2.1 is reported x 100 (39.18 for a cosine of 0.3918, as the HPS v2 benchmark does); PickScore as the cosine
# (0.2488), the logit rewards.py returns divided by PickScore v1's logit scale, 100.
TABLE_COLUMNS = {
    "hpsv21": ("HPS v2.1", 100.0, "↑"),
    "pickscore": ("PickScore", 0.01, "↑"),
    "aesthetic": ("Aesthetic Score", 1.0, "↑"),
    "symmetry": ("Symmetry", 1.0, "↓"),
    "clipscore": ("CLIPScore", 1.0, "↑"),
    "compressibility": ("Compression error", 1.0, "↓"),
    "objectness": ("Objectness", 1.0, "↓"),
    "imagereward": ("ImageReward", 1.0, "↑"),
    "jpeg_size": ("JPEG size (kB)", 1.0, "↓"),
    "spo_pm": ("SPO step-aware PM (logit)", 1.0, "↑"),
}
DEFAULT_REWARDS = "hpsv21,pickscore,aesthetic,clipscore,symmetry,compressibility"


def column(name):
    """(heading, scale, direction) of a reward's table column; a reward Table 1 lacks: its name, as computed."""
    return TABLE_COLUMNS.get(name, (name, 1.0, "↓" if rewards.reward_info(name).minimized else "↑"))
VARIANTS = ("base", "tuned")

# Each model family's diffusers pipeline and default sampling. SD1.5 and SDXL at the papers' settings; SD3/SD3.5
# and FLUX.1-dev at their pipelines' own (the __call__ defaults; tests/test_evaluate.py compares): FLUX.1-dev is
# guidance-distilled, its guidance_scale an input of the transformer (one pass per step, no CFG). SD3 and FLUX read
# max_sequence_length T5 tokens; SD1.5 and SDXL take 77 CLIP tokens and no such argument (None). The flow-matching
# families sample with their own FlowMatchEulerDiscreteScheduler: the DDPM-family --sampler choices do not apply.
FAMILY_PIPELINES = {
    "sd15": dict(pipeline="StableDiffusionPipeline", denoiser="unet", flow_matching=False, num_inference_steps=50,
                 guidance_scale=7.5, max_sequence_length=None),
    "sdxl": dict(pipeline="StableDiffusionXLPipeline", denoiser="unet", flow_matching=False, num_inference_steps=25,
                 guidance_scale=5.0, max_sequence_length=None),
    "sd3": dict(pipeline="StableDiffusion3Pipeline", denoiser="transformer", flow_matching=True,
                num_inference_steps=28, guidance_scale=7.0, max_sequence_length=256),
    "flux": dict(pipeline="FluxPipeline", denoiser="transformer", flow_matching=True, num_inference_steps=28,
                 guidance_scale=3.5, max_sequence_length=512),
}
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
SAMPLING_DEFAULTS = ("num_inference_steps", "guidance_scale", "max_sequence_length")  # flags the family defaults
# What a training run's config.json (in --lora, its --output_dir) gives the flags the command line leaves out, so that
# the LoRA is scored on images sampled as the run sampled its grids. The model with its VAE, revision and variant
# (only when --pretrained_model_name_or_path is not given); then each sampling flag on its own: {flag: run's key}.
# FLUX: evaluate's --guidance_scale is FluxPipeline's (the distilled guidance embedding, the run's
# --guidance_embedding) and the run's --guidance_scale under --true_cfg is FluxPipeline's true_cfg_scale. DDIM's eta
# is taken for a DDIM run only; a flow run's SDE eta has no counterpart in the pipelines (their Euler step is the ODE).
RUN_MODEL = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "variant")
RUN_SETTINGS = dict(sampler="sampler", eta="eta", num_inference_steps="num_inference_steps",
                    guidance_scale="guidance_scale", resolution="resolution", max_sequence_length="max_sequence_length",
                    lora_scale="validation_lora_scale", prompt_template="prompt_template")
FLAG_DEFAULTS = dict(sampler="pipeline", eta=0.0, lora_scale=1.0)  # without a run's value or a flag
# What --lora holds: a LoRA run's file, or a --finetune full run's denoiser as a diffusers model folder (one of these,
# the family's FAMILY_PIPELINES denoiser, written by the training scripts' save_pretrained).
LORA_FILE = "pytorch_lora_weights.safetensors"
DENOISER_FOLDERS = ("unet", "transformer")


# ---------------------------------------------------------------------------------------------
# Copied from the training scripts' scaffold (tests/test_evaluate.py keeps them identical)
# ---------------------------------------------------------------------------------------------


class UsageError(ValueError):
    """Bad input, reported as one line before any large model is loaded (exit code 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other bad input (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def is_hub_id(path):
    return re.fullmatch(r"[\w\-.]+/[\w\-.]+", path) is not None and not path.startswith(".")


def load_config_or_fail(cls, path, what, flag, **kwargs):
    """A small config file: cheap first contact with a hub id or folder, with a one-line error."""
    if not os.path.isdir(path) and not is_hub_id(path):
        raise UsageError(f"{what}: local path '{path}' does not exist ({flag})")
    try:
        return cls.load_config(path, **kwargs)
    except Exception as e:  # offline, not cached, or not a diffusers folder
        raise UsageError(f"{what}: could not load '{path}' ({type(e).__name__}); without network pass a local "
                         f"diffusers folder with {flag} /path/to/model") from e


# The files from_pretrained reads a model's weights from, by library, in the order it tries them: safetensors, then
# pickled .bin, each whole or sharded (an index whose weight_map names the shards). A --variant goes before the last
# suffix of each name, as both libraries write it: model.fp16.safetensors, model.safetensors.index.fp16.json.
WEIGHT_FILES = {"diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                              "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
                "transformers": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                 "pytorch_model.bin.index.json")}


def with_variant(name, variant):
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def check_weights(path, subfolder, library, variant, flag, revision=None):
    """One line unless the model at path/subfolder has the config and the weights its from_pretrained reads (with
    --variant: that variant's files; sharded: every shard its index names), before any model loads. A local folder is
    read; a hub id from what the hub cache holds, and online, where the cache lacks a file, from_pretrained will fetch
    it: then the hub must answer (check_hub)."""
    from huggingface_hub import constants
    if os.path.isdir(path) or constants.HF_HUB_OFFLINE:
        return check_files(path, subfolder, library, variant, flag, revision)
    try:
        check_files(path, subfolder, library, variant, flag, revision)
    except UsageError:
        check_hub(path, revision, flag)


def check_hub(path, revision, flag):
    """Online, a hub id whose files the cache lacks: one request for its model info (metadata only, seconds), so that
    a network that is down, or a repository that does not exist, is one line before any model loads."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    try:
        HfApi().model_info(path, revision=revision, timeout=20)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise UsageError(f"{flag} {path}: the hub has no such model{f' at --revision {revision}' if revision else ''} "
                         f"(or it is private: log in with hf auth login); check the id") from e
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a timeout: the download would fail the same way
        raise UsageError(f"{flag} {path}: the hub cache lacks some of its files and the hub did not answer "
                         f"({type(e).__name__}); connect to the network, or download it where there is one (hf "
                         f"download {path}) and set HF_HUB_OFFLINE=1, or give a local diffusers folder with {flag}"
                         ) from e


def check_files(path, subfolder, library, variant, flag, revision=None):
    """check_weights' reading of a local folder, or of the hub cache for a hub id."""
    from huggingface_hub import try_to_load_from_cache
    hub = not os.path.isdir(path)
    where = f"{subfolder}/" if subfolder else ""

    def find(name):  # the file's local path, or None
        if not hub:
            local = os.path.join(path, subfolder or "", name)
            return local if os.path.isfile(local) else None
        found = try_to_load_from_cache(path, where + name, revision=revision)
        return found if isinstance(found, str) else None

    fix = (f"download it with network first (hf download {path}), or give a local diffusers folder with {flag}"
           if hub else f"the folder is incomplete: download the model again, or give a complete diffusers folder "
                       f"with {flag}")
    held = "the hub cache (HF_HUB_OFFLINE is set) holds" if hub else "it has"
    if find("config.json") is None:
        raise UsageError(f"{flag} {path}: {where}config.json is "
                         f"{'not in the hub cache (HF_HUB_OFFLINE is set)' if hub else 'missing'}; {fix}")
    names = [with_variant(name, variant) for name in WEIGHT_FILES[library]]
    present = [name for name in names if find(name)]
    if not present:
        plain = [name for name in WEIGHT_FILES[library] if find(name)]
        if variant is not None and plain:
            raise UsageError(f"--variant {variant}: {flag} {path}: {where}{names[0]} is missing (nor "
                             f"{', '.join(names[1:])}), only {plain[0]}; leave out --variant, or give a folder that "
                             f"has the {variant} files")
        raise UsageError(f"{flag} {path}: {subfolder or 'the folder'} has no weights file ({held} none of "
                         f"{', '.join(names)}); {fix}")
    # the file it loads: diffusers takes an index before a whole file, transformers the first in WEIGHT_FILES' order
    chosen = next((n for n in present if n.endswith(".json")), present[0]) if library == "diffusers" else present[0]
    if chosen.endswith(".json"):  # sharded: every shard the index names
        try:
            with open(find(chosen), encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            if not all(isinstance(shard, str) for shard in shards):
                raise TypeError("a shard name that is not a string")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{flag} {path}: {where}{chosen} is not a shard index (JSON with a weight_map; "
                             f"{type(e).__name__}); {fix}") from e
        missing = [shard for shard in shards if not find(shard)]
        if missing:
            raise UsageError(f"{flag} {path}: {where}{chosen} names {len(shards)} shards, {len(missing)} missing "
                             f"({missing[0]}{', ...' if len(missing) > 1 else ''}); {fix}")


PROMPT_FILE_TYPES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PROMPT_FIELDS = ("prompt", "caption", "text")
# The HPS v2 prompts (Wu et al. 2023), in the hub dataset HPSV2_DATASET or a local copy of its JSON files: the
# benchmark, benchmark/{style}.json (a list of 800 prompts per style; the layout the hpsv2 package downloads), and the
# training annotations train.json at the top (one record per image pair, with a 'prompt' field; the place the HPS v2
# README gives, not checked against the hub here).
HPSV2_DATASET = "zhwang/HPDv2"
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
# Pick-a-Pic v1's prompts (Kirstain et al. 2023), in the hub dataset PICKAPIC_DATASET (its comparisons without the
# images) or a local copy of its files data/{split}-*.parquet: one row per comparison, the prompt in 'caption'.
PICKAPIC_DATASET = "yuvalkirstain/pickapic_v1_no_images"
PICKAPIC_SPLITS = {"pickapic-train": "train", "pickapic-validation": "validation_unique"}
PROMPT_SETS = {
    "hpsv2-benchmark": "the DRTune paper's 400 evaluation prompts: 100 of each HPS v2 benchmark style",
    "hpsv2-train": "the HPS v2 training prompts (train.json), each once",
    "pickapic-train": "the prompts of Pick-a-Pic v1's train split, each once (SPO's 4k training prompts come from it)",
    "pickapic-validation": "Pick-a-Pic v1's validation_unique split: 500 prompts (the SPO paper's evaluation prompts)",
}


def prompts_of_json(path, flag):
    """The prompts of a JSON file that holds a list of strings (HPS v2's benchmark/{style}.json) or of records with a
    'prompt', 'caption' or 'text' field (HPS v2's train.json: one record per image pair, so each distinct prompt is kept
    once, where first seen). None for any other JSON (JSON Lines, an object): datasets reads those."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError:
        return None
    if not isinstance(data, list):
        return None
    if all(isinstance(item, str) for item in data):
        return [item.strip() for item in data]
    if not all(isinstance(item, dict) for item in data):
        raise UsageError(f"{flag} {path}: a JSON prompt file holds a list of strings or of records with a 'prompt', "
                         f"'caption' or 'text' field")
    field = next((k for k in PROMPT_FIELDS if any(k in item for item in data)), None)
    if field is None:
        raise UsageError(f"{flag} {path}: no 'prompt', 'caption' or 'text' field in its records")
    return list(dict.fromkeys(str(item[field]).strip() for item in data if item.get(field) is not None))


def hpsv2_file(source, name, flag):
    """The file `name` (benchmark/anime.json, train.json) of the HPS v2 prompts: under the local folder `source`, or
    downloaded from the hub dataset `source`."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
        if not os.path.isfile(path):
            raise UsageError(f"{flag}: {source} has no {name}; a copy of {HPSV2_DATASET} holds benchmark/"
                             f"{{{','.join(HPSV2_STYLES)}}}.json and train.json")
        return path
    if not is_hub_id(source):
        raise UsageError(f"{flag}: no such folder {source}")
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(source, name, repo_type="dataset")
    except Exception as e:  # offline, not cached, no such file
        raise UsageError(f"{flag}: could not fetch {name} from the hub dataset {source} ({type(e).__name__}); without "
                         f"network copy its JSON files (benchmark/{{style}}.json, train.json) into a folder and pass "
                         f"{flag} NAME:/path/to/folder, e.g. hpsv2-benchmark:/data/HPDv2") from e


def hpsv2_prompts(name, source, flag):
    """(prompts, styles) of a named set, from a local folder or hub dataset `source`.
    hpsv2-benchmark: from each style's file the 100 prompts whose index i has the smallest
    sha256('hpsv2-benchmark/{style}/{i}'): a draw fixed once for all (no RNG whose algorithm could change), 400 in
    all. Order: round robin over the styles (anime, concept-art, paintings, photo, anime, ...), by index within a
    style, so that any prefix of the set (a training script's --num_eval_prompts grid) covers the styles evenly.
    hpsv2-train: the prompts of train.json, each once, in first-seen order (no styles)."""
    if name == "hpsv2-train":
        path = hpsv2_file(source, "train.json", flag)
        return prompts_of_json(path, flag) or [], None
    drawn = []
    for style in HPSV2_STYLES:
        path = hpsv2_file(source, f"benchmark/{style}.json", flag)
        prompts = prompts_of_json(path, flag) or []
        if len(prompts) < 100:
            raise UsageError(f"{flag}: {path} holds {len(prompts)} prompts; the benchmark draws 100 per style")
        rank = sorted(range(len(prompts)), key=lambda i: hashlib.sha256(f"{name}/{style}/{i}".encode()).hexdigest())
        drawn.append([(prompts[i], style) for i in sorted(rank[:100])])
    ordered = [pair for group in zip(*drawn) for pair in group]
    return [prompt for prompt, _ in ordered], [style for _, style in ordered]


def pickapic_prompts(name, source, flag):
    """The prompts of the Pick-a-Pic split PICKAPIC_SPLITS[name], each once, in first-seen order: from the hub
    dataset `source` (only that split's files, data/{split}-*.parquet, are downloaded) or a local folder laid out
    like it."""
    import datasets
    split = PICKAPIC_SPLITS[name]
    if not os.path.isdir(source) and not is_hub_id(source):
        raise UsageError(f"{flag}: no such folder {source}")
    try:
        data = datasets.load_dataset(source, data_files={split: f"data/{split}-*.parquet"}, split=split)
    except Exception as e:  # offline, not cached, no such files
        raise UsageError(f"{flag}: could not read data/{split}-*.parquet of {source} ({type(e).__name__}); without "
                         f"network copy those files of the hub dataset {PICKAPIC_DATASET} into a folder (as "
                         f"data/{split}-*.parquet) and pass {flag} {name}:/path/to/folder") from e
    if "caption" not in data.column_names:
        raise UsageError(f"{flag}: {source} data/{split}-*.parquet has no 'caption' column ({data.column_names})")
    return list(dict.fromkeys(str(c).strip() for c in data["caption"] if c is not None))


def read_prompt_set(source, flag="--train_prompts"):
    """(prompts, styles) of `source`; styles names each prompt's style (HPS v2 benchmark) or JSON file (a folder of
    them), else None. Sources:
    - hpsv2-benchmark, hpsv2-train (PROMPT_SETS) from the hub dataset zhwang/HPDv2, pickapic-train and
      pickapic-validation from yuvalkirstain/pickapic_v1_no_images; NAME:FOLDER reads a local copy of its files,
      NAME:OWNER/DATASET a mirror;
    - a .txt file, one prompt per line;
    - a .json file holding a list of prompts or of records with a 'prompt', 'caption' or 'text' field (HPS v2's
      benchmark and training annotations; see prompts_of_json), or a folder of such .json files (HPS v2's
      benchmark/: all of them, in file-name order);
    - a .csv/.jsonl/.parquet file (or .json of another shape), or a dataset folder or hub id, through datasets, with
      a 'prompt', 'caption' or 'text' column."""
    name, _, where = source.partition(":")
    suffix = os.path.splitext(source)[1].lower()
    styles = None
    if name in PICKAPIC_SPLITS:
        prompts = pickapic_prompts(name, where or PICKAPIC_DATASET, flag)
    elif name in PROMPT_SETS:
        prompts, styles = hpsv2_prompts(name, where or HPSV2_DATASET, flag)
    elif os.path.isdir(source) and not os.listdir(source):
        raise UsageError(f"{flag} {source} is an empty folder")
    elif os.path.isfile(source) and suffix not in (".txt", *PROMPT_FILE_TYPES):
        raise UsageError(f"{flag} {source}: give a .txt file (one prompt per line), a "
                         f"{'/'.join(PROMPT_FILE_TYPES)} file, a dataset folder or one of {', '.join(PROMPT_SETS)}")
    elif not os.path.exists(source) and (suffix in (".txt", *PROMPT_FILE_TYPES) or not is_hub_id(source)):
        raise UsageError(f"{flag} {source}: no such file or folder")
    elif suffix == ".txt":
        with open(source, encoding="utf-8") as f:
            prompts = [line.strip() for line in f]
    else:
        if os.path.isdir(source):
            files = sorted(n for n in os.listdir(source) if n.endswith(".json"))
            lists = [prompts_of_json(os.path.join(source, n), flag) for n in files]
        else:
            files, lists = [source], [prompts_of_json(source, flag) if suffix == ".json" else None]
        if lists and all(p is not None for p in lists):
            prompts = [p for ps in lists for p in ps]
            if os.path.isdir(source):
                styles = [n.removesuffix(".json") for n, ps in zip(files, lists) for _ in ps]
        else:
            prompts = prompts_from_dataset(source, suffix, flag)
    keep = [i for i, p in enumerate(prompts) if p]
    if not keep:
        raise UsageError(f"{flag} {source} holds no prompts")
    return [prompts[i] for i in keep], None if styles is None else [styles[i] for i in keep]


def prompts_from_dataset(source, suffix, flag):
    """The 'prompt', 'caption' or 'text' column of a .csv/.json/.jsonl/.parquet file, dataset folder or hub id."""
    import datasets
    try:
        if suffix in PROMPT_FILE_TYPES:
            data = datasets.load_dataset(PROMPT_FILE_TYPES[suffix], data_files=source, split="train")
        else:
            data = datasets.load_dataset(source, split="train")
    except Exception as e:  # offline, not cached, unreadable, no train split
        message = (str(e).strip().splitlines() or [""])[0][:200]
        raise UsageError(f"{flag} {source}: could not read prompts ({type(e).__name__}: {message}); without "
                         f"network give a local .txt file, one prompt per line") from e
    column = next((c for c in PROMPT_FIELDS if c in data.column_names), None)
    if column is None:
        raise UsageError(f"{flag} {source}: no 'prompt', 'caption' or 'text' column in {data.column_names}")
    return [str(p).strip() for p in data[column] if p is not None]


def apply_template(prompts, template):
    """--prompt_template: each prompt put in place of {} in the template (the DRTune paper's objectness prompts
    "[concept], and books." from "{}, and books."); the prompts as they are without one."""
    return list(prompts) if template is None else [template.replace("{}", prompt) for prompt in prompts]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def build_parser():
    parser = OneLineParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="hub id or local diffusers folder: SD1.5, SDXL, SD3/SD3.5 or FLUX family, detected from its "
                        "components (default: the run's model, with its VAE, revision and variant, when --lora is a "
                        "training script's --output_dir)")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="another VAE, e.g. an fp16-safe SDXL VAE")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--lora", "--run", default=None,
                   help="a training script's --output_dir (pytorch_lora_weights.safetensors, or with --finetune full "
                        "the trained unet/ or transformer/ model folder) or a LoRA's hub id; --run is the same flag; "
                        "without it only the base model is scored. A run's config.json there gives the sampling "
                        "settings that are not given here (RUN_SETTINGS: the run's sampler, eta, steps, guidance, "
                        "resolution, T5 length, grid LoRA scale, prompt template)")
    g.add_argument("--lora_scale", type=float, default=None,
                   help="LoRA weight at inference (FDXL: 0.7; default: the run's --validation_lora_scale, else 1); "
                        "a --finetune full run has no adapter to scale: 1 only")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="the pipeline's dtype")
    g = parser.add_argument_group("prompts and sampling")
    g.add_argument("--prompts", default="hpsv2-benchmark",
                   help="hpsv2-benchmark (NAME:/folder for a local copy of zhwang/HPDv2), pickapic-validation (SPO's "
                        "500), a .txt/.json file, a folder of .json prompt files, a dataset; as the training scripts' "
                        "--eval_prompts")
    g.add_argument("--prompt_template", default=None, help="put each prompt in place of {}, e.g. '{}, and books.'")
    g.add_argument("--num_prompts", type=int, default=None, help="the first N prompts only")
    g.add_argument("--seed", type=int, default=0, help="prompt i is generated from SeedSequence([seed, i])")
    g.add_argument("--resolution", type=int, default=None, help="default: the pipeline's own")
    g.add_argument("--num_inference_steps", type=int, default=None,
                   help="default: 50 (SD1.5), 25 (SDXL), 28 (SD3, FLUX)")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="default: CFG 7.5 (SD1.5), 5.0 (SDXL), 7.0 (SD3); FLUX.1-dev's embedded guidance 3.5 (no CFG)")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="T5 tokens of SD3 and FLUX prompts; default: the pipeline's (SD3 256, FLUX 512); a model "
                        "trained on fewer (the tiny SD3 world: 77) samples as trained only at that length")
    g.add_argument("--sampler", choices=["pipeline", "ddpm", "ddim", "dpmpp", "euler"], default=None,
                   help="the pipeline's own scheduler, or the training scripts' DDPM, DDIM (with --eta), DPM-Solver++ "
                        "2M (SD1.5 and SDXL); SD3 and FLUX sample with their own flow-matching Euler scheduler (euler, "
                        "the training scripts' name for it, is the same); default: the run's, else pipeline")
    g.add_argument("--eta", type=float, default=None,
                   help="DDIM's eta with --sampler ddim (default: the run's, else 0); the pipelines' flow Euler step "
                        "has none (a run's SDE eta is not applied: its images are sampled with the ODE)")
    g.add_argument("--true_cfg_scale", type=float, default=None,
                   help="FLUX: classifier-free guidance with the empty negative prompt (FluxPipeline's true_cfg_scale; "
                        "default: the run's --guidance_scale when it trained with --true_cfg)")
    g.add_argument("--batch_size", type=int, default=4, help="prompts per pipeline call and per scoring batch")
    g = parser.add_argument_group("scores and outputs")
    g.add_argument("--rewards", default=DEFAULT_REWARDS, help=f"comma-separated rewards.py names, of: "
                                                               f"{', '.join(rewards.REWARDS)}")
    g.add_argument("--reward_options", default="", help="rewards.py options, e.g. hps_checkpoint=/path/file.pt")
    g.add_argument("--reward_resolution", type=int, default=None,
                   help="down-sample the images to this size before scoring (the DRTune paper: 224 for SD1.5)")
    g.add_argument("--output_dir", default="outputs/eval")
    g.add_argument("--grid_prompts", type=int, default=8, help="prompts in grid.png (base above, tuned below)")
    return parser


def read_run_config(args):
    """The config.json of the training run in --lora (a script's --output_dir), or None (a hub id, a folder without
    one, a config.json that is not a training run's)."""
    if args.lora is None or not os.path.isfile(os.path.join(args.lora, "config.json")):
        return None
    path = os.path.join(args.lora, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--lora {args.lora}: its config.json is not readable JSON ({type(e).__name__}); give the "
                         f"sampling flags and --pretrained_model_name_or_path, or remove the file") from e
    return config if isinstance(config, dict) and "script" in config else None


def take_run_settings(args, config, family=None):
    """Fill the flags the command line left out (None) from the run's config.json, recording where each setting came
    from in args.setting_sources. Without family: the model (RUN_MODEL) and the family-independent settings; with
    it: guidance (FLUX's mapping), then FLAG_DEFAULTS for what is still unset. A --finetune full run's grid LoRA scale
    is not taken: it has no adapter."""
    sources = args.__dict__.setdefault("setting_sources", {})
    if family is None:
        if args.pretrained_model_name_or_path is None and config is not None:
            for key in RUN_MODEL:
                setattr(args, key, config.get(key))
            sources["pretrained_model_name_or_path"] = "run"
        values = {} if config is None else {flag: config.get(key) for flag, key in RUN_SETTINGS.items()
                                            if flag != "guidance_scale"}
        if values.get("sampler") != "ddim" or (args.sampler or "ddim") != "ddim":  # DDIM's eta, for DDIM only
            values.pop("eta", None)
        if args.full_finetune:
            values.pop("lora_scale", None)
        for flag, value in values.items():
            if getattr(args, flag) is None and value is not None:
                setattr(args, flag, value)
                sources[flag] = "run"
        if args.eta is None and config is not None and config.get("eta") and not sources.get("eta"):
            sources["eta_not_applied"] = config["eta"]
        for flag, value in FLAG_DEFAULTS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, value)
                sources.setdefault(flag, "default")
        return
    values = {}
    if config is not None and family == "flux":
        values = dict(guidance_scale=config.get("guidance_embedding"),
                      true_cfg_scale=config.get("guidance_scale") if config.get("true_cfg") else None)
    elif config is not None:
        values = dict(guidance_scale=config.get("guidance_scale"))
    for flag, value in values.items():
        if getattr(args, flag) is None and value is not None:
            setattr(args, flag, value)
            sources[flag] = "run"
    for flag in (*SAMPLING_DEFAULTS, "resolution", "true_cfg_scale"):
        sources.setdefault(flag, "command line" if getattr(args, flag) is not None else "default")
    for flag in (*RUN_SETTINGS, "pretrained_model_name_or_path"):
        sources.setdefault(flag, "command line")


def describe_settings(args):
    """The one line that says how the images are sampled and where each setting came from."""
    sources = args.setting_sources
    cfg = f"embedded guidance {args.guidance_scale:g}" if args.family == "flux" else f"CFG {args.guidance_scale:g}"
    parts = [("pretrained_model_name_or_path", f"model {args.pretrained_model_name_or_path}"),
             ("sampler", f"sampler {args.sampler}"), ("eta", f"eta {args.eta:g}"),
             ("num_inference_steps", f"{args.num_inference_steps} steps"), ("guidance_scale", cfg),
             ("true_cfg_scale", None if args.true_cfg_scale is None else f"true CFG {args.true_cfg_scale:g}"),
             ("resolution", f"{args.resolution} px" if args.resolution else "the pipeline's resolution"),
             ("max_sequence_length", None if args.max_sequence_length is None else
              f"{args.max_sequence_length} T5 tokens"),
             ("lora_scale", None if args.lora is None or args.full_finetune else f"LoRA scale {args.lora_scale:g}"),
             ("prompt_template", None if args.prompt_template is None else f"prompt template {args.prompt_template!r}")]
    parts = [(flag, text) for flag, text in parts if text is not None]
    origin = {"run": f"from {os.path.join(args.lora, 'config.json')}" if args.lora else "", "command line":
              "from the command line", "default": f"the {FAMILY_PIPELINES[args.family]['pipeline']}'s defaults"}
    groups = {}
    for flag, _ in parts:
        groups.setdefault(sources.get(flag, "default"), []).append(flag.removesuffix("_or_path"))
    where = "; ".join(f"{origin[k]}: {', '.join('--' + f for f in flags)}" for k, flags in groups.items())
    note = ""
    if "eta_not_applied" in sources:
        note = (f"; the run's eta {sources['eta_not_applied']:g} is not applied (the pipeline's "
                f"{'Euler step is the ODE' if FAMILY_PIPELINES[args.family]['flow_matching'] else 'sampler is not DDIM'})")
    if args.full_finetune:
        note += (f"; tuned: the full fine-tuned denoiser "
                 f"{os.path.join(args.lora, FAMILY_PIPELINES[args.family]['denoiser'])} in place of the model's")
    return f"evaluate.py: sampling with {', '.join(text for _, text in parts)} ({where}){note}"


def check_arguments(args):
    """Every bad input we can see without loading a large model, each as one line. Returns the prompts, their styles
    (or None), the reward names and options, and the model's family (a key of FAMILY_PIPELINES). Flags left out are
    taken from the run's config.json in --lora where it has them (RUN_SETTINGS)."""
    from diffusers import DiffusionPipeline
    if args.lora is not None and not os.path.isdir(args.lora) and not is_hub_id(args.lora):
        raise UsageError(f"--lora: no such folder '{args.lora}' (a training script's --output_dir)")
    args.full_finetune = is_full_finetune(args)
    run_config = read_run_config(args)
    take_run_settings(args, run_config)
    if args.pretrained_model_name_or_path is None:
        raise UsageError("--pretrained_model_name_or_path is required (the base model), unless --lora is a training "
                         "run's --output_dir, whose config.json names it")
    for flag in ("num_prompts", "resolution", "num_inference_steps", "max_sequence_length", "reward_resolution"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.max_sequence_length is not None and args.max_sequence_length > 512:
        raise UsageError(f"--max_sequence_length must be <= 512 (the pipelines' T5 limit), got "
                         f"{args.max_sequence_length}")
    if args.batch_size < 1 or args.grid_prompts < 0:
        raise UsageError("--batch_size must be >= 1 and --grid_prompts >= 0")
    if not math.isfinite(args.lora_scale) or args.lora_scale < 0:
        raise UsageError(f"--lora_scale must be a number >= 0, got {args.lora_scale}")
    if args.full_finetune and args.lora_scale != 1:
        raise UsageError(f"--lora_scale {args.lora_scale:g}: --lora {args.lora} is a --finetune full run (a trained "
                         f"denoiser, no LoRA adapter to scale); leave out --lora_scale")
    if not 0 <= args.eta <= 1:
        raise UsageError(f"--eta must be in [0, 1] (DDIM's eta), got {args.eta}")
    if not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a GPU; use bf16 or no")
    if args.prompt_template is not None and "{}" not in args.prompt_template:
        raise UsageError(f"--prompt_template {args.prompt_template!r} has no {{}} for the prompt")
    check_output_path(args)
    try:
        options = rewards.parse_options(args.reward_options)
        names = [name for name, _ in rewards.parse_spec(args.rewards)]
        if ":" in args.rewards:
            raise ValueError("give reward names (each is scored on its own), not weights")
        for name in names:
            rewards.check_options(name, options)
    except (ValueError, rewards.RewardLoadError) as e:
        raise UsageError(f"--rewards {args.rewards}: {e}") from e
    model_index = load_config_or_fail(DiffusionPipeline, args.pretrained_model_name_or_path, "model",
                                      "--pretrained_model_name_or_path", revision=args.revision)
    family = model_family(args, model_index)
    check_pipeline_files(args, model_index, family)
    if args.full_finetune:
        check_run_denoiser(args, model_index, family)
    take_run_settings(args, run_config, family)
    args.family = family
    pipeline = FAMILY_PIPELINES[family]["pipeline"]
    if FAMILY_PIPELINES[family]["flow_matching"] and args.sampler not in ("pipeline", "euler"):
        raise UsageError(f"--sampler {args.sampler}: {pipeline} samples with its own flow-matching Euler scheduler; "
                         f"leave --sampler at pipeline (or euler)")
    if not FAMILY_PIPELINES[family]["flow_matching"] and args.sampler == "euler":
        raise UsageError(f"--sampler euler is the flow-matching step of SD3 and FLUX; {pipeline} takes pipeline, "
                         f"ddpm, ddim or dpmpp")
    if args.eta > 0 and args.sampler != "ddim":
        raise UsageError(f"--eta {args.eta} is DDIM's: use it with --sampler ddim")
    if args.true_cfg_scale is not None and (family != "flux" or args.true_cfg_scale <= 1):
        raise UsageError(f"--true_cfg_scale {args.true_cfg_scale}: FluxPipeline's classifier-free guidance with the "
                         f"empty negative prompt, a number above 1, for FLUX models only")
    if args.max_sequence_length is not None and FAMILY_PIPELINES[family]["max_sequence_length"] is None:
        raise UsageError(f"--max_sequence_length: {pipeline} takes 77 CLIP tokens; the T5 length is for SD3 and "
                         f"FLUX")
    prompts, styles = read_prompt_set(args.prompts, "--prompts")
    prompts = apply_template(prompts, args.prompt_template)[: args.num_prompts]
    styles = None if styles is None else styles[: args.num_prompts]
    return prompts, styles, names, options, family


def is_full_finetune(args):
    """Whether --lora is a --finetune full run's --output_dir (a unet/ or transformer/ model folder with its
    config.json, no LoRA file) rather than a LoRA (pytorch_lora_weights.safetensors there, or a hub id); a folder with
    neither is refused."""
    if args.lora is None or not os.path.isdir(args.lora) or os.path.isfile(os.path.join(args.lora, LORA_FILE)):
        return False
    if any(os.path.isfile(os.path.join(args.lora, name, "config.json")) for name in DENOISER_FOLDERS):
        return True
    raise UsageError(f"--lora {args.lora}: no {LORA_FILE} in it (a LoRA run's --output_dir holds one) nor a "
                     f"{' or '.join(f'{name}/' for name in DENOISER_FOLDERS)} model folder with its config.json (a "
                     f"--finetune full run's --output_dir holds one)")


def check_run_denoiser(args, model_index, family):
    """A --finetune full run in --lora: its denoiser folder is the one the model's pipeline has (unet/ for SD1.5 and
    SDXL, transformer/ for SD3 and FLUX), of the same class and configuration (full fine-tuning changes the weights
    only), with the weights file save_pretrained writes (no --variant: saved in fp32), before any model loads."""
    import importlib
    name, pipeline = FAMILY_PIPELINES[family]["denoiser"], FAMILY_PIPELINES[family]["pipeline"]
    model = f"the {pipeline} --pretrained_model_name_or_path {args.pretrained_model_name_or_path}"
    if not os.path.isfile(os.path.join(args.lora, name, "config.json")):
        held = next(n for n in DENOISER_FOLDERS if os.path.isfile(os.path.join(args.lora, n, "config.json")))
        raise UsageError(f"--lora {args.lora} holds a full fine-tuned {held}/, but the denoiser of {model} is its "
                         f"{name}/; give the run's base model")
    library, class_name = model_index[name]
    cls = getattr(importlib.import_module(library), class_name)
    base = load_config_or_fail(cls, args.pretrained_model_name_or_path, "model", "--pretrained_model_name_or_path",
                               subfolder=name, revision=args.revision)
    tuned = load_config_or_fail(cls, args.lora, "the run's denoiser", "--lora", subfolder=name)
    differ = [k for k in sorted(set(base) & set(tuned)) if not k.startswith("_") and base[k] != tuned[k]]
    if tuned.get("_class_name") != class_name:
        raise UsageError(f"--lora {args.lora}: its {name}/ is a {tuned.get('_class_name')}, the denoiser of {model} a "
                         f"{class_name}; give the run's base model")
    if differ:
        described = ", ".join(f"{k} {tuned[k]} (model: {base[k]})" for k in differ[:3])
        raise UsageError(f"--lora {args.lora}: its {name}/ is configured otherwise than the denoiser of {model}: "
                         f"{described}{', ...' if len(differ) > 3 else ''}; give the run's base model")
    check_weights(args.lora, name, "diffusers", None, "--lora")


def load_run_denoiser(pipe, args, device, dtype):
    """A --finetune full run in --lora: the pipeline's denoiser replaced by the run's trained one, loaded with the class
    of the pipeline's own (family-agnostic) in the pipeline's dtype; the base one is dropped before the trained one
    moves to the device, so that one copy is there at a time."""
    name = FAMILY_PIPELINES[args.family]["denoiser"]
    denoiser = type(getattr(pipe, name)).from_pretrained(args.lora, subfolder=name, dtype=dtype)
    setattr(pipe, name, denoiser)
    denoiser.to(device)


def check_pipeline_files(args, model_index, family):
    """check_weights for every model the family's pipeline loads from model_index.json (its denoiser, VAE, text and
    image encoders: the components of diffusers and transformers that are torch modules, not tokenizers, schedulers
    or processors), less the ones load_pipeline passes itself (the SD1.5 safety checker, another VAE, SD3's absent
    T5); --pretrained_vae_model_name_or_path's VAE, which is loaded without --variant."""
    import importlib
    skipped = {"safety_checker"} | ({"vae"} if args.pretrained_vae_model_name_or_path else set())
    for name, entry in model_index.items():
        if (name in skipped or not isinstance(entry, (list, tuple)) or len(entry) != 2 or None in entry
                or entry[0] not in WEIGHT_FILES):
            continue
        cls = getattr(importlib.import_module(entry[0]), entry[1], None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            check_weights(args.pretrained_model_name_or_path, name, entry[0], args.variant,
                          "--pretrained_model_name_or_path", args.revision)
    if args.pretrained_vae_model_name_or_path:
        from diffusers import AutoencoderKL
        load_config_or_fail(AutoencoderKL, args.pretrained_vae_model_name_or_path, "VAE",
                            "--pretrained_vae_model_name_or_path")
        check_weights(args.pretrained_vae_model_name_or_path, None, "diffusers", None,
                      "--pretrained_vae_model_name_or_path")


def check_output_path(args):
    """--output_dir: a folder, or one we can create, that we can write to."""
    existing = os.path.abspath(args.output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output_dir {args.output_dir}: {existing} is a file, not a folder; choose another "
                         f"--output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {args.output_dir}: {existing} is not writable; choose another --output_dir")


def model_family(args, model_index):
    """The key of FAMILY_PIPELINES from the pipeline's components (model_index.json), never from its name: the class
    of its transformer (SD3, FLUX), else its UNet's conditioning (SDXL: a second text encoder and text_time
    embeddings)."""
    from diffusers import UNet2DConditionModel
    if "transformer" in model_index:
        transformer = model_index["transformer"][1]
        if transformer not in TRANSFORMER_FAMILIES:
            raise UsageError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: a "
                             f"{transformer} model; evaluate.py runs SD1.5, SDXL, SD3/SD3.5 and FLUX pipelines")
        return TRANSFORMER_FAMILIES[transformer]
    unet_config = load_config_or_fail(UNet2DConditionModel, args.pretrained_model_name_or_path, "model",
                                      "--pretrained_model_name_or_path", subfolder="unet", revision=args.revision)
    is_sdxl = "text_encoder_2" in model_index and unet_config.get("addition_embed_type") == "text_time"
    return "sdxl" if is_sdxl else "sd15"


def load_pipeline(args, family, device, dtype):
    """The plain diffusers pipeline a user would load, with --sampler's scheduler when one is asked for."""
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
    path = args.pretrained_model_name_or_path
    kwargs = dict(revision=args.revision, variant=args.variant, dtype=dtype)
    if args.pretrained_vae_model_name_or_path:
        kwargs["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, dtype=dtype)
    if family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    # an SD3 folder saved without T5 lists text_encoder_3 as null; diffusers loads it only when told it is absent
    if family == "sd3" and diffusers.DiffusionPipeline.load_config(path, revision=args.revision).get(
            "text_encoder_3") == [None, None]:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    pipeline_class = getattr(diffusers, FAMILY_PIPELINES[family]["pipeline"])
    pipe = pipeline_class.from_pretrained(path, **kwargs).to(device)
    config = pipe.scheduler.config
    # as the training scripts build them: explicit spacing (from_config drops default-valued keys), no clipping
    spacing = config.get("timestep_spacing", "leading")
    if args.sampler == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(config, clip_sample=False, variance_type="fixed_small",
                                                   timestep_spacing=spacing)
    elif args.sampler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config, clip_sample=False, timestep_spacing=spacing)
    elif args.sampler == "dpmpp":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                                 timestep_spacing=spacing)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_seed(seed, index):
    """The seed of prompt `index`'s image, with and without the LoRA: a function of (seed, index) alone."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def image_path(output_dir, variant, index):
    return os.path.join(output_dir, "images", variant, f"{index:05d}.png")


def generation_settings(args, prompts, family):
    """What the saved images depend on: a rerun in the same --output_dir must match it."""
    lora = None if args.lora is None else (os.path.abspath(args.lora) if os.path.exists(args.lora) else args.lora)
    return dict(model=args.pretrained_model_name_or_path, vae=args.pretrained_vae_model_name_or_path,
                revision=args.revision, variant=args.variant, lora=lora, lora_scale=args.lora_scale,
                prompts=hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16], seed=args.seed,
                resolution=args.resolution, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
                sampler=args.sampler, eta=args.eta, true_cfg_scale=args.true_cfg_scale,
                mixed_precision=args.mixed_precision, family=family,
                **({"finetune": "full"} if args.full_finetune else {}))


def step_kwargs(args):
    """The pipeline call's arguments beyond the common ones: DDIM's eta (the SD pipelines pass it to the step),
    FLUX's true CFG with the empty negative prompt (as the training scripts' --true_cfg)."""
    out = dict(eta=args.eta) if args.sampler == "ddim" else {}
    if args.true_cfg_scale is not None:
        out.update(true_cfg_scale=args.true_cfg_scale, negative_prompt="")
    return out


def check_settings(args, settings):
    """Refuse to add images to an --output_dir that holds images made with other settings."""
    path = os.path.join(args.output_dir, "images", "settings.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    differ = [k for k in sorted(set(settings) | set(saved)) if settings.get(k) != saved.get(k)]
    if differ:
        described = ", ".join(f"{k} {settings.get(k)} (saved: {saved.get(k)})" for k in differ)
        raise UsageError(f"--output_dir {args.output_dir} holds images made with other settings: {described}; "
                         f"choose a new --output_dir")


def generate_missing(pipe, args, prompts, indices, variant, progress):
    """The images of the prompts at `indices` (this process's) not yet on disk. Batches are fixed slices of
    `indices`, and a batch with an image missing is made again whole (only its missing images written), so that a
    rerun makes an image in the batch an uninterrupted run makes it in: the same pixels, not just the same seed.
    Each image is written under a temporary name and renamed (a crash leaves no truncated image behind)."""
    os.makedirs(os.path.dirname(image_path(args.output_dir, variant, 0)), exist_ok=True)
    size = {} if args.resolution is None else dict(height=args.resolution, width=args.resolution)
    text = {} if args.max_sequence_length is None else dict(max_sequence_length=args.max_sequence_length)
    for start in range(0, len(indices), args.batch_size):
        batch = indices[start:start + args.batch_size]
        missing = [i for i in batch if not os.path.isfile(image_path(args.output_dir, variant, i))]
        if not missing:
            continue
        generators = [torch.Generator().manual_seed(image_seed(args.seed, i)) for i in batch]
        images = pipe([prompts[i] for i in batch], generator=generators, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, **size, **text, **step_kwargs(args)).images
        for i, image in zip(batch, images):
            if i in missing:
                path = image_path(args.output_dir, variant, i)
                image.save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
        progress.update(len(missing))


def read_image(path):
    """A saved PNG -> (3, H, W) float in [0, 1]."""
    from PIL import Image
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


@torch.no_grad()
def score_images(reward_fns, args, prompts, indices, variants, device):
    """{index: {variant: {reward: raw value}}} of the saved images at `indices`, batch by batch."""
    import torch.nn.functional as F
    scores = {i: {v: {} for v in variants} for i in indices}
    for variant in variants:
        for start in range(0, len(indices), args.batch_size):
            batch = indices[start:start + args.batch_size]
            images = torch.stack([read_image(image_path(args.output_dir, variant, i)) for i in batch]).to(device)
            if args.reward_resolution is not None and images.shape[-1] != args.reward_resolution:
                images = F.interpolate(images, size=(args.reward_resolution,) * 2, mode="bicubic", antialias=True,
                                       align_corners=False).clamp(0, 1)
            for name, reward_fn in reward_fns.items():
                reward_fn(images, [prompts[i] for i in batch])
                for i, value in zip(batch, reward_fn.last_raw[name].tolist()):
                    scores[i][variant][name] = value
    return scores


def summarize(scores, prompts, styles, names, variants, settings):
    """eval.json's content: settings, every prompt's values, the means per style and over all prompts."""
    def means(indices):
        return {v: {n: float(np.mean([scores[i][v][n] for i in indices])) for n in names} for v in variants}

    per_prompt = [dict(index=i, prompt=prompts[i], seed=image_seed(settings["seed"], i),
                       **({} if styles is None else dict(style=styles[i])), **scores[i]) for i in sorted(scores)]
    result = dict(settings=settings, rewards=names, scale={n: column(n)[1] for n in names},
                  mean=means(sorted(scores)))
    if styles is not None:
        result["per_style"] = {s: means([i for i in sorted(scores) if styles[i] == s]) for s in dict.fromkeys(styles)}
    result["per_prompt"] = per_prompt
    return result


def markdown_table(result, args):
    """Table 1's layout: a row per model (base, tuned), a column per reward at the paper's scale; then per style."""
    names, variants = result["rewards"], list(result["mean"])
    label = dict(base="base", tuned="tuned (full fine-tune)" if args.full_finetune else
                 f"tuned (LoRA scale {args.lora_scale:g})")

    def value(name, raw):
        return f"{raw * column(name)[1]:.4g}"

    heading = [f"{column(n)[0]} {column(n)[2]}" for n in names]
    lines = [f"Mean over {len(result['per_prompt'])} prompts ({args.prompts}), seed {args.seed}.", "",
             "| Model | " + " | ".join(heading) + " |", "| --- |" + " --- |" * len(names)]
    lines += [f"| {label[v]} | " + " | ".join(value(n, result["mean"][v][n]) for n in names) + " |" for v in variants]
    if "per_style" in result:
        styles = list(result["per_style"])
        for name in names:
            lines += ["", f"{column(name)[0]} {column(name)[2]} per style:", "",
                      "| Model | " + " | ".join(styles) + " | mean |", "| --- |" + " --- |" * (len(styles) + 1)]
            lines += [f"| {label[v]} | " + " | ".join(value(name, result["per_style"][s][v][name]) for s in styles)
                      + f" | {value(name, result['mean'][v][name])} |" for v in variants]
    scales = {"hpsv21": "HPS v2.1: the cosine x 100", "pickscore": "PickScore: the cosine (the logit / 100)",
              "aesthetic": "Aesthetic Score: the predictor's 1-10 scale", "symmetry": "Symmetry: eq. 6",
              "clipscore": "CLIPScore: the ViT-H-14 cosine", "compressibility": "Compression error: eq. 7 (MSE)",
              "objectness": "Objectness: the highest box probability"}
    notes = [scales[n] for n in names if n in scales]
    lines += ["", "Scales as in the DRTune paper's Table 1 (↑ maximized, ↓ minimized): " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def save_comparison_grid(args, indices, variants, path):
    """The first --grid_prompts prompts, one column each: base above, tuned below."""
    from PIL import Image
    images = [[Image.open(image_path(args.output_dir, v, i)).convert("RGB") for i in indices] for v in variants]
    width, height = images[0][0].size
    grid = Image.new("RGB", (width * len(indices), height * len(variants)), "white")
    for row, variant_images in enumerate(images):
        for col, image in enumerate(variant_images):
            grid.paste(image.resize((width, height)), (col * width, row * height))
    grid.save(path)


def main(args):
    """Generate what is missing, score, write eval.json, table.md and grid.png; returns eval.json's content (main
    process; None on the others)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    prompts, styles, names, options, family = check_arguments(args)
    for key in SAMPLING_DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, FAMILY_PIPELINES[family][key])
    settings = generation_settings(args, prompts, family)
    check_settings(args, settings)
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        print(describe_settings(args), flush=True)
    device, dtype = state.device, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision,
                                                                                        torch.float32)
    if state.is_main_process:
        os.makedirs(os.path.join(args.output_dir, "images"), exist_ok=True)
        with open(os.path.join(args.output_dir, "images", "settings.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1)
    state.wait_for_everyone()
    variants = VARIANTS if args.lora is not None else VARIANTS[:1]
    mine = list(range(state.process_index, len(prompts), state.num_processes))  # prompt i on process i % N
    missing = sum(not os.path.isfile(image_path(args.output_dir, v, i)) for v in variants for i in mine)
    print(f"process {state.process_index + 1}/{state.num_processes}: {len(mine)} of {len(prompts)} prompts, "
          f"{missing} images to make", flush=True)
    if missing:
        pipe = load_pipeline(args, family, device, dtype)
        progress = tqdm(total=missing, desc="images", disable=not state.is_main_process)
        generate_missing(pipe, args, prompts, mine, "base", progress)
        if args.full_finetune:
            load_run_denoiser(pipe, args, device, dtype)
        elif args.lora is not None:
            pipe.load_lora_weights(args.lora, adapter_name="tuned")
            pipe.set_adapters(["tuned"], adapter_weights=[args.lora_scale])
        if args.lora is not None:
            generate_missing(pipe, args, prompts, mine, "tuned", progress)
        progress.close()
        del pipe
    reward_fns = {name: rewards.build_reward(name, device=device, dtype=dtype, **options) for name in names}
    scores = score_images(reward_fns, args, prompts, mine, variants, device)
    gathered = gather_object([scores])  # one dict per process
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    merged = {i: values for part in gathered for i, values in part.items()}
    result = summarize(merged, prompts, styles, names, variants, settings)
    with open(os.path.join(args.output_dir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.output_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(markdown_table(result, args))
    if args.grid_prompts:
        save_comparison_grid(args, list(range(min(args.grid_prompts, len(prompts)))), variants,
                             os.path.join(args.output_dir, "grid.png"))
    print(markdown_table(result, args))
    return result


def cli(argv=None):
    """Bad input (UsageError, RewardLoadError) is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        main(args)
    except (UsageError, rewards.RewardLoadError) as error:
        message = " ".join(str(error).split())
        taken = [f"--{flag}" for flag, source in getattr(args, "setting_sources", {}).items()
                 if source == "run" and f"--{flag}" in message]
        if taken:  # a value the user did not type: say where it came from
            message += (f" ({', '.join(taken)} taken from {os.path.join(args.lora, 'config.json')}; give "
                        f"{'it' if len(taken) == 1 else 'them'} on the command line to override)")
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
