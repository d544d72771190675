"""benchmarks/memory_plan.py: the plan's numbers follow from its formulas (full fine-tuning: FSDP2's per-call
resharding over several processes, nothing sharded on one), its FSDP units are the ones drtune.py's shard_blocks
makes, the saved-tensor count is what autograd saves, block checkpointing's count is what diffusers' checkpointing
keeps (a hand count on a small FLUX, torch's own checkpoint on a small UNet) and plans below the call granularity,
the published SD1.5 architecture has its published size and the activation TRAPS.md measured, and --measure refuses
a CPU in one line."""
import pytest
import torch

from benchmarks import memory_plan

GIB = 2 ** 30
M = dict(denoiser=1_000_000_000, vae=80_000_000, text=120_000_000, unit=50_000_000, root=10_000_000,
         outer=20_000_000, act=dict(lora=2 * GIB, full=3 * GIB), decode=5 * GIB, call_input=1_000_000,
         lora_per_rank=1_000_000, block=dict(lora=dict(held=300_000_000, peak=100_000_000),
                                             full=dict(held=400_000_000, peak=150_000_000)),
         decode_block=dict(held=700_000_000, peak=1_500_000_000))
STATES = ("denoiser", "autocast", "gradients", "trainable", "reference")


def states(parts):
    return sum(parts[k] for k in STATES)


def test_full_fine_tuning_shards_everything_per_call():
    P = M["denoiser"]
    full = memory_plan.plan(M, "drtune", "sd15", "full", False, 128, 5)
    assert memory_plan.FSDP_WORLD == 8
    assert full["trainable"] == P * 16 / 8  # fp32 master weights, their gradient shards, Adam m and v: 1/8 each
    assert full["autocast"] == 0 and full["reference"] == 0  # the gathered weights are bf16: no autocast cache
    # gathered in bf16: the root's unit, the units enclosing the computing one and two of the largest unit; far below
    # one whole copy of the weights
    assert full["denoiser"] == (M["root"] + M["outer"] + 2 * M["unit"]) * 2 < P * 2
    # in flight: a unit's bf16 gradients and fp32 reduce-scatter input, the enclosing units' and the root's bf16
    # gradients; no whole gradient
    assert full["gradients"] == M["unit"] * (2 + 4) + (M["outer"] + M["root"]) * 2 < P * 4
    # the sharded part shrinks 1/N; what is gathered or in flight is per unit and does not
    ref = [memory_plan.plan(M, "dpo", "sd15", "full", False, 64, 2, world=w) for w in (2, 4, 16)]
    assert ref[0]["trainable"] == 2 * ref[1]["trainable"] == 8 * ref[2]["trainable"]
    assert ref[0]["denoiser"] == ref[2]["denoiser"] and ref[0]["gradients"] == ref[2]["gradients"]
    # the reference copy (DPO, SPO, GRPO with --beta > 0): bf16, sharded as well, its root's unit gathered
    assert ref[0]["reference"] - ref[2]["reference"] == pytest.approx(P * 2 * (1 / 2 - 1 / 16))
    assert memory_plan.plan(M, "dpo", "sd15", "full", False, 64, 2)["reference"] == P * 2 / 8 + M["root"] * 2
    assert memory_plan.plan(M, "grpo", "sd15", "full", False, 4, 1, reference=False)["reference"] == 0
    assert memory_plan.plan(M, "grpo", "sd35", "full", False, 32, 1, reference=True)["reference"] > 0
    # more processes, less memory per process
    totals = [sum(memory_plan.plan(M, "spo", "sd15", "full", True, 4, 1, world=w).values()) for w in (1, 2, 8, 64)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4


def test_one_process_shards_nothing_and_autocast_caches_bf16_casts():
    P = M["denoiser"]
    one = memory_plan.plan(M, "dpo", "sd15", "full", False, 64, 2, world=1)
    # fp32 weights (the master weights), fp32 gradients, AdamW's m and v: 16 bytes per parameter, whole
    assert one["denoiser"] + one["gradients"] + one["trainable"] == P * 16
    assert one["autocast"] == P * 2  # the forwards run under autocast from fp32 weights: a bf16 cast of each
    assert one["reference"] == P * 2  # a whole bf16 reference copy
    assert memory_plan.plan(M, "drtune", "sd15", "full", False, 128, 5, world=1)["reference"] == 0
    # neither the units nor the shard size matter on one process
    other = dict(M, unit=1, root=1, outer=1)
    assert states(memory_plan.plan(other, "dpo", "sd15", "full", False, 64, 2, world=1)) == states(one) == P * 20
    # the activations do not depend on how the weights are laid out
    assert one["activations"] == memory_plan.plan(M, "dpo", "sd15", "full", False, 64, 2)["activations"]


def test_lora_keeps_frozen_bf16_weights_and_trains_the_adapter():
    lora = memory_plan.plan(M, "drtune", "sd15", "lora", False, 128, 5)
    assert lora["trainable"] == M["lora_per_rank"] * 128 * 16 and lora["denoiser"] == M["denoiser"] * 2
    assert lora["autocast"] == lora["gradients"] == 0
    assert memory_plan.plan(M, "dpo", "sd15", "lora", False, 64, 2)["reference"] == 0  # the adapter-off model
    # LoRA is not sharded: the number of processes does not change it
    assert memory_plan.plan(M, "drtune", "sd15", "lora", False, 128, 5, world=2) == lora


def test_fsdp_units_are_the_ones_shard_blocks_makes(monkeypatch):
    """fsdp_units against drtune.shard_blocks itself (fully_shard recorded, not run: no process group needed): the
    modules it wraps (innermost first, nested ones included, then the root), each unit counted by its own parameters
    (those of the units wrapped inside it left out), the most the units enclosing one unit hold, and the root's."""
    import torch.distributed.fsdp

    import drtune
    wrapped = []
    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", lambda module, **kwargs: wrapped.append(module))

    def block(width, layers):  # a UNet block: a resnet-like Linear around an attention with its transformer_blocks
        b = torch.nn.Module()
        b.resnet = torch.nn.Linear(width, width)
        b.attentions = torch.nn.ModuleList([torch.nn.Module()])
        b.attentions[0].proj_in = torch.nn.Linear(width, 2)
        b.attentions[0].transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(layers)])
        return b

    model = torch.nn.Module()
    model.conv_in = torch.nn.Linear(3, 5)
    model.down_blocks = torch.nn.ModuleList([torch.nn.Linear(5, 5), block(9, 3)])
    model.mid_block = block(4, 1)
    model.up_blocks = torch.nn.ModuleList([block(20, 2)])
    model.layers = torch.nn.ModuleList([torch.nn.Linear(20, 30)])  # not a "blocks" list: the root's
    model.proj_out = torch.nn.Linear(30, 3)
    drtune.shard_blocks(model)
    assert wrapped[-1] is model and len(wrapped) == 4 + 3 + 1 + 2 + 1  # four blocks, six transformer blocks, the root
    for i, module in enumerate(wrapped):  # innermost first: no module is wrapped after one that contains it
        assert not any(module in set(earlier.modules()) for earlier in wrapped[:i])
    inner = lambda m: [u for u in wrapped[:-1] if u is not m and u in set(m.modules())]  # noqa: E731
    covered = lambda m: {id(p) for u in inner(m) for p in u.parameters()}  # noqa: E731
    own = {id(m): sum(p.numel() for p in m.parameters() if id(p) not in covered(m)) for m in wrapped}
    enclosing = [sum(own[id(o)] for o in wrapped[:-1] if o is not m and m in set(o.modules())) for m in wrapped[:-1]]
    units = memory_plan.fsdp_units(model)
    assert units["unit"] == max(own[id(m)] for m in wrapped[:-1]) == 20 * 20 + 20 + 20 * 2 + 2  # up block's own
    assert units["outer"] == max(enclosing) == 20 * 20 + 20 + 20 * 2 + 2
    assert units["root"] == own[id(model)] == 3 * 5 + 5 + 20 * 30 + 30 + 30 * 3 + 3
    assert sum(own.values()) == memory_plan.count(model)  # every parameter in exactly one unit


def test_reference_copy_follows_the_scripts():
    assert memory_plan.script_settings("dpo", "sdxl")[2] and memory_plan.script_settings("spo", "sd15")[2]
    assert not memory_plan.script_settings("drtune", "sdxl")[2]
    assert memory_plan.script_settings("grpo", "sd35")[2]  # sd35-flow-grpo: beta 0.01
    assert not memory_plan.script_settings("grpo", "flux")[2]  # --beta 0: no KL, no copy


def test_activations_add_up_without_checkpointing_and_not_with_it():
    # SD1.5 trains through CFG: each trained call has twice the batch
    off = memory_plan.plan(M, "drtune", "sd15", "lora", False, 128, 5)["activations"]
    on = memory_plan.plan(M, "drtune", "sd15", "lora", True, 128, 5)["activations"]
    assert off == 5 * 2 * M["act"]["lora"] + M["decode"]
    assert on == max(2 * M["act"]["lora"], M["decode"]) + 5 * 2 * M["call_input"]
    # FLUX has no CFG; DPO neither decodes nor uses CFG
    assert memory_plan.plan(M, "refl", "flux", "full", False, 128, 1)["activations"] == M["act"]["full"] + M["decode"]
    assert memory_plan.plan(M, "dpo", "sd15", "full", False, 64, 2)["activations"] == 2 * M["act"]["full"]
    assert memory_plan.fits(23e9) == "yes yes yes" and memory_plan.fits(50e9) == "no no yes"


def test_granularities_follow_what_each_checkpoint_keeps():
    """call: the inputs plus one whole recomputation; block: every call's held part plus one block's recomputation
    (the decode's first); both: the inputs plus one recomputation that itself runs block by block."""
    act = lambda script, family, finetune, c, calls: memory_plan.plan(  # noqa: E731
        M, script, family, finetune, c, 4, calls)["activations"]
    held, peak = M["block"]["lora"]["held"], M["block"]["lora"]["peak"]
    d_held, d_peak = M["decode_block"]["held"], M["decode_block"]["peak"]
    # SD1.5 DRTune: CFG doubles each call; it decodes with gradient
    assert act("drtune", "sd15", "lora", "call", 5) == act("drtune", "sd15", "lora", True, 5)  # the default
    assert act("drtune", "sd15", "lora", "block", 5) == 5 * 2 * held + max(d_held + d_peak, 2 * peak)
    assert act("drtune", "sd15", "lora", "both", 5) == max(2 * (held + peak), d_held + d_peak) + 5 * 2 * M["call_input"]
    # GRPO on FLUX: no CFG, no decode; full fine-tuning's own counts
    full = M["block"]["full"]
    assert act("grpo", "flux", "full", "block", 1) == full["held"] + full["peak"]
    assert act("grpo", "flux", "full", "both", 1) == full["held"] + full["peak"] + M["call_input"]
    with pytest.raises(ValueError):
        act("grpo", "flux", "full", "layer", 1)
    # the lowest: block for one trained call without a decode, both for a chain of calls
    lowest = lambda script, calls: memory_plan.lowest({  # noqa: E731
        g: memory_plan.plan(M, script, "flux", "full", g, 4, calls) for g in memory_plan.GRANULARITIES})
    assert lowest("grpo", 1) == "block" and lowest("drtune", 5) == "both" and lowest("dpo", 2) == "both"
    # a tie goes to the least recomputation
    tie = dict(M, block=dict(full=dict(held=M["act"]["full"] - M["call_input"], peak=M["call_input"])),
               call_input=0)
    assert memory_plan.lowest({g: memory_plan.plan(tie, "grpo", "flux", "full", g, 4, 1)
                               for g in memory_plan.GRANULARITIES}) == "call"


TINY_FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=3, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4))


def tiny_flux_call(image_tokens=16, text_tokens=5):
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        model = FluxTransformer2DModel(**TINY_FLUX).to(torch.bfloat16)
        kwargs = dict(hidden_states=torch.empty(1, image_tokens, 4, dtype=torch.bfloat16),
                      encoder_hidden_states=torch.empty(1, text_tokens, 16, dtype=torch.bfloat16),
                      pooled_projections=torch.empty(1, 8, dtype=torch.bfloat16), timestep=torch.full((1,), 0.5),
                      img_ids=torch.zeros(image_tokens, 3), txt_ids=torch.zeros(text_tokens, 3),
                      guidance=torch.full((1,), 3.5))
    return model, kwargs


def test_block_inputs_match_a_hand_count_on_a_small_flux():
    """Each of FLUX's 2 + 3 checkpointed blocks gets its own image and text states (bf16, width 2 heads x 8 = 16);
    every block the same temb (1, 16) and rotary embedding (cos and sin, fp32, tokens x head dim 8): counted once."""
    model, kwargs = tiny_flux_call()
    image, text, width = 16, 5, 16
    for mode in ("lora", "full"):
        memory_plan.set_trainable(model, mode)
        counted = memory_plan.block_checkpointing_bytes(model, lambda: model(**kwargs))
        assert counted["blocks"] == 2 + 3
        assert counted["inputs"] == 5 * (image + text) * width * 2 + width * 2 + 2 * (image + text) * 8 * 4
        assert counted["outside"] < counted["held"] <= counted["outside"] + counted["inputs"]
        everything = memory_plan.saved_bytes(model, lambda: model(**kwargs))
        assert 0 < counted["peak"] < everything and counted["held"] < everything
    assert not model.gradient_checkpointing  # turned off again
    # more image tokens, more kept: the states grow with the tokens, the shared temb does not
    bigger = memory_plan.block_checkpointing_bytes(*(lambda m, k: (m, lambda: m(**k)))(*tiny_flux_call(64)))
    assert bigger["inputs"] - counted["inputs"] == (64 - 16) * (5 * width * 2 + 2 * 8 * 4)


def test_block_count_is_what_torch_checkpoint_keeps():
    """The same call under diffusers' own checkpointing (torch.utils.checkpoint, non-reentrant): what it saves
    outside the blocks plus the block inputs its frames save (top-level tensor arguments) is the count's held part;
    FLUX's rotary embedding travels in a tuple, which the frame keeps by reference, not as a saved tensor."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(8, 16), cross_attention_dim=12, attention_head_dim=4,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=4,
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).to(torch.bfloat16)
        unet_kwargs = dict(sample=torch.empty(1, 4, 8, 8, dtype=torch.bfloat16), timestep=torch.tensor([500.0]),
                           encoder_hidden_states=torch.empty(1, 7, 12, dtype=torch.bfloat16))
    flux, flux_kwargs = tiny_flux_call()
    rotary = 2 * (16 + 5) * 8 * 4
    for model, kwargs, outside_tuples in ((unet, unet_kwargs, 0), (flux, flux_kwargs, rotary)):
        for mode in ("lora", "full"):
            memory_plan.set_trainable(model, mode)
            counted = memory_plan.block_checkpointing_bytes(model, lambda: model(**kwargs))
            model.enable_gradient_checkpointing()
            torch_saved = memory_plan.saved_bytes(model, lambda: model(**kwargs))
            model.disable_gradient_checkpointing()
            assert torch_saved == counted["held"] - outside_tuples
    # the UNet's checkpointed blocks: 2 + 1 + 4 resnets (the mid block runs its first one plainly) and the 4
    # transformer blocks inside the cross-attention blocks
    assert counted["blocks"] == 5 and memory_plan.block_checkpointing_bytes(
        unet, lambda: unet(**unet_kwargs))["blocks"] == 2 + 1 + 4 + 4


def test_saved_tensor_count_is_what_autograd_saves():
    x = torch.randn(3, 5, requires_grad=True)
    linear = torch.nn.Linear(5, 7)
    linear.requires_grad_(False)
    with memory_plan.counting_saved_tensors() as saved:
        torch.nn.functional.silu(x)  # saves its input
        linear(x)  # a frozen weight: the input is not saved for a weight gradient, the weight is left out
    assert sum(saved.values()) == x.numel() * 4
    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    with memory_plan.counting_saved_tensors() as saved:
        torch.nn.functional.scaled_dot_product_attention(q, q * 1, q * 1)
    assert sum(saved.values()) == 4 * q.numel() * 4 + 2 * 6 * 4  # q, k, v, out and a float32 log-sum-exp per query


def test_lora_parameters_are_rank_times_in_plus_out_of_the_targets():
    model = torch.nn.Module()
    model.attn = torch.nn.Module()
    model.attn.to_q, model.attn.to_k, model.ff = torch.nn.Linear(8, 16), torch.nn.Linear(8, 4), torch.nn.Linear(8, 8)
    assert memory_plan.lora_params(model, 4) == 4 * (8 + 16) + 4 * (8 + 4)


@pytest.fixture(scope="module")
def sd15():
    return memory_plan.measure_family("sd15")


def test_sd15_has_its_published_size_and_measured_activations(sd15):
    m = sd15
    assert 859.4e6 < m["denoiser"] < 859.6e6 and 83.6e6 < m["vae"] < 83.8e6
    # the largest unit is a UNet block's own weights (its transformer blocks are units of their own); the root
    # (conv_in, time embedding, conv_out) small
    assert 100e6 < m["unit"] < m["denoiser"] / 4 and 0 < m["root"] < 10e6 and m["outer"] >= m["unit"]
    assert 0.7 < m["act"]["lora"] / GIB < 1.1 and m["act"]["lora"] < m["act"]["full"]  # TRAPS.md: 0.97 GiB (LoRA)
    assert 2.6 < m["decode"] / GIB < 3.0  # TRAPS.md: 2.8 GiB at 512 px


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_measure_refuses_a_cpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_plan.parse_args(["--measure"])
    assert "--measure needs a GPU" in str(exit_info.value)


def test_block_granularity_keeps_less_than_a_call_and_grows_with_the_calls(sd15):
    """SD1.5 at 512 px: a call under block checkpointing keeps far less than its whole activations (TRAPS.md: 0.14 GiB
    with checkpointing, LoRA) and one block's recomputation less still; the step's peak grows with the trained calls
    by the held part per call (block) or the input per call (both), and both stays below call."""
    for mode in ("lora", "full"):
        block = sd15["block"][mode]
        assert 0 < block["peak"] < block["held"] + block["peak"] < sd15["act"][mode]
        assert block["held"] < sd15["act"][mode] / 4 and block["blocks"] == 37  # 21 resnets, 16 transformer blocks
    assert 0.12 < sd15["block"]["lora"]["held"] / GIB < 0.16
    assert 0 < sd15["decode_block"]["held"] + sd15["decode_block"]["peak"] < sd15["decode"]
    for finetune in ("lora", "full"):
        per = {g: [memory_plan.plan(sd15, "drtune", "sd15", finetune, g, 128, k)["activations"] for k in (1, 2, 5)]
               for g in ("call", "block", "both")}
        held = sd15["block"]["lora" if finetune == "lora" else "full"]["held"]
        assert per["block"][1] - per["block"][0] == 2 * held  # CFG: one call at twice the batch
        assert per["both"][1] - per["both"][0] == per["call"][1] - per["call"][0] == 2 * sd15["call_input"]
        assert all(0 < b < c for b, c in zip(per["both"], per["call"]))
        assert per["block"] == sorted(per["block"]) and per["block"][2] > per["block"][0]
        # one call without a decode (GRPO): block keeps less than the call's whole activations
        one = {g: memory_plan.plan(sd15, "grpo", "sd15", finetune, g, 4, 1)["activations"] for g in ("call", "block")}
        assert 0 < one["block"] < one["call"] / 3
