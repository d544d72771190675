"""Memory on a real GPU, planned on a CPU: what each script needs per GPU for SD1.5, SDXL, SD3.5-Medium and FLUX.1-dev,
with LoRA and with full fine-tuning (`--finetune full`, FSDP2 with per-call resharding) over N = 8 processes, and
whether it fits 24, 40 or 80 GB; full fine-tuning's model states on one process beside it.

Method (fixed before the numbers were seen; full fine-tuning's FSDP2 root unit and gradients in flight were added
when the scripts moved to per-call resharding, the nested units when shard_blocks began to wrap each transformer block
inside a UNet block, the block and both checkpointing granularities after the call granularity's numbers were seen):
- Parameters: counted on the published architectures, built on torch's "meta" device (shapes only, nothing allocated
  or downloaded): the configs of benchmarks/full_size.py (SD1.5 UNet, SDXL UNet, the SD VAE, CLIP-L, OpenCLIP-bigG) and
  benchmarks/flow_full_size.py (SD3.5-Medium's MMDiT-X transformer, the 16-channel VAE), FLUX.1-dev's transformer at
  its 19 double and 38 single blocks, T5-XXL's encoder (24 layers, d_model 4096, d_ff 10240, 64 heads). The reward
  model of every script but offline DPO is HPS v2.1 (open_clip ViT-H-14, 986.1 M parameters: open_clip's model
  table), bf16.
- Activations: not scaled from the tiny runs (their channel widths and token counts are not the real ones, and the
  scaling would be the estimate's largest error) but counted on the real architecture at the real size: one forward
  of the denoiser (and of the VAE decoder) on the meta device at batch 1 and the family's resolution, summing the bytes
  of every tensor autograd saves for backward (torch.autograd.graph.saved_tensors_hooks), parameters left out.
  Attention is counted as the fused kernels a GPU runs save it (q, k, v, output and a float32 log-sum-exp per query;
  no tokens x tokens matrix). Two trainable sets: LoRA (only the attention projections' weights need gradients; the
  rank-r intermediates, r / width of the saved inputs, are left out) and full (every weight). Tensors saved twice as
  views are counted twice: on CPU with real tensors at 128 px, the count is 15% above the distinct storages (SD1.5),
  so these figures lean high. The TRAPS measurement of SD1.5 at 512 px (bf16, LoRA: 0.97 GiB per step) is the check.
- A training step per GPU, batch 1 (activations grow linearly with the batch; weights do not): frozen weights bf16
  (denoiser, VAE, text encoders, reward); LoRA: fp32 adapter weights, gradients and Adam's two moments, 16 bytes per
  LoRA parameter, at the rank of the script's preset for the family (else its --rank default) (with LoRA the
  reference of DPO, SPO and GRPO is the adapter-off model: nothing more). Text encoders and reward are replicated.
- Full fine-tuning (`--finetune full`; drtune.py's train_full, shard_denoiser, shard_blocks, keep_base_copy; README's
  "Full fine-tuning") over N = 8 processes: FSDP2's per-call resharding. shard_blocks calls `fully_shard`, innermost
  first, on every module whose qualified name matches its pattern (SHARD_UNIT here: every element of a ModuleList
  named *blocks at any depth, so a UNet's down and up blocks and, inside their attentions, each transformer block; an
  MMDiT's or FLUX's transformer blocks; and the mid block), then on the root. A unit gathers only its own
  parameters, the ones no unit nested inside it holds (an SDXL down block: its resnets, samplers and the attentions'
  norms and projections around its transformer blocks; the root: embedders, norms, the output projection); the sizes
  below are own parameters (fsdp_units). Default reshard_after_forward and `MixedPrecisionPolicy(param_dtype=` the
  --mixed_precision dtype (bf16 here)`, reduce_dtype=float32)`. Sharded 1/N: the fp32 master weights, their fp32
  gradient shards and AdamW's two moments (16 / N bytes per parameter). Gathered: a unit's weights are all-gathered
  in bf16 just before each of its calls (forward, and again in the backward or a checkpointed call's recomputation)
  and freed after it, with the next unit's all-gather in flight, so two units, the largest (the one computing and the
  one prefetched), 2 bytes per parameter each; the units enclosing the computing one stay gathered through its call
  (an outer unit reshards after its own forward or backward, which contains the inner one's): 2 bytes per parameter
  of the most any unit's enclosing units hold; the root's unit stays gathered from its forward to the end of its
  backward (FSDP2 does not reshard a root after its forward): 2 bytes per root parameter. Gradients in flight during a
  backward: the computing unit's unsharded bf16 gradients (2 bytes per parameter of the largest unit), the previous
  unit's fp32 reduce-scatter input (4), held until its reduce-scatter is done, and the enclosing units' and the
  root's unsharded bf16 gradients (2 per parameter), which accumulate to the end of their backward. Taking the
  largest unit and the largest enclosing set together is an upper bound (they need not be the same unit's). No
  autocast cache (the gathered weights are already bf16) and no whole fp32 weights or gradients. DPO, SPO and GRPO
  with --beta > 0 (GRPO's preset for the family, else its default 0) keep a frozen copy of the base
  denoiser in the weight dtype (keep_base_copy), sharded the same way: 2 / N bytes per parameter, plus its root's
  unit, which stays gathered after its no-grad calls (no backward reshards it); its other units are gathered only during
  its own calls, not counted beside the trained model's. Every process makes the same denoiser calls and draws the
  evaluation grids (no-grad: not counted). One process (N = 1) shards nothing: fp32 weights (the master weights, 4
  bytes per parameter), fp32 gradients (4) and AdamW's moments (8), 16 in all; its forwards run under autocast from
  fp32 weights, and autocast caches one bf16 cast of every weight for the autocast region (the graph, or a recomputed
  call's graph under checkpointing, holds them until the backward): 2 bytes per parameter more (checked on CPU: the
  cast weight saved by two calls is one tensor); the reference copy is whole (2). Checkpoints and the final folder are
  gathered on the main process in CPU memory (16 bytes per parameter of host RAM while it writes; not GPU memory, not
  in the step table). The earlier implementation (whole fp32 weights and gradients on every process, only the master
  weights and AdamW's moments sharded) was replaced by this one and is no longer planned.
- Trained denoiser calls whose graph an update holds: DRTune K (its preset's num_trained_steps), ReFL 1, DRaFT its
  preset's K, AlignProp every step (the truncation can reach T), DPO 2 (winner and loser), SPO 1 (both candidates'
  log-densities come from one call), GRPO 1 (each transition's loss is backpropagated on its own); CFG doubles the batch
  of a trained call where the script trains through CFG (every script but DPO, and not FLUX, which is guidance
  distilled). Backpropagating methods (DRTune, ReFL, DRaFT, AlignProp) also decode with gradient. Without gradient
  checkpointing the saved activations of every trained call and of the decode add up. With it, the scripts'
  --checkpointing_granularity (drtune.py's enable_checkpointing, checkpointed), each planned:
  call (the default): each call and the decode is one reentrant checkpoint that keeps only its input, and the backward
    recomputes one call or the decode at a time, whole: the peak is the largest of them plus the inputs.
  block: diffusers' gradient checkpointing inside the denoiser and the VAE decoder (enable_gradient_checkpointing;
    torch.utils.checkpoint, non-reentrant, per block: a UNet's resnets and the transformer blocks inside its
    attentions, an MMDiT's or FLUX's transformer blocks, the decoder's mid and up blocks), counted by
    block_checkpointing_bytes: the denoiser and the decode run on the meta device with diffusers' checkpointing on and
    a counting function in place of its checkpoint, which records the tensors among each outermost block's arguments
    (what the checkpoint keeps) and collects what the block saves with a saved-tensor hook of its own (what its
    recomputation holds); the operations between the blocks save as usual. Each call keeps through the backward its
    "held" part (the distinct block inputs, a tensor handed to every block once, and what the operations between the
    blocks save, a tensor in both once), and the backward recomputes one block at a time: the peak is every trained
    call's held part plus the larger of the decode's held part with its largest block's saved activations and one
    call's largest block's (the decode's backward comes first, and its part is freed before the calls'). TRAPS.md's
    SD1.5 and SDXL LoRA steps "with checkpointing" (0.14 and 0.45 GiB) agree with this held part (counted: 0.14,
    0.45).
  both: the call checkpoint whose recomputation runs with block checkpointing: every call's input plus the largest of
    one call's held part with its largest block, and the decode's held part with its largest block.
  The plan shows `call` and, per script, the lowest of the three (a tie goes to the least recomputation, call, then
  block, then both): block where one trained call and no decode with gradient (SPO, GRPO: both would add that call's
  input), both otherwise (block keeps every trained call's held part and adds the decode's recomputation to it).
- Not counted: the CUDA context and allocator slack (about 0.5-1 GiB), the reward model's own activations, the
  no-grad sampling's transient activations (smaller than one trained call's), the text encoders' activations.

    python -m benchmarks.memory_plan             # CPU, under a minute: writes the memory_plan section of BENCHMARKS.md
    python -m benchmarks.memory_plan --measure   # GPU only: measured peak of one denoiser training step beside the plan

--measure (needs a GPU; refused on a CPU) builds each denoiser at full size with random weights in bf16 on the GPU,
runs one forward and backward at the plan's shapes (LoRA-like: attention projections trainable; no checkpointing,
`call` and `block` granularity) and reports torch.cuda.max_memory_allocated above the weights next to the planned
activations.
"""

import argparse
import contextlib
import math
import os
import re
import sys
import time

import torch

if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import common
from benchmarks.flow_full_size import CLIP_G, FLOW_VAE, FLUX_TRANSFORMER, SD35_TRANSFORMER
from benchmarks.full_size import CLIP_BIGG, CLIP_L, SD15_UNET, SD_VAE, SDXL_UNET

GIB = 2 ** 30
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_gated_act=True)  # google/t5-v1_1-xxl's encoder (SD3, FLUX)
HPS_V21_PARAMS = 986.1e6  # open_clip ViT-H-14 (image and text towers), the HPS v2.1 checkpoint's architecture
FAMILIES = {
    "sd15": dict(title="SD1.5", resolution=512, text=[("clip", CLIP_L)], cfg=True, tokens=77),
    "sdxl": dict(title="SDXL", resolution=1024, text=[("clip", CLIP_L), ("clip", CLIP_BIGG)], cfg=True, tokens=77),
    "sd35": dict(title="SD3.5-Medium", resolution=1024, text=[("clip", CLIP_L), ("clip", CLIP_G), ("t5", T5_XXL)],
                 cfg=True, tokens=77 + 256),
    "flux": dict(title="FLUX.1-dev", resolution=1024, text=[("clip", CLIP_L), ("t5", T5_XXL)], cfg=False, tokens=512),
}
SCRIPTS = ["drtune", "refl", "draft", "alignprop", "dpo", "spo", "grpo"]
BACKPROP = {"drtune", "refl", "draft", "alignprop"}
REFERENCE = {"dpo", "spo", "grpo"}  # a frozen reference (full fine-tuning: a bf16 copy, sharded; grpo with beta > 0)
GPUS = (24, 40, 80)
FSDP_WORLD = 8
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--measure", action="store_true",
                        help="GPU only: measure one denoiser training step's peak at full size, random weights")
    parser.add_argument("--output_dir", default=common.ROOT, help="folder of BENCHMARKS.md")
    args = common.finish_args(parser.parse_args(argv), "memory_plan", argv)
    if args.measure and args.device != "cuda":
        common.error("--measure needs a GPU (it builds each denoiser at full size on it); without --measure the plan "
                     "is computed on the CPU")
    return args


# --- the models, on the meta device -------------------------------------------------------------------------------

def build_denoiser(family):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    if family == "sd15":
        return UNet2DConditionModel(**SD15_UNET)
    if family == "sdxl":
        return UNet2DConditionModel(**SDXL_UNET)
    if family == "sd35":
        return SD3Transformer2DModel(**SD35_TRANSFORMER)
    return FluxTransformer2DModel(**FLUX_TRANSFORMER, num_layers=19, num_single_layers=38)


def build_vae(family):
    from diffusers import AutoencoderKL
    return AutoencoderKL(**(SD_VAE if family in ("sd15", "sdxl") else FLOW_VAE))


def text_encoder_params(family):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    total = 0
    with torch.device("meta"):
        for kind, config in FAMILIES[family]["text"]:
            model = (CLIPTextModelWithProjection(CLIPTextConfig(**config)) if kind == "clip"
                     else T5EncoderModel(T5Config(**config)))
            total += sum(p.numel() for p in model.parameters())
    return total


def count(model):
    return sum(p.numel() for p in model.parameters())


def lora_params(model, rank):
    """r (in + out) for each Linear the scripts put LoRA on."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(LORA_TARGETS))


SHARD_UNIT = re.compile(r"(^|\.)(\w*blocks\.\d+|mid_block)$")  # drtune.py's shard_blocks: the modules it wraps


def fsdp_units(model):
    """The units drtune.py's shard_blocks gives fully_shard, by their own parameters (a unit's parameters minus those of
    the units inside it, which it does not gather): every module whose qualified name matches SHARD_UNIT (each element
    of a ModuleList named *blocks at any depth, so a UNet's down and up blocks and each transformer block inside their
    attentions; the mid block), innermost first, then the root, which holds what no other unit holds. A dict: unit, the
    largest non-root unit; root, the root's; outer, the most that the non-root units enclosing one unit hold (gathered,
    and their gradients accumulating, while it computes: a UNet block's resnets around its transformer blocks)."""
    names = {name for name, _ in model.named_modules() if SHARD_UNIT.search(name)}
    own = dict.fromkeys(names, 0)
    root = 0
    for name, p in model.named_parameters():
        prefixes = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]  # innermost first
        owner = next((n for n in prefixes if n in names), None)
        if owner is None:
            root += p.numel()
        else:
            own[owner] += p.numel()
    enclosing = lambda n: sum(own[o] for o in names if n.startswith(o + "."))  # noqa: E731
    return dict(unit=max(own.values(), default=0), root=root, outer=max(map(enclosing, names), default=0))


class FusedAttention(torch.autograd.Function):
    """What a fused attention kernel saves for backward: q, k, v, the output and a float32 log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def counting_saved_tensors():
    """Sum the bytes of every non-parameter tensor autograd saves for backward inside; attention as fused kernels."""
    import torch.nn.functional as F
    saved, original = {}, F.scaled_dot_product_attention

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            saved[id(t)] = t.numel() * t.element_size()
        return t

    def fused(*args, **kwargs):  # positional (diffusers' AttnProcessor2_0) or query=, key=, value= (its dispatcher)
        q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
        return FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = fused
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield saved
    finally:
        F.scaled_dot_product_attention = original


def denoiser_inputs(family, resolution, device, dtype=torch.bfloat16):
    """One call's inputs at batch 1, as the scripts call the denoiser."""
    latent = resolution // 8
    t = torch.tensor([500.0], device=device)
    if family in ("sd15", "sdxl"):
        kwargs = dict(sample=torch.empty(1, 4, latent, latent, device=device, dtype=dtype), timestep=t,
                      encoder_hidden_states=torch.empty(1, 77, 768 if family == "sd15" else 2048, device=device,
                                                        dtype=dtype))
        if family == "sdxl":
            kwargs["added_cond_kwargs"] = dict(text_embeds=torch.empty(1, 1280, device=device, dtype=dtype),
                                               time_ids=torch.empty(1, 6, device=device, dtype=dtype))
        return kwargs, "sample"
    tokens = FAMILIES[family]["tokens"]
    text = torch.empty(1, tokens, 4096, device=device, dtype=dtype)
    if family == "sd35":
        return dict(hidden_states=torch.empty(1, 16, latent, latent, device=device, dtype=dtype),
                    encoder_hidden_states=text, pooled_projections=torch.empty(1, 2048, device=device, dtype=dtype),
                    timestep=t), "hidden_states"
    side = latent // 2  # FLUX packs 2x2 latent patches into tokens
    return dict(hidden_states=torch.empty(1, side * side, 64, device=device, dtype=dtype),
                encoder_hidden_states=text, pooled_projections=torch.empty(1, 768, device=device, dtype=dtype),
                timestep=t / 1000, img_ids=torch.zeros(side * side, 3, device=device),
                txt_ids=torch.zeros(tokens, 3, device=device), guidance=torch.full((1,), 3.5, device=device)
                ), "hidden_states"


def set_trainable(model, mode):
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        p.requires_grad_(mode == "full" or module.endswith(LORA_TARGETS))


def saved_bytes(model, fn):
    with counting_saved_tensors() as saved:
        fn()
    return sum(saved.values())


def nbytes(t):
    return t.numel() * t.element_size()


def tensors_in(value):
    """The tensors in a checkpointed block's arguments (tuples, lists and dicts walked: FLUX's rotary (cos, sin))."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def block_checkpointing_bytes(model, fn):
    """Activations of one call of `model` under diffusers' gradient checkpointing (the scripts'
    --checkpointing_granularity block: model.enable_gradient_checkpointing()), counted on the meta device. diffusers
    hands every checkpointed block to its checkpoint function (torch.utils.checkpoint, non-reentrant), which keeps the
    block's arguments (its recomputation's inputs) and nothing the block saves; everything outside the blocks saves
    as usual. Here the function is a counting one: at the outermost level it records the tensors among the block's
    arguments and runs the block with its own saved-tensor hook, which collects what the block saves (what its
    recomputation holds in the backward); a checkpointed block inside a checkpointed block runs as part of the outer
    one (counted in its recomputation: an upper bound). A dict, bytes: inputs, the distinct tensors the blocks'
    checkpoints keep (one tensor handed to every block, the text states or FLUX's temb and rotary embedding, once);
    outside, what the operations outside the blocks save (counting_saved_tensors); held, the two together with a
    tensor in both counted once (kept through the call's backward); peak, the most one block's recomputation saves;
    blocks, the number of outermost checkpointed blocks."""
    inputs, peaks, depth = {}, [], [0]

    def checkpoint_function(block, *args):
        if depth[0]:
            return block(*args)
        inputs.update((id(t), t) for t in tensors_in(args))
        inner = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
                inner[id(t)] = t
            return t

        depth[0] += 1
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = block(*args)
        finally:
            depth[0] -= 1
        peaks.append(sum(map(nbytes, inner.values())))
        return out

    model.enable_gradient_checkpointing(checkpoint_function)
    try:
        with counting_saved_tensors() as saved:
            fn()
            outside = sum(saved.values())
            held = outside + sum(nbytes(t) for key, t in inputs.items() if key not in saved)
    finally:
        model.disable_gradient_checkpointing()
    return dict(inputs=sum(map(nbytes, inputs.values())), outside=outside, held=held, peak=max(peaks, default=0),
                blocks=len(peaks))


def measure_family(family):
    """Parameter counts and saved activation bytes per call (meta device) of one family."""
    spec, resolution = FAMILIES[family], FAMILIES[family]["resolution"]
    with torch.device("meta"):
        denoiser, vae = build_denoiser(family).to(torch.bfloat16), build_vae(family).to(torch.bfloat16)
    kwargs, _ = denoiser_inputs(family, resolution, "meta")
    acts, blocks = {}, {}
    for mode in ("lora", "full"):
        set_trainable(denoiser, mode)
        acts[mode] = saved_bytes(denoiser, lambda: denoiser(**kwargs))
        blocks[mode] = block_checkpointing_bytes(denoiser, lambda: denoiser(**kwargs))
    vae.requires_grad_(False)
    latents = torch.empty(1, vae.config.latent_channels, resolution // 8, resolution // 8, device="meta",
                          dtype=torch.bfloat16, requires_grad=True)
    decode = saved_bytes(vae, lambda: vae.decode(latents).sample)
    decode_block = block_checkpointing_bytes(vae, lambda: vae.decode(latents).sample)
    input_bytes = sum(v.numel() * v.element_size() for v in kwargs.values() if isinstance(v, torch.Tensor))
    return dict(title=spec["title"], resolution=resolution, denoiser=count(denoiser), vae=count(vae),
                text=text_encoder_params(family), **fsdp_units(denoiser), act=acts, decode=decode,
                block=blocks, decode_block=decode_block,
                call_input=input_bytes, lora_per_rank=lora_params(denoiser, 1))


# --- the plan -----------------------------------------------------------------------------------------------------

def script_settings(script, family):
    """(rank, trained calls per update, whether --finetune full keeps a reference copy) from the script's preset for
    the family, else its defaults: dpo.py and spo.py always keep one, grpo.py with --beta > 0 (keep_base_copy)."""
    import importlib
    module = importlib.import_module(script)
    parser = module.build_parser()
    module.add_algorithm_arguments(parser)
    defaults = {a.dest: a.default for a in parser._actions}
    preset = next((v for k, v in module.PRESETS.items() if k.startswith(family) or (
        family == "sd15" and k in ("paper",))), {})
    value = lambda key: preset.get(key, defaults.get(key))  # noqa: E731
    calls = {"drtune": value("num_trained_steps"), "refl": 1, "draft": value("draft_k") or 1,
             "alignprop": value("num_inference_steps"), "dpo": 2, "spo": 1, "grpo": 1}[script]
    reference = script in ("dpo", "spo") or (script == "grpo" and (value("beta") or 0) > 0)
    return value("rank"), int(calls), reference


GRANULARITIES = ("call", "block", "both")  # the scripts' --checkpointing_granularity choices


def activations(m, script, family, finetune, checkpointing, calls):
    """Activation bytes at the peak of one training step's backward. checkpointing: False (none), or the scripts'
    --checkpointing_granularity: "call" (True means it, the default), "block" or "both" (enable_checkpointing).
    m's figures per trained call (times 2 where the script trains through CFG: one call at twice the batch): act, all
    it saves; call_input, its input; block (block_checkpointing_bytes), under diffusers' block checkpointing: held,
    what the call keeps (its blocks' inputs and what the operations between them save), and peak, the most one
    block's recomputation saves; the decode with gradient (backpropagating scripts) alike: decode, decode_block.
    - none: every trained call's and the decode's saved activations at once.
    - call: every call's input, plus the largest recomputation: one call's or the decode's whole activations.
    - block: every call keeps its held part through the backward; the backward runs the decode first, recomputing one
      of its blocks at a time (the decode's held part and its largest block's), then the calls, one block at a time.
    - both: every call's input (the call checkpoint), plus the largest recomputation, which itself runs with block
      checkpointing: a call's held part and its largest block's, or the decode's."""
    cfg = 2 if FAMILIES[family]["cfg"] and script != "dpo" else 1
    mode = "lora" if finetune == "lora" else "full"
    act_call = m["act"][mode] * cfg
    decode = m["decode"] if script in BACKPROP else 0
    if not checkpointing:
        return calls * act_call + decode
    granularity = "call" if checkpointing is True else checkpointing
    inputs = calls * m["call_input"] * cfg
    if granularity == "call":
        return max(act_call, decode) + inputs
    held, peak = m["block"][mode]["held"] * cfg, m["block"][mode]["peak"] * cfg
    decode_held, decode_peak = (m["decode_block"]["held"], m["decode_block"]["peak"]) if decode else (0, 0)
    if granularity == "block":
        return calls * held + max(decode_held + decode_peak, peak)
    if granularity == "both":
        return max(held + peak, decode_held + decode_peak) + inputs
    raise ValueError(f"unknown checkpointing granularity {granularity!r}")


def plan(m, script, family, finetune, checkpointing, rank, calls, reference=None, world=FSDP_WORLD):
    """Bytes per GPU of one training step, by part. checkpointing: False, or True / "call", "block", "both" (the
    scripts' --checkpointing_granularity; activations). finetune "lora", or "full" over `world` processes: FSDP2's
    per-call resharding (shard_denoiser: 16 bytes per parameter / world; gathered in bf16: the root's unit, the units
    enclosing the computing one (m["outer"]) and two of the largest unit (fsdp_units: own parameters); gradients in
    flight: a unit's unsharded bf16 gradients and fp32 reduce-scatter input, the enclosing units' and the root's
    unsharded bf16 gradients; a bf16 reference sharded 1/world, its root's unit gathered), or on one process (world 1)
    nothing sharded: fp32 weights, gradients and AdamW's moments (16 bytes per parameter), autocast's bf16 casts of the
    weights (2), a whole bf16 reference (2). `reference`: whether full fine-tuning keeps the reference copy (default:
    the script has a reference model)."""
    P, bf16 = m["denoiser"], 2
    reward = 0 if script == "dpo" else HPS_V21_PARAMS * bf16
    frozen = (m["vae"] + m["text"]) * bf16 + reward
    reference = script in REFERENCE if reference is None else reference
    if finetune == "lora":
        lora = m["lora_per_rank"] * rank
        parts = dict(denoiser=P * bf16, autocast=0, gradients=0, trainable=lora * 16, reference=0)
    elif world == 1:
        # nothing sharded: the fp32 weights are the master weights; whole fp32 gradients; AdamW's m and v; autocast's
        # bf16 cast of every weight, held by the graph until the backward; a whole bf16 reference copy
        parts = dict(denoiser=P * 4, autocast=P * bf16, gradients=P * 4, trainable=P * 8,
                     reference=P * bf16 if reference else 0)
    else:
        # sharded 1/world: fp32 master weights, their gradient shards, AdamW's m and v; gathered in bf16: the root's
        # unit, the units enclosing the computing one and two units (computing, prefetched); in flight: the computing
        # unit's bf16 gradients, the previous unit's fp32 reduce-scatter input, the enclosing units' and the root's
        # bf16 gradients (reduced after their whole backward); the reference's shard and its gathered root
        unit, root, outer = m["unit"], m["root"], m["outer"]
        parts = dict(denoiser=(root + outer + 2 * unit) * bf16, autocast=0,
                     gradients=(unit + outer + root) * bf16 + unit * 4, trainable=P * 16 / world,
                     reference=(P / world + root) * bf16 if reference else 0)
    parts.update(frozen=frozen, activations=activations(m, script, family, finetune, checkpointing, calls))
    return parts


def fits(total):
    return " ".join(("yes" if total <= gb * 1e9 else "no") for gb in GPUS)


def smallest_fit(totals):
    """The smallest of GPUS (GB) every total fits, else None."""
    return next((gb for gb in GPUS if max(totals) <= gb * 1e9), None)


FLAG = "--gradient_checkpointing --checkpointing_granularity"


def lowest(parts_by_granularity):
    """The granularity of the lowest total among {granularity: plan's parts}; on a tie the first of GRANULARITIES
    (the least recomputation: call one more forward per call, block one more per block, both two)."""
    return min(GRANULARITIES, key=lambda g: (sum(parts_by_granularity[g].values()), GRANULARITIES.index(g)))


def fit_words(totals):
    gb, count_fit = smallest_fit(totals), sum(t <= GPUS[-1] * 1e9 for t in totals)
    return (f"every script fits {gb} GB" if gb else f"{count_fit} of {len(totals)} scripts fit {GPUS[-1]} GB"
            if count_fit else f"none fits {GPUS[-1]} GB")


def conclusions(full_parts):
    """One line per family from {title: {checkpointing: {script: plan's parts}}} of full fine-tuning, checkpointing
    False (none) and each of GRANULARITIES: the range over the scripts and what it fits for each, the range at each
    script's lowest granularity and the flag that gives it, and the largest of those by part."""
    lines = []
    for title, by in full_parts.items():
        said = []
        for checkpointing in (False, *GRANULARITIES):
            totals = [sum(parts.values()) for parts in by[checkpointing].values()]
            name = "without checkpointing" if not checkpointing else f"`{checkpointing}`" + (
                " (the default granularity)" if checkpointing == "call" else "")
            said.append(f"{name} {min(totals) / GIB:.1f}-{max(totals) / GIB:.1f} GiB ({fit_words(totals)})")
        best = {script: lowest({g: by[g][script] for g in GRANULARITIES}) for script in by["call"]}
        totals = {script: sum(by[g][script].values()) for script, g in best.items()}
        which = ", ".join(f"`{g}` ({', '.join(k for k, v in best.items() if v == g)})"
                          for g in GRANULARITIES if g in best.values())
        said.append(f"at each script's lowest, {which}: {min(totals.values()) / GIB:.1f}-"
                    f"{max(totals.values()) / GIB:.1f} GiB ({fit_words(list(totals.values()))})")
        fit = smallest_fit(totals.values())
        enough = [g for g in GRANULARITIES if smallest_fit([sum(p.values()) for p in by[g].values()]) == fit]
        if fit and "call" in enough:
            said.append(f"so every script fits {fit} GB with the default `{FLAG} call`")
        elif fit:
            said.append(f"so every script fits {fit} GB with `{FLAG} {enough[-1]}`" +
                        "".join(f" (or `{g}`)" for g in enough[:-1]) + ", not with the default `call`")
        script = max(totals, key=totals.get)
        parts = by[best[script]][script]
        states = sum(parts[k] for k in ("denoiser", "autocast", "gradients", "trainable", "reference"))
        said.append(f"the largest at its lowest ({script}, `{best[script]}`) is "
                    f"{parts['activations'] / GIB:.1f} GiB of activations, {states / GIB:.1f} of the denoiser's states "
                    f"and {parts['frozen'] / GIB:.1f} of frozen encoders and reward")
        lines.append(f"- {title}: " + "; ".join(said) + ".")
    return lines


def main(args):
    start = time.time()
    measured = {family: measure_family(family) for family in args.families}
    rows, param_rows, state_rows, block_rows, full_parts = [], [], [], [], {}
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    for family, m in measured.items():
        P = m["denoiser"]
        one = plan(m, "dpo", family, "full", True, 0, 1, reference=True, world=1)
        sharded = plan(m, "dpo", family, "full", True, 0, 1, reference=True)
        state_rows.append([m["title"], gb(one["denoiser"] + one["gradients"] + one["trainable"]), gb(one["autocast"]),
                           gb(one["reference"]), gb(sharded["trainable"]), gb(sharded["denoiser"]),
                           gb(sharded["gradients"]), gb(sharded["reference"]),
                           gb(sharded["trainable"] + sharded["denoiser"] + sharded["gradients"]),
                           f"{P * 16 / 1e9:.0f}"])
        param_rows.append([m["title"], f"{m['denoiser'] / 1e9:.3f} B", f"{m['vae'] / 1e6:.1f} M",
                           f"{m['text'] / 1e9:.3f} B", f"{m['unit'] / 1e6:.0f} M", f"{m['outer'] / 1e6:.0f} M",
                           f"{m['root'] / 1e6:.0f} M",
                           f"{m['resolution']}", f"{m['act']['lora'] / GIB:.2f}", f"{m['act']['full'] / GIB:.2f}",
                           f"{m['decode'] / GIB:.2f}"])
        block, decode_block = m["block"], m["decode_block"]
        block_rows.append([m["title"], str(block["full"]["blocks"]), f"{block['full']['inputs'] / GIB:.2f}",
                           f"{block['lora']['held'] / GIB:.2f}", f"{block['full']['held'] / GIB:.2f}",
                           f"{block['lora']['peak'] / GIB:.2f}", f"{block['full']['peak'] / GIB:.2f}",
                           f"{decode_block['held'] / GIB:.2f}", f"{decode_block['peak'] / GIB:.2f}"])
        full_parts[m["title"]] = {k: {} for k in (False, *GRANULARITIES)}
        for script in SCRIPTS:
            rank, calls, reference = script_settings(script, family)
            for finetune in ("lora", "full"):
                parts = {c: plan(m, script, family, finetune, c, rank, calls, reference)
                         for c in (False, *GRANULARITIES)}
                totals = {c: sum(p.values()) for c, p in parts.items()}
                if finetune == "full":
                    for c, p in parts.items():
                        full_parts[m["title"]][c][script] = p
                best = lowest(parts)
                rows.append([m["title"], script, f"LoRA r{rank}" if finetune == "lora" else
                             f"full, FSDP2, N = {FSDP_WORLD} processes" + (", + reference" if reference else ""),
                             str(calls), f"{totals[False] / GIB:.1f}", fits(totals[False]),
                             f"{totals['call'] / GIB:.1f}", fits(totals["call"]),
                             f"{totals[best] / GIB:.1f} (`{best}`)", fits(totals[best])])
    body = ["## Memory per GPU on real models, planned", "",
            *common.header_lines(args, time.time() - start, "wall-clock (meta-device counting, nothing allocated)"),
            "", "Method and assumptions: `benchmarks/memory_plan.py`'s docstring. Batch 1 per GPU, bf16 frozen "
            "weights, the family's native resolution; activations counted on the published architectures (meta "
            "device, fused attention), not measured on a GPU.", "",
            "Published architectures (parameters counted from the configs; FSDP2's units as drtune.py's shard_blocks "
            "makes them, each by its own parameters (those of the units nested inside it left out): the largest unit "
            "below the root, the most the units enclosing one unit hold (gathered while it computes: a UNet block's "
            "resnets and samplers around its transformer blocks) and the root, which holds every weight outside the "
            "other units; activations saved by one call at batch 1, GiB; a CFG call is twice that):", "",
            common.markdown_table(["model", "denoiser", "VAE", "text encoders", "largest FSDP unit",
                                   "FSDP enclosing units", "FSDP root unit", "px", "act LoRA", "act full",
                                   "VAE decode act"], param_rows), "",
            f"Full fine-tuning's model states per process (GB, 1e9 bytes; before activations, frozen encoders and "
            f"reward). One process shards nothing: fp32 weights, gradients and AdamW's two moments (16 bytes per "
            f"parameter), autocast's bf16 cast of every weight during a step (2), and DPO, SPO and GRPO with --beta > "
            f"0 a whole bf16 reference copy (2). Over N = {FSDP_WORLD} processes (`--finetune full`, drtune.py's "
            f"shard_denoiser: FSDP2 with per-call resharding): fp32 master weights, their gradient shards and AdamW's "
            f"moments 1/{FSDP_WORLD} (16 / {FSDP_WORLD}); gathered in bf16 the root's unit, the units enclosing the "
            f"computing one and two of the largest unit (computing and prefetched); in flight during a backward a "
            f"unit's unsharded bf16 gradients, the previous unit's fp32 reduce-scatter input and the enclosing units' "
            f"and the root's bf16 gradients; the reference's bf16 shard (2 / {FSDP_WORLD}) and its gathered root. "
            f"Checkpoints gather the weights and AdamW state on the main process's CPU (16 bytes per parameter of host "
            f"RAM, last column), not on a GPU.", "",
            common.markdown_table(["model", "1 process: weights + gradients + AdamW, fp32", "1 process: autocast "
                                   "bf16 casts", "1 process: reference bf16 (DPO, SPO, GRPO beta > 0)",
                                   f"N = {FSDP_WORLD}: weights + gradients + AdamW, 16 / {FSDP_WORLD}",
                                   f"N = {FSDP_WORLD}: gathered bf16, root + enclosing + 2 units",
                                   f"N = {FSDP_WORLD}: gradients in flight",
                                   f"N = {FSDP_WORLD}: reference, 2 / {FSDP_WORLD} + its root",
                                   f"N = {FSDP_WORLD}: total, no reference", "checkpoint host RAM, main process"],
                                  state_rows), "",
            "Block checkpointing (`--checkpointing_granularity block`: diffusers' gradient checkpointing inside the "
            "denoiser and the VAE decoder), one call at batch 1, GiB: the blocks diffusers checkpoints (a UNet's "
            "resnets and transformer blocks, an MMDiT's or FLUX's transformer blocks), the distinct tensors their "
            "checkpoints keep as inputs, what a call keeps through the backward (those inputs and what the operations "
            "between the blocks save; a tensor in both once) and the most one block's recomputation saves; a CFG call "
            "is twice that:", "",
            common.markdown_table(["model", "checkpointed blocks", "block inputs", "kept, LoRA", "kept, full",
                                   "largest block, LoRA", "largest block, full", "VAE decode: kept",
                                   "VAE decode: largest block"], block_rows), "",
            f"Per GPU, one training step (GiB; fits 24 / 40 / 80 GB: yes or no each). Trained calls: the denoiser "
            f"calls whose graph one update holds. The full rows are the scripts' `--finetune full` over N = "
            f"{FSDP_WORLD} processes, FSDP2 with per-call resharding ('+ reference': the sharded reference copy is "
            f"counted; GRPO keeps one only with --beta > 0, which only its SD3.5 preset sets). Checkpointing: "
            f"`{FLAG} call` (the default granularity), and the lowest of `call`, `block` and `both` for the "
            f"row (`{FLAG} <granularity>`, the granularity named in the cell).", "",
            common.markdown_table(["model", "script", "fine-tuning", "trained calls", "GiB, no checkpointing",
                                   "fits", "GiB, `call`", "fits", "GiB, lowest granularity", "fits"], rows), "",
            f"Full fine-tuning over N = {FSDP_WORLD} processes, per GPU, over the seven scripts (batch 1):", "",
            *conclusions(full_parts), "",
            "Check against a measurement: TRAPS.md's SD1.5 UNet at 512 px, bf16, LoRA, saved 0.97 GiB per step "
            "(0.14 with checkpointing), SDXL at 1024 px 7.25 GiB (0.45); the VAE decoder 2.8 GiB at 512 px and 11.1 "
            "at 1024 px. The two figures with checkpointing are what block checkpointing keeps per call, LoRA, in the "
            "block table above (0.14 and 0.45). The GPU run that measures the denoiser's step is `--measure`: not "
            "run here (no GPU).", ""]
    common.write_report(args.output_dir, "memory_plan", "\n".join(body))
    if args.measure:
        measure_on_gpu(args, measured)


def measure_on_gpu(args, measured):
    """Peak CUDA memory above the weights of one denoiser forward and backward at the plan's shapes (LoRA-like)."""
    from torch.utils.checkpoint import checkpoint
    rows = []
    for family, m in measured.items():
        torch.cuda.empty_cache()
        with torch.device("cuda"):
            denoiser = build_denoiser(family).to(torch.bfloat16)
        set_trainable(denoiser, "lora")
        kwargs, key = denoiser_inputs(family, m["resolution"], "cuda")
        for checkpointing in (False, "call", "block"):
            if checkpointing == "block":  # diffusers' own, as enable_checkpointing turns it on
                denoiser.enable_gradient_checkpointing()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            call = (lambda: checkpoint(lambda **kw: denoiser(**kw)[0], use_reentrant=False, **kwargs)
                    if checkpointing == "call" else denoiser(**kwargs)[0])
            call().float().square().mean().backward()
            peak = torch.cuda.max_memory_allocated() - base
            denoiser.zero_grad(set_to_none=True)
            planned = m["act"]["lora"] + (m["call_input"] if checkpointing == "call" else 0)
            if checkpointing == "block":
                planned = m["block"]["lora"]["held"] + m["block"]["lora"]["peak"]
                denoiser.disable_gradient_checkpointing()
            rows.append([m["title"], checkpointing or "no", f"{peak / GIB:.2f}", f"{planned / GIB:.2f}"])
        del denoiser
    body = ["## Memory per GPU: one denoiser step measured", "", *common.header_lines(args, 0, "CUDA"), "",
            common.markdown_table(["model", "checkpointing granularity", "peak above weights GiB (incl. gradients)",
                                   "planned activations GiB"], rows), ""]
    common.write_report(args.output_dir, "memory_plan_gpu", "\n".join(body))


if __name__ == "__main__":
    main(parse_args())
