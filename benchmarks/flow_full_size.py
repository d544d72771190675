"""Real-size flow models without a GPU: one update of drtune.py and of dpo.py on the published SD3.5-Medium
architecture and on a FLUX.1-dev-width transformer with fewer blocks, random weights (nothing downloaded), on CPU.

Protocol (fixed before the run): each model is written once as a diffusers folder (bf16 on disk) in a fresh process:
SD3.5-Medium's transformer (MMDiT-X: 24 layers of 24 x 64 heads, QK RMS-norm, dual attention in layers 0-12), its
16-channel VAE, CLIP-L and CLIP-G text towers at full size and no T5 (the 4.7 B encoder stays out, as SD3 allows:
its slot holds zeros); FLUX.1-dev's transformer at its width (24 x 128 heads, joint dim 4096, guidance embedding,
rotary axes 16/56/56) with --flux_blocks double and single blocks instead of 19 and 38, its VAE, CLIP-L, and a
one-layer T5 of T5-XXL's width standing in for the 4.7 B one. Tokenizers come from tiny_models/ (only token ids
matter). Then each script runs as a user runs it (a subprocess) for one update at --resolution, T = 2 steps, batch 1,
LoRA rank 4, --mixed_precision bf16 (frozen weights bf16, LoRA fp32), no CFG, 77 T5 tokens: DRTune with K = 1
and t_min = 1; offline Diffusion-DPO on 2 generated pairs. Checked: the run ends with a finite loss and a non-zero
gradient, the LoRA file's tensors are fp32, every key names a module of the architecture with the right in / out
features, and the family's pipeline class reads the file (lora_state_dict). Recorded: the process's peak resident
set and its CPU time (CPU figures: memory is what counts; times only as an order of magnitude). Writes the
flow_full_size section of BENCHMARKS.md.

    python -m benchmarks.flow_full_size                     # about 3 CPU minutes, under 9 GiB peak
    python -m benchmarks.flow_full_size --models flux --flux_blocks 1 1 --output_dir /tmp/b   # a smaller look

On a GPU, the SD3.5-M DRTune run at the paper's FDXL-like size is `--gpu` (1024 px, 28 steps, K = 3, CFG 7, T5 still
out): not run here (no GPU lent).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common

SD35_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
FLUX_TRANSFORMER = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json, but num_layers / num_single_layers
    patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLOW_VAE = dict(  # the SD3 / FLUX autoencoder: 16 latent channels, 8x down-sampling, no quant convs
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_STAND_IN = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
                   feed_forward_proj="gated-gelu", is_gated_act=True)  # T5-XXL's width, one layer
MODELS = {
    "sd35": dict(title="SD3.5-Medium (published architecture)", tiny="sd35", pipeline="StableDiffusion3Pipeline"),
    "flux": dict(title="FLUX.1-dev width, fewer blocks", tiny="flux", pipeline="FluxPipeline"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--scripts", nargs="+", choices=["drtune", "dpo"], default=["drtune", "dpo"])
    parser.add_argument("--flux_blocks", type=int, nargs=2, default=[2, 4], metavar=("DOUBLE", "SINGLE"),
                        help="FLUX double- and single-stream blocks (FLUX.1-dev: 19 and 38)")
    parser.add_argument("--resolution", type=int, default=128, help="px")
    parser.add_argument("--gpu", action="store_true", help="SD3.5-M DRTune at 1024 px, 28 steps, K = 3, CFG 7")
    parser.add_argument("--num_threads", type=int, default=2, help="torch threads of each run (CPU)")
    parser.add_argument("--output_dir", default=common.ROOT, help="folder of BENCHMARKS.md")
    args = common.finish_args(parser.parse_args(argv), "flow_full_size", argv)
    if args.gpu and args.device != "cuda":
        common.error("--gpu needs a GPU")
    return args


def write_model(job):
    """Worker: the random-weight pipeline folder of job["name"], bf16 on disk; returns parameter counts."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)
    name, folder = job["name"], job["folder"]
    tiny = os.path.join(common.ROOT, "tiny_models", MODELS[name]["tiny"])
    tokenizer = AutoTokenizer.from_pretrained(tiny, subfolder="tokenizer")  # EOS is its largest id (CLIP pooling)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    with open(os.path.join(tiny, "model_index.json")) as f:
        index = json.load(f)
    torch.set_default_dtype(torch.bfloat16)
    if name == "sd35":
        index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])  # no T5, as SD3 allows
        components = dict(transformer=SD3Transformer2DModel(**SD35_TRANSFORMER),
                          vae=AutoencoderKL(**FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609),
                          text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **ids)),
                          text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **ids)))
        subfolders = ("scheduler", "tokenizer", "tokenizer_2")
    else:
        double, single = job["flux_blocks"]
        components = dict(transformer=FluxTransformer2DModel(**FLUX_TRANSFORMER, num_layers=double,
                                                             num_single_layers=single),
                          vae=AutoencoderKL(**FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159),
                          text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)),
                          text_encoder_2=T5EncoderModel(T5Config(**T5_STAND_IN, pad_token_id=ids["pad_token_id"])))
        subfolders = ("scheduler", "tokenizer", "tokenizer_2")
    for sub in subfolders:
        shutil.copytree(os.path.join(tiny, sub), os.path.join(folder, sub))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)
    for sub, model in components.items():
        model.save_pretrained(os.path.join(folder, sub))
    return dict(params={sub: sum(p.numel() for p in model.parameters()) for sub, model in components.items()})


def run_script(script, folder, output_dir, args, flags):
    """The script as a user runs it; returns (exit code, CPU seconds, peak RSS GiB, the tail of its output)."""
    argv = [sys.executable, os.path.join(common.ROOT, f"{script}.py"), "--pretrained_model_name_or_path", folder,
            "--output_dir", output_dir, "--resolution", str(args.resolution), "--num_inference_steps", "2",
            "--train_batch_size", "1", "--max_train_steps", "1", "--rank", "4", "--mixed_precision", "bf16",
            "--max_sequence_length", "77", "--report_to", "none", "--num_eval_prompts", "1",
            "--validation_steps", "1000", "--checkpointing_steps", "1000", "--learning_rate", "1e-4", *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.num_threads), HF_HUB_OFFLINE="1")
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=output_dir)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-1500:]
    return process.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2 ** 20, tail


def check_lora(name, folder, output_dir):
    """The LoRA file against the architecture: fp32 tensors, every key a module with matching features, read by the
    family's pipeline class. Returns (number of tensors, MiB)."""
    import diffusers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    path = os.path.join(output_dir, "pytorch_lora_weights.safetensors")
    state = load_file(path)
    assert {t.dtype for t in state.values()} == {torch.float32}, "LoRA tensors are not fp32"
    pipeline = getattr(diffusers, MODELS[name]["pipeline"])
    read = pipeline.lora_state_dict(path)
    read = read[0] if isinstance(read, tuple) else read
    assert set(read) == set(state), "the pipeline reads other keys than were written"
    config_class = diffusers.SD3Transformer2DModel if name == "sd35" else diffusers.FluxTransformer2DModel
    with init_empty_weights():
        modules = dict(config_class.from_config(config_class.load_config(folder, subfolder="transformer"))
                       .named_modules())
    for key, tensor in state.items():
        module_name, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        module = modules[module_name]
        assert tensor.shape[1 if kind.startswith("A") else 0] == (
            module.in_features if kind.startswith("A") else module.out_features), key
    return len(state), sum(t.numel() * 4 for t in state.values()) / 2 ** 20


def main(args):
    start = time.time()
    context = common.fork_context([])
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            folder = os.path.join(root, name)
            os.makedirs(folder)
            print(f"building {name} ...", flush=True)
            built = common.run_in_fresh_process(context, write_model, dict(name=name, folder=folder,
                                                                          flux_blocks=args.flux_blocks))
            if built["status"] != "ok":
                common.error(f"building {name} failed: {built['reason']}\n{built.get('traceback', '')}")
            params = ", ".join(f"{k} {v / 1e9:.3g} B" for k, v in built["params"].items())
            for script in args.scripts:
                output_dir = os.path.join(root, f"{name}-{script}")
                os.makedirs(output_dir)
                if script == "drtune":
                    flags = ["--reward", "symmetry", "--early_stop_max", "1"]
                    flags += (["--guidance_scale", "7", "--num_inference_steps", "28", "--num_trained_steps", "3",
                               "--resolution", "1024"] if args.gpu else ["--guidance_scale", "1",
                                                                          "--num_trained_steps", "1"])
                else:
                    pairs = os.path.join(root, "pairs.parquet")
                    common.pairs_parquet(pairs, 2, args.resolution)
                    flags = ["--dataset_name", pairs, "--beta_dpo", "500"]
                print(f"{name} {script} ...", flush=True)
                code, cpu, peak, tail = run_script(script, folder, output_dir, args, flags)
                if code != 0:
                    rows.append([MODELS[name]["title"], script, params, "failed", "-", "-", tail.splitlines()[-1]])
                    print(tail)
                    continue
                metrics = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
                step = metrics[-1]
                finite = all(map(lambda v: v == v and abs(v) != float("inf"), [step["loss"], step["grad_norm"]]))
                tensors, mib = check_lora(name, folder, output_dir)
                checks = "loss finite, gradient > 0, LoRA fp32 and matching" if finite and step["grad_norm"] > 0 \
                    else f"loss {step['loss']}, grad {step['grad_norm']}"
                rows.append([MODELS[name]["title"], script, params, f"{cpu:.0f}", f"{peak:.1f}",
                             f"{tensors} ({mib:.1f} MiB)", checks])
    body = ["## Real-size flow models on CPU: one update of DRTune and DPO, random weights", "",
            *common.header_lines(args, time.time() - start, "process CPU seconds (both threads)"), "",
            f"Protocol: `benchmarks/flow_full_size.py`'s docstring: {args.resolution} px, T = 2, batch 1, bf16 frozen "
            f"weights, LoRA rank 4 (fp32), no CFG, 77 T5 tokens; FLUX with {args.flux_blocks[0]} double and "
            f"{args.flux_blocks[1]} single blocks. Peak RSS is the whole process's (libraries, all models, the update).",
            "", common.markdown_table(["model", "script", "parameters", "CPU s", "peak RSS GiB", "LoRA tensors",
                                       "checks"], rows), "",
            "The GPU run (SD3.5-M DRTune at 1024 px, 28 steps, K = 3, CFG 7) is `--gpu`: not measured, no GPU was "
            "lent.", ""]
    common.write_report(args.output_dir, "flow_full_size", "\n".join(body))


if __name__ == "__main__":
    main(parse_args())
