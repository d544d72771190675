"""What every run leaves for other tools: the LoRA in the kohya layout beside diffusers' file (save_lora_kohya), read
back by diffusers' own loader, and the model card README.md (save_model_card)."""
import json
import os
import re
import shutil

import pytest
import torch
from conftest import ROOT, TINY_SD, TINY_SDXL, tiny_argv

import drtune

TINY = {"sd15": TINY_SD, "sdxl": TINY_SDXL, "sd3": os.path.join(ROOT, "tiny_models", "sd35"),
        "flux": os.path.join(ROOT, "tiny_models", "flux")}


def pipeline_with_lora(family, rank=4, alpha=8):
    """The tiny pipeline of `family` with a LoRA on the scripts' targets, lora_alpha != rank and nonzero up weights."""
    import diffusers
    from peft import LoraConfig
    spec = drtune.FAMILIES[family]
    pipe = getattr(diffusers, spec["pipeline"]).from_pretrained(TINY[family])
    denoiser = getattr(pipe, spec["denoiser"])
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=list(spec["lora_targets"])))
    generator = torch.Generator().manual_seed(0)
    for name, p in denoiser.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    return pipe, denoiser


def images(family, lora_dir=None, weight_name=None):
    import diffusers
    pipe = getattr(diffusers, drtune.FAMILIES[family]["pipeline"]).from_pretrained(TINY[family])
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    return pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_kohya_file_loads_in_diffusers_with_the_diffusers_files_outputs(family, tmp_path):
    _, denoiser = pipeline_with_lora(family)
    drtune.save_lora(denoiser, family, str(tmp_path))
    drtune.save_lora_kohya(denoiser, family, str(tmp_path))
    from safetensors.torch import load_file
    kohya = load_file(tmp_path / drtune.KOHYA_LORA_NAME)
    prefix = "lora_unet_" if family in ("sd15", "sdxl") else "lora_transformer_"
    assert all(re.fullmatch(prefix + r"\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}  # lora_alpha, not the rank 4
    base = images(family)
    ours = images(family, str(tmp_path))  # pytorch_lora_weights.safetensors, picked by diffusers from the folder
    from_kohya = images(family, str(tmp_path), weight_name=drtune.KOHYA_LORA_NAME)
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the images
    torch.testing.assert_close(from_kohya, ours, atol=1e-5, rtol=0)


def test_sd3_kohya_file_is_the_diffusers_file_in_comfyuis_onetrainer_keys(tmp_path):
    """diffusers reads no kohya layout for SD3, so here the file is checked weight by weight against the diffusers
    file: ComfyUI's key map names the module `transformer.X` of a diffusers SD3 LoRA `lora_transformer_` + X with its
    dots made underscores, and applies up @ down x alpha / rank."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    _, denoiser = pipeline_with_lora("sd3")
    drtune.save_lora(denoiser, "sd3", str(tmp_path))
    drtune.save_lora_kohya(denoiser, "sd3", str(tmp_path))
    ours = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])  # diffusers' LoRA metadata: lora_alpha, r
    scale = config["transformer.lora_alpha"] / config["transformer.r"]
    kohya = load_file(tmp_path / drtune.KOHYA_LORA_NAME)
    modules = sorted(k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in ours if ".lora_A." in k)
    assert any(".attn2." in m for m in modules) and any(".add_q_proj" in m for m in modules)  # SD3.5-M's layers
    assert len(kohya) == 3 * len(modules)
    for module in modules:
        key = "lora_transformer_" + module.replace(".", "_")
        down, up, alpha = (kohya[f"{key}.{w}"] for w in ("lora_down.weight", "lora_up.weight", "alpha"))
        a, b = (ours[f"transformer.{module}.lora_{w}.weight"] for w in "AB")
        torch.testing.assert_close(up @ down * alpha / down.shape[0], b @ a * scale)


def assert_model_card(out, script, config=None):
    """The model card of a finished run in `out`, and its kohya file: every field save_model_card promises."""
    from huggingface_hub import ModelCard
    config = config or json.loads((out / "config.json").read_text())
    card = ModelCard.load(out / "README.md")
    text = card.text
    assert card.data.library_name == "diffusers" and {"lora", script.removesuffix(".py")} <= set(card.data.tags)
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        docstring = f.read().split('"""')[1]
    paper = re.search(r"https://arxiv\.org/abs/\d+\.\d+", docstring).group(0)
    assert paper in text and text.lstrip().startswith(f"# {docstring.split(':')[0]} LoRA for")  # method, paper
    assert config["pretrained_model_name_or_path"] in text and f"reward `{config['reward']}`" in text
    assert "samples/before_after.png" in text and "reward_curve.png" in text
    assert (out / "samples" / "before_after.png").exists() and (out / "reward_curve.png").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r["eval_reward"] for r in rows if r.get("eval_reward") is not None][-1]
    assert f"**{final:.4g}**" in text  # the final eval reward
    assert f'"run_id": "{config["run_id"]}"' in text  # config.json
    assert "load_lora_weights(" in text and drtune.KOHYA_LORA_NAME in text and "ComfyUI" in text
    assert (out / drtune.KOHYA_LORA_NAME).exists()
    return card


def test_model_card_takes_the_base_models_license_from_its_card_offline(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.file_download

    def no_hub(*args, **kwargs):
        raise AssertionError("the model card asked the hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", no_hub)
    base, out = tmp_path / "base", tmp_path / "out"
    shutil.copytree(TINY_SD, base)
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE.md\n"
                                    "---\n# a base model\n")
    args = drtune.parse_args(tiny_argv(str(base), str(out), num_trained_steps=2, early_stop_max=2))
    drtune.check_arguments(args)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(dict(vars(args), eval_prompt_list=None)))
    rows = [dict(step=0, eval_reward=0.25), dict(step=1, loss=0.1), dict(step=2, eval_reward=0.5)]
    drtune.save_model_card(args, "sd15", rows)
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert (card.data.license, card.data.license_name, card.data.license_link) == ("other", "tiny-license", "LICENSE.md")
    assert card.data.base_model is None  # a local folder is no hub id
    assert "0.25 at step 0 (the base model), **0.5** at step 2 (final)" in card.text
    # a hub id: the license of its README.md in the local hub cache, or none; never a download
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--base" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--org--base" / "refs").mkdir()
    (cache / "models--org--base" / "refs" / "main").write_text("0" * 40)
    (snapshot / "README.md").write_text("---\nlicense: openrail++\n---\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for hub_id, license in [("org/base", "openrail++"), ("org/not-cached", None)]:
        args.pretrained_model_name_or_path = hub_id
        drtune.save_model_card(args, "sd15", rows)
        card = huggingface_hub.ModelCard.load(out / "README.md")
        assert (card.data.base_model, card.data.license) == (hub_id, license)
