"""evaluate.py end to end on the tiny pipelines and tiny reward models: images from the plain diffusers pipeline with
the same seeds with and without the LoRA, eval.json per prompt / style / mean, the Table 1 markdown, the grid, a rerun
that generates only what is missing, several processes giving what one gives, the model families (SD1.5, SDXL,
SD3/SD3.5 with and without T5, FLUX) and its copies of the scaffold."""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiny_rewards
import torch
from conftest import ROOT, STYLES, TINY_SD, TINY_SDXL, free_port, torchrun_env

import drtune
import evaluate

REWARDS = "hpsv21,pickscore,aesthetic,clipscore,symmetry,compressibility"
TINY_SD35 = os.path.join(ROOT, "tiny_models", "sd35")
TINY_FLUX = os.path.join(ROOT, "tiny_models", "flux")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_STREAM = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")  # SD3's and FLUX's joint attention
COPIED = ["UsageError", "OneLineParser", "is_hub_id", "load_config_or_fail", "PROMPT_FILE_TYPES", "PROMPT_FIELDS",
          "HPSV2_DATASET", "HPSV2_STYLES", "PICKAPIC_DATASET", "PICKAPIC_SPLITS", "PROMPT_SETS", "prompts_of_json",
          "hpsv2_file", "hpsv2_prompts", "pickapic_prompts", "read_prompt_set", "prompts_from_dataset", "apply_template",
          "WEIGHT_FILES", "with_variant", "check_weights"]


def top_level(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.get_source_segment(text, node)
    return out


def test_copies_of_the_scaffold_are_identical():
    """evaluate.py reads prompts exactly as the training scripts do (it duplicates, never imports, a script)."""
    ours, scaffold = top_level(os.path.join(ROOT, "evaluate.py")), top_level(os.path.join(ROOT, "drtune.py"))
    for name in COPIED:
        assert ours[name] == scaffold[name], name


@pytest.fixture(scope="module")
def reward_options(tmp_path_factory):
    options = tiny_rewards.reward_options(tmp_path_factory.mktemp("rewards"))
    return ",".join(f"{k}={v}" for k, v in options.items())


def plain_pipeline(model):
    """The diffusers pipeline of a tiny model folder, loaded as a user loads it (an SD3 folder saved without T5 needs
    to be told so)."""
    from diffusers import DiffusionPipeline
    with open(os.path.join(model, "model_index.json")) as f:
        without_t5 = json.load(f).get("text_encoder_3") == [None, None]
    kwargs = dict(text_encoder_3=None, tokenizer_3=None) if without_t5 else {}
    return DiffusionPipeline.from_pretrained(model, **kwargs)


def make_lora(model, output_dir):
    """A LoRA as the training scripts save one: peft adapters on the denoiser's attention projections (the text
    stream's too in SD3's and FLUX's joint blocks), written by the family's pipeline class in diffusers' format with
    the adapter's config as metadata; random B, so that it changes the images. (The scripts' tests check that their
    LoRAs load into the plain pipeline: conftest.lora_effect.)"""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    pipe = plain_pipeline(model)
    name = "unet" if hasattr(pipe, "unet") else "transformer"
    denoiser = getattr(pipe, name)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=ATTENTION if name == "unet" else ATTENTION + TEXT_STREAM))
    with torch.no_grad():
        for key, p in denoiser.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    state_dict = get_peft_model_state_dict(denoiser)
    if name == "unet":  # diffusers' key names for the UNets, peft's for the transformers, as diffusers' examples save
        state_dict = convert_state_dict_to_diffusers(state_dict)
    metadata = denoiser.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(str(output_dir), **{f"{name}_lora_layers": state_dict,
                                                     f"{name}_lora_adapter_metadata": metadata})
    return str(output_dir)


def eval_argv(model, lora, output_dir, **overrides):
    flags = dict(pretrained_model_name_or_path=model, lora=lora, lora_scale=0.7, seed=0, resolution=32,
                 num_inference_steps=2, batch_size=3, output_dir=output_dir, rewards="symmetry,compressibility")
    flags.update(overrides)
    return [item for k, v in flags.items() if v is not None for item in (f"--{k}", str(v))]


def pixels(path):
    from PIL import Image
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def test_end_to_end_on_the_benchmark_prompts(tiny_model, hpdv2, reward_options, tmp_path):
    lora, out = make_lora(tiny_model, tmp_path / "lora"), str(tmp_path / "eval")
    args = evaluate.build_parser().parse_args(eval_argv(
        tiny_model, lora, out, prompts=f"hpsv2-benchmark:{hpdv2}", num_prompts=8, rewards=REWARDS,
        reward_options=reward_options))
    result = evaluate.main(args)
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    names = REWARDS.split(",")
    benchmark, styles = drtune.read_prompt_set(f"hpsv2-benchmark:{hpdv2}")
    assert [r["prompt"] for r in result["per_prompt"]] == benchmark[:8]
    assert [r["style"] for r in result["per_prompt"]] == styles[:8] == list(STYLES) * 2
    for name in names:
        for variant in ("base", "tuned"):
            values = [r[variant][name] for r in result["per_prompt"]]
            assert result["mean"][variant][name] == pytest.approx(np.mean(values))
            for i, style in enumerate(STYLES):  # prompts i and i + 4 are the style's two
                assert result["per_style"][style][variant][name] == pytest.approx(np.mean(values[i::4]))
        assert result["mean"]["base"][name] != result["mean"]["tuned"][name]
    assert result["scale"]["hpsv21"] == 100 and result["scale"]["pickscore"] == 0.01

    # the images are the plain pipeline's, seeded per prompt, without and with the LoRA at the given scale
    pipe = plain_pipeline(tiny_model)
    kwargs = dict(num_inference_steps=2, height=32, width=32, guidance_scale=args.guidance_scale)
    seed = evaluate.image_seed(0, 5)
    assert result["per_prompt"][5]["seed"] == seed
    base = pipe(benchmark[5], generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
    # batch 3 there, 1 here: the same image up to the rounding of batched kernels
    assert np.abs(np.array(base).astype(int) - pixels(evaluate.image_path(out, "base", 5))).max() <= 1
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=0.7)  # the README's way to use the LoRA at scale 0.7
    tuned = pipe(benchmark[5], generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
    assert np.abs(np.array(tuned).astype(int) - pixels(evaluate.image_path(out, "tuned", 5))).max() <= 1
    assert not np.array_equal(np.array(tuned), np.array(base))

    with open(os.path.join(out, "table.md")) as f:
        table = f.read()
    assert "| Model | HPS v2.1 ↑ | PickScore ↑ | Aesthetic Score ↑ | CLIPScore ↑ | Symmetry ↓ | Compression error ↓ |" \
        in table
    hps, pick = (f"{result['mean']['tuned'][n] * s:.4g}" for n, s in (("hpsv21", 100), ("pickscore", 0.01)))
    assert f"| tuned (LoRA scale 0.7) | {hps} | {pick} |" in table
    assert "HPS v2.1 ↑ per style:" in table and "| Model | anime | concept-art | paintings | photo | mean |" in table
    from PIL import Image
    with Image.open(os.path.join(out, "grid.png")) as grid:
        assert grid.size == (8 * 32, 2 * 32)


def test_rerun_generates_only_what_is_missing(tmp_path, monkeypatch):
    lora, out = make_lora(TINY_SD, tmp_path / "lora"), str(tmp_path / "eval")
    (tmp_path / "p.txt").write_text("a cat\na dog\na red car\na blue boat\na tree\n")
    argv = eval_argv(TINY_SD, lora, out, prompts=tmp_path / "p.txt", grid_prompts=2)
    first = evaluate.main(evaluate.build_parser().parse_args(argv))
    assert first["per_prompt"][0]["base"].keys() == {"symmetry", "compressibility"} and "per_style" not in first
    kept = pixels(evaluate.image_path(out, "tuned", 3))
    os.remove(evaluate.image_path(out, "tuned", 3))
    made, generate = [], evaluate.generate_missing

    def spy(pipe, args, prompts, indices, variant, progress):
        made.extend((variant, i) for i in indices if not os.path.isfile(evaluate.image_path(out, variant, i)))
        return generate(pipe, args, prompts, indices, variant, progress)

    monkeypatch.setattr(evaluate, "generate_missing", spy)
    second = evaluate.main(evaluate.build_parser().parse_args(argv))
    assert made == [("tuned", 3)] and np.array_equal(pixels(evaluate.image_path(out, "tuned", 3)), kept)
    assert second == first
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a: pytest.fail("nothing was missing"))
    third = evaluate.main(evaluate.build_parser().parse_args(argv + ["--rewards", "symmetry"]))  # rescoring only
    assert third["mean"]["tuned"]["symmetry"] == first["mean"]["tuned"]["symmetry"]
    with pytest.raises(evaluate.UsageError, match=r"holds images made with other settings: seed 1 \(saved: 0\)"):
        evaluate.main(evaluate.build_parser().parse_args(argv + ["--seed", "1"]))


def test_two_processes_give_what_one_gives(tmp_path):
    """torchrun with 2 CPU processes: prompt i made and scored by process i % 2, gathered; the same images and
    eval.json as one process (batch 1 in both, so that the same kernels run)."""
    lora = make_lora(TINY_SD, tmp_path / "lora")
    (tmp_path / "p.txt").write_text("a cat\na dog\na red car\n")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"),
                    *eval_argv(TINY_SD, lora, one, prompts=tmp_path / "p.txt", batch_size=1)], check=True, env=env, timeout=300)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), os.path.join(ROOT, "evaluate.py"),
                          *eval_argv(TINY_SD, lora, two, prompts=tmp_path / "p.txt", batch_size=1)],
                         env=torchrun_env(tmp_path), timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "process 1/2: 2 of 3 prompts, 4 images to make" in run.stdout
    assert "process 2/2: 1 of 3 prompts, 2 images to make" in run.stdout
    results = []
    for out in (one, two):
        with open(os.path.join(out, "eval.json")) as f:
            results.append(json.load(f))
    assert results[0]["per_prompt"] == results[1]["per_prompt"] and results[0]["mean"] == results[1]["mean"]
    for variant in ("base", "tuned"):
        for i in range(3):
            assert np.array_equal(pixels(evaluate.image_path(one, variant, i)),
                                  pixels(evaluate.image_path(two, variant, i)))


@pytest.fixture(scope="module")
def sd3_without_t5(tmp_path_factory):
    """The tiny SD3.5 saved without T5, as the tiny SD3 world is: text_encoder_3 and tokenizer_3 null."""
    from diffusers import StableDiffusion3Pipeline
    path = str(tmp_path_factory.mktemp("sd3-without-t5"))
    StableDiffusion3Pipeline.from_pretrained(TINY_SD35, text_encoder_3=None, tokenizer_3=None).save_pretrained(path)
    return path


def test_families_are_detected_from_the_components(sd3_without_t5):
    for model, family in ((TINY_SD, "sd15"), (TINY_SDXL, "sdxl"), (TINY_SD35, "sd3"), (sd3_without_t5, "sd3"),
                          (TINY_FLUX, "flux")):
        args = evaluate.build_parser().parse_args(["--pretrained_model_name_or_path", model, "--prompts",
                                                   os.path.join(ROOT, "tiny_models", "world-eval-prompts.txt")])
        assert evaluate.check_arguments(args)[-1] == family, model


def test_flow_families_default_to_their_pipelines_settings():
    """SD3's and FLUX's defaults are the pipelines' own: what a user calling pipe(prompt) gets."""
    import inspect

    import diffusers
    for family in ("sd3", "flux"):
        pipeline_class = getattr(diffusers, evaluate.FAMILY_PIPELINES[family]["pipeline"])
        defaults = inspect.signature(pipeline_class.__call__).parameters
        for key in evaluate.SAMPLING_DEFAULTS:
            assert evaluate.FAMILY_PIPELINES[family][key] == defaults[key].default, (family, key)


@pytest.mark.parametrize("name", ["sd35", "flux", "sd3-without-t5"])
def test_flow_families_end_to_end(name, sd3_without_t5, tmp_path):
    """SD3 and FLUX: the plain pipeline at its own defaults (steps, guidance, T5 length; the model without T5 at
    --max_sequence_length 77, as the tiny SD3 world is sampled), the LoRA loaded by the family's pipeline; at LoRA
    scale 0 the tuned images are the base ones."""
    model = dict(sd35=TINY_SD35, flux=TINY_FLUX, **{"sd3-without-t5": sd3_without_t5})[name]
    lora, out, zero = make_lora(model, tmp_path / "lora"), str(tmp_path / "eval"), str(tmp_path / "zero")
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    sequence = 77 if name == "sd3-without-t5" else None
    argv = eval_argv(model, lora, out, prompts=tmp_path / "p.txt", num_inference_steps=None, batch_size=2,
                     max_sequence_length=sequence)
    result = evaluate.main(evaluate.build_parser().parse_args(argv))
    family = "flux" if name == "flux" else "sd3"
    assert result["settings"]["family"] == family and result["settings"]["num_inference_steps"] == 28
    assert result["settings"]["max_sequence_length"] == dict(sd35=256, flux=512, **{"sd3-without-t5": 77})[name]

    pipe = plain_pipeline(model)
    kwargs = dict(height=32, width=32) if sequence is None else dict(height=32, width=32, max_sequence_length=77)
    seed = evaluate.image_seed(0, 1)
    base = pipe("a dog", generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
    # batch 2 there, 1 here: the same image up to the rounding of batched kernels
    assert np.abs(np.array(base).astype(int) - pixels(evaluate.image_path(out, "base", 1))).max() <= 1
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=0.7)
    tuned = pipe("a dog", generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
    assert np.abs(np.array(tuned).astype(int) - pixels(evaluate.image_path(out, "tuned", 1))).max() <= 1
    for i in range(2):
        assert not np.array_equal(pixels(evaluate.image_path(out, "tuned", i)),
                                  pixels(evaluate.image_path(out, "base", i)))

    evaluate.main(evaluate.build_parser().parse_args(
        eval_argv(model, lora, zero, prompts=tmp_path / "p.txt", num_inference_steps=2, lora_scale=0,
                  max_sequence_length=sequence)))
    for i in range(2):
        assert np.array_equal(pixels(evaluate.image_path(zero, "tuned", i)),
                              pixels(evaluate.image_path(zero, "base", i)))


@pytest.mark.parametrize("overrides,message", [
    (dict(rewards="symmetry,nosuch"), "unknown reward 'nosuch'"),
    (dict(rewards="symmetry:1,clipscore:0.1"), "give reward names"),
    (dict(lora="/no/such/lora"), "--lora: no such folder"),
    (dict(lora="EMPTY"), "no pytorch_lora_weights.safetensors"),
    (dict(prompt_template="books"), "has no {}"),
    (dict(pretrained_model_name_or_path="/no/such/model"), "local path '/no/such/model' does not exist"),
    (dict(prompts="/no/such/prompts.txt"), "--prompts /no/such/prompts.txt: no such file"),
    (dict(lora_scale=-1), "--lora_scale must be"),
    (dict(pretrained_model_name_or_path=TINY_SD35, sampler="ddim"),
     "--sampler ddim: StableDiffusion3Pipeline samples with its own flow-matching Euler scheduler"),
    (dict(sampler="euler"), "--sampler euler is the flow-matching step of SD3 and FLUX"),
    (dict(max_sequence_length=77), "--max_sequence_length: StableDiffusionPipeline takes 77 CLIP tokens"),
    (dict(pretrained_model_name_or_path=TINY_FLUX, max_sequence_length=0), "--max_sequence_length must be >= 1"),
    (dict(pretrained_model_name_or_path=TINY_FLUX, max_sequence_length=600), "--max_sequence_length must be <= 512"),
    (dict(pretrained_model_name_or_path="PIXART"), "a PixArtTransformer2DModel model; evaluate.py runs SD1.5, SDXL"),
])
def test_bad_input_is_one_line_before_any_model(overrides, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    (tmp_path / "p.txt").write_text("a cat\n")
    if overrides.get("lora") == "EMPTY":
        (tmp_path / "empty").mkdir()
        overrides["lora"] = str(tmp_path / "empty")
    if overrides.get("pretrained_model_name_or_path") == "PIXART":  # a transformer pipeline of no known family
        (tmp_path / "pixart").mkdir()
        (tmp_path / "pixart" / "model_index.json").write_text(json.dumps(dict(
            _class_name="PixArtAlphaPipeline", transformer=["diffusers", "PixArtTransformer2DModel"])))
        overrides["pretrained_model_name_or_path"] = str(tmp_path / "pixart")
    flags = dict(dict(prompts=tmp_path / "p.txt", lora=None), **overrides)
    code = evaluate.cli(eval_argv(flags.pop("pretrained_model_name_or_path", TINY_SD), flags.pop("lora"),
                                  str(tmp_path / "out"), **flags))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("evaluate.py: error: ") and message in err and err.count("\n") == 1


def test_a_runs_lora_is_sampled_as_the_run_sampled(tmp_path, capsys):
    """evaluate.py --lora RUN without the model or sampling flags: the run's config.json gives the model, sampler,
    eta, steps, CFG, resolution and grid LoRA scale, and one line says so; the base images are the plain diffusers
    pipeline's with a DDIM scheduler at the run's eta, steps, CFG and size; a flag given wins and is named."""
    from conftest import tiny_argv
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    run = tmp_path / "run"
    drtune.main(drtune.parse_args(tiny_argv(TINY_SD, str(run), sampler="ddim", eta=0.5, num_inference_steps=3,
                                            guidance_scale=2.5, num_trained_steps=1, early_stop_max=1,
                                            max_train_steps=1, validation_lora_scale=0.5)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    capsys.readouterr()
    out = tmp_path / "eval"
    assert evaluate.cli(["--lora", str(run), "--prompts", str(prompts), "--rewards", "symmetry", "--output_dir",
                         str(out)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("evaluate.py: sampling with "))
    assert line.startswith(f"evaluate.py: sampling with model {TINY_SD}, sampler ddim, eta 0.5, 3 steps, CFG 2.5, "
                           f"32 px, LoRA scale 0.5 (from {run / 'config.json'}: --pretrained_model_name, --sampler, "
                           f"--eta, --num_inference_steps, --guidance_scale, --resolution, --lora_scale)"), line
    with open(out / "images" / "settings.json") as f:
        settings = json.load(f)
    assert {k: settings[k] for k in ("model", "sampler", "eta", "num_inference_steps", "guidance_scale", "resolution",
                                     "lora_scale")} == dict(model=TINY_SD, sampler="ddim", eta=0.5,
                                                            num_inference_steps=3, guidance_scale=2.5, resolution=32,
                                                            lora_scale=0.5)
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        image = pipe([prompt], num_inference_steps=3, guidance_scale=2.5, eta=0.5, height=32, width=32,
                     generator=[torch.Generator().manual_seed(evaluate.image_seed(0, i))]).images[0]
        assert np.abs(np.array(image).astype(int) - pixels(out / "images" / "base" / f"{i:05d}.png")).max() <= 1
    # a flag given on the command line wins, and the line names it
    assert evaluate.cli(["--lora", str(run), "--prompts", str(prompts), "--rewards", "symmetry", "--output_dir",
                         str(tmp_path / "eval2"), "--num_inference_steps", "2", "--sampler", "ddpm"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("evaluate.py: sampling with "))
    assert "sampler ddpm, eta 0, 2 steps, CFG 2.5" in line and "from the command line: --sampler, --num_inference_steps" in line
    # a run's value that does not fit the model given is one line that says where it came from
    code = evaluate.cli(["--lora", str(run), "--pretrained_model_name_or_path", TINY_SD35, "--prompts", str(prompts),
                         "--rewards", "symmetry", "--output_dir", str(tmp_path / "eval3")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--sampler ddim" in err and "taken from" in err and "config.json" in err


def test_a_flux_runs_guidance_maps_to_the_pipelines(tmp_path):
    """A FLUX run's --guidance_embedding is FluxPipeline's guidance_scale and its --guidance_scale under --true_cfg
    FluxPipeline's true_cfg_scale (the empty negative prompt); its SDE eta is not applied (the pipeline's ODE)."""
    run = tmp_path / "run"
    run.mkdir()
    make_lora(TINY_FLUX, run)
    (run / "config.json").write_text(json.dumps(dict(
        script="grpo.py", pretrained_model_name_or_path=TINY_FLUX, pretrained_vae_model_name_or_path=None,
        revision=None, variant=None, sampler="euler", eta=0.7, num_inference_steps=3, guidance_scale=4.0,
        true_cfg=True, guidance_embedding=2.5, resolution=32, max_sequence_length=16, validation_lora_scale=1.0,
        prompt_template=None)))
    args = evaluate.build_parser().parse_args(["--lora", str(run), "--prompts", "tiny_models/world-eval-prompts.txt",
                                               "--rewards", "symmetry", "--output_dir", str(tmp_path / "eval")])
    evaluate.check_arguments(args)
    assert (args.guidance_scale, args.true_cfg_scale, args.eta, args.sampler) == (2.5, 4.0, 0.0, "euler")
    assert evaluate.step_kwargs(args) == dict(true_cfg_scale=4.0, negative_prompt="")
    args.family = "flux"
    line = evaluate.describe_settings(args)
    assert "embedded guidance 2.5, true CFG 4" in line and "the run's eta 0.7 is not applied" in line


# --- a --finetune full run: its trained denoiser folder in place of the base model's ------------------------------


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """drtune.py --finetune full, 1 step on the tiny SD1.5 (DDIM at eta 0.5, 3 steps, CFG 2.5, a grid LoRA scale of 0.5
    that a full run does not use) and SD3.5 pipelines: output folders with unet/ or transformer/ and no LoRA file."""
    from conftest import tiny_argv
    runs = {}
    for name, model, flags in (
            ("sd15", TINY_SD, dict(sampler="ddim", eta=0.5, guidance_scale=2.5, validation_lora_scale=0.5)),
            ("sd35", TINY_SD35, dict(max_sequence_length=16, guidance_scale=None))):
        run = tmp_path_factory.mktemp(f"full-{name}") / "run"
        drtune.main(drtune.parse_args(tiny_argv(model, str(run), finetune="full", num_inference_steps=3,
                                                num_trained_steps=1, early_stop_max=1, max_train_steps=1, **flags)))
        assert not (run / "pytorch_lora_weights.safetensors").exists()
        runs[name] = run
    return runs


@pytest.mark.parametrize("name", ["sd15", "sd35"])
def test_a_full_finetune_run_is_scored_with_its_trained_denoiser(name, full_runs, tmp_path, capsys):
    """evaluate.py --run RUN (the same flag as --lora) on a --finetune full run: the run's settings, as for a LoRA run
    (its grid LoRA scale left out: no adapter), the line says the full fine-tuned denoiser was loaded; the base images
    are the base model's and the tuned ones, pixel for pixel, those of the pipeline built by hand with the run's
    denoiser folder (the model card's way) at the same scheduler, steps, guidance and seeds."""
    from diffusers import (DDIMScheduler, DiffusionPipeline, SD3Transformer2DModel, StableDiffusionPipeline,
                           UNet2DConditionModel)
    run, out, model = full_runs[name], tmp_path / "eval", dict(sd15=TINY_SD, sd35=TINY_SD35)[name]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    capsys.readouterr()
    assert evaluate.cli(["--run", str(run), "--prompts", str(prompts), "--rewards", "symmetry", "--batch_size", "1",
                         "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("evaluate.py: sampling with "))
    denoiser = dict(sd15="unet", sd35="transformer")[name]
    if name == "sd15":
        assert line == (f"evaluate.py: sampling with model {TINY_SD}, sampler ddim, eta 0.5, 3 steps, CFG 2.5, 32 px "
                        f"(from {run / 'config.json'}: --pretrained_model_name, --sampler, --eta, "
                        f"--num_inference_steps, --guidance_scale, --resolution); tuned: the full fine-tuned denoiser "
                        f"{run / 'unet'} in place of the model's")
    assert line.endswith(f"; tuned: the full fine-tuned denoiser {run / denoiser} in place of the model's"), line
    assert "LoRA" not in line and "| tuned (full fine-tune) |" in printed
    with open(out / "images" / "settings.json") as f:
        settings = json.load(f)
    assert settings["finetune"] == "full" and settings["lora_scale"] == 1.0 and settings["num_inference_steps"] == 3
    kwargs = dict(num_inference_steps=3, guidance_scale=settings["guidance_scale"], height=32, width=32)
    if name == "sd15":
        assert settings["sampler"] == "ddim" and settings["guidance_scale"] == 2.5
        trained = UNet2DConditionModel.from_pretrained(str(run), subfolder="unet")
        pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, unet=trained)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, timestep_spacing="leading")
        kwargs.update(eta=0.5)
    else:
        assert settings["max_sequence_length"] == 16
        trained = SD3Transformer2DModel.from_pretrained(str(run), subfolder="transformer")
        pipe = DiffusionPipeline.from_pretrained(model, transformer=trained)
        kwargs.update(max_sequence_length=16)
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(["a red circle", "a blue square"]):
        image = pipe([prompt], generator=[torch.Generator().manual_seed(evaluate.image_seed(0, i))],
                     **kwargs).images[0]
        tuned, base = (pixels(evaluate.image_path(str(out), v, i)) for v in ("tuned", "base"))
        assert np.array_equal(np.array(image), tuned), np.abs(np.array(image).astype(int) - tuned).max()
        assert not np.array_equal(tuned, base)


@pytest.mark.parametrize("case,message", [
    ("lora_scale", "--lora_scale 0.5: --lora RUN is a --finetune full run (a trained denoiser, no LoRA adapter to "
                   "scale); leave out --lora_scale"),
    ("neither", "--lora RUN: no pytorch_lora_weights.safetensors in it (a LoRA run's --output_dir holds one) nor a "
                "unet/ or transformer/ model folder with its config.json"),
    ("no_weights", "--lora RUN: unet has no weights file"),
    ("other_family", "--lora RUN holds a full fine-tuned unet/, but the denoiser of the StableDiffusion3Pipeline "
                     f"--pretrained_model_name_or_path {TINY_SD35} is its transformer/"),
    ("other_config", "--lora RUN: its unet/ is configured otherwise than the denoiser of the "
                     "StableDiffusionXLPipeline"),
])
def test_a_full_runs_bad_input_is_one_line_before_any_model(case, message, full_runs, tmp_path, capsys, monkeypatch):
    """--lora_scale on a full run (no adapter), a folder with neither a LoRA file nor a model folder (a unet/ without
    its config.json), a unet/ without weights, a base model of another family or configuration: one line."""
    import shutil
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    (tmp_path / "p.txt").write_text("a cat\n")
    run, argv = tmp_path / "run", ["--prompts", str(tmp_path / "p.txt"), "--output_dir", str(tmp_path / "out")]
    shutil.copytree(full_runs["sd15"], run)
    if case == "lora_scale":
        argv += ["--lora_scale", "0.5"]
    elif case == "neither":
        os.remove(run / "unet" / "config.json")
    elif case == "no_weights":
        os.remove(run / "unet" / "diffusion_pytorch_model.safetensors")
    else:
        argv += ["--pretrained_model_name_or_path", TINY_SD35 if case == "other_family" else TINY_SDXL, "--sampler",
                 "pipeline"]
    code = evaluate.cli(["--lora", str(run), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("evaluate.py: error: ")
    assert message.replace("RUN", str(run)) in err, err
