"""benchmarks/memory_plan.py: the plan's numbers follow from its formulas, the saved-tensor count is what autograd
saves, the published SD1.5 architecture has its published size and the activation TRAPS.md measured, and --measure
refuses a CPU in one line."""
import pytest
import torch

from benchmarks import memory_plan

GIB = 2 ** 30
M = dict(denoiser=1_000_000_000, vae=80_000_000, text=120_000_000, unit=50_000_000, act=dict(lora=2 * GIB, full=3 * GIB),
         decode=5 * GIB, call_input=1_000_000, lora_per_rank=1_000_000)


def test_full_fine_tuning_as_implemented_shards_only_master_and_adam():
    P = M["denoiser"]
    full = memory_plan.plan(M, "drtune", "sd15", "full", False, 128, 5)
    # whole on every process: gathered fp32 weights, autocast's bf16 casts of them, fp32 gradients
    assert full["denoiser"] == P * 4 and full["autocast"] == P * 2 and full["gradients"] == P * 4
    assert full["trainable"] == P * 12 / 8  # the fp32 master shard and AdamW's m and v, 1/8 each
    assert full["reference"] == 0
    # the sharded part shrinks 1/N, the whole part does not
    for world in (2, 4, 16):
        other = memory_plan.plan(M, "drtune", "sd15", "full", False, 128, 5, world=world)
        assert other["trainable"] == P * 12 / world
        assert [other[k] for k in ("denoiser", "autocast", "gradients")] == [P * 4, P * 2, P * 4]
    one = memory_plan.plan(M, "drtune", "sd15", "full", False, 128, 5, world=1)
    assert one["denoiser"] + one["gradients"] + one["trainable"] == P * 16  # one process: the weights are the master
    # the reference copy of DPO, SPO and GRPO with --beta > 0: whole, bf16, not sharded
    assert memory_plan.plan(M, "dpo", "sd15", "full", False, 64, 2)["reference"] == P * 2
    assert memory_plan.plan(M, "dpo", "sd15", "full", False, 64, 2, world=16)["reference"] == P * 2
    assert memory_plan.plan(M, "grpo", "sd15", "full", False, 4, 1, reference=False)["reference"] == 0
    assert memory_plan.plan(M, "grpo", "sd35", "full", False, 32, 1, reference=True)["reference"] == P * 2
    lora = memory_plan.plan(M, "drtune", "sd15", "lora", False, 128, 5)
    assert lora["trainable"] == M["lora_per_rank"] * 128 * 16 and lora["denoiser"] == M["denoiser"] * 2
    assert lora["autocast"] == lora["gradients"] == 0
    assert memory_plan.plan(M, "dpo", "sd15", "lora", False, 64, 2)["reference"] == 0  # the adapter-off model


def test_per_call_resharding_for_comparison_shards_everything():
    P = M["denoiser"]
    full = memory_plan.plan(M, "drtune", "sd15", "full", False, 128, 5, layout="resharded")
    assert full["trainable"] == P * 16 / 8  # fp32 weights, gradients, Adam m and v: 16 bytes, 1/8 each
    assert full["denoiser"] == 2 * M["unit"] * 2 and full["autocast"] == full["gradients"] == 0  # two bf16 units
    assert memory_plan.plan(M, "grpo", "sd15", "full", False, 32, 1, True, layout="resharded")["reference"] == P * 2 / 8
    built = sum(memory_plan.plan(M, "dpo", "sd15", "full", True, 64, 2).values())
    assert sum(memory_plan.plan(M, "dpo", "sd15", "full", True, 64, 2, layout="resharded").values()) < built


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


def test_sd15_has_its_published_size_and_measured_activations():
    m = memory_plan.measure_family("sd15")
    assert 859.4e6 < m["denoiser"] < 859.6e6 and 83.6e6 < m["vae"] < 83.8e6
    assert 0.7 < m["act"]["lora"] / GIB < 1.1 and m["act"]["lora"] < m["act"]["full"]  # TRAPS.md: 0.97 GiB (LoRA)
    assert 2.6 < m["decode"] / GIB < 3.0  # TRAPS.md: 2.8 GiB at 512 px


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_measure_refuses_a_cpu(capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_plan.parse_args(["--measure"])
    assert "--measure needs a GPU" in str(exit_info.value)
