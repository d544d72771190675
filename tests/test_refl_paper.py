"""ReFL as its paper has it: ImageReward as refl-official's reward, on the tiny pipeline and a tiny ImageReward."""
import pytest
import torch
from conftest import TINY_SD, tiny_argv

import refl
import tiny_rewards

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def setup(model=TINY_SD, **flags):
    args = refl.parse_args(tiny_argv(model, "unused", **flags))
    info = refl.check_arguments(args)
    models = refl.load_models(args, info, CPU, torch.float32)
    refl.add_lora(models.unet, args)
    return args, models, refl.make_scheduler(args)


# --- ImageReward, the reward ReFL was built for ------------------------------------------------------------

def test_refl_official_uses_imagereward():
    assert refl.parse_args(["--preset", "refl-official"]).reward == "imagereward"
    assert refl.parse_args(["--preset", "paper"]).reward == "hpsv21"  # the DRTune paper's unified setting


def test_refl_step_with_imagereward(tmp_path):
    """One ReFL trajectory scored by a tiny ImageReward: the official relu(2 - r) loss, gradient to the LoRA."""
    checkpoint, tokenizer = tiny_rewards.build_imagereward(tmp_path)
    args, models, scheduler = setup(stop_range=2, loss="relu", relu_margin=2.0, loss_scale=1e-3)
    reward_fn = refl.rewards.build_reward("imagereward", imagereward_checkpoint=str(checkpoint),
                                          imagereward_tokenizer=str(tokenizer))
    loss, reward, _ = refl.algorithm_loss(models, scheduler, models.unet, reward_fn, ["a cat", "a red bicycle"],
                                          torch.Generator().manual_seed(0), args)
    torch.testing.assert_close(loss, torch.relu(2 - reward).mean() * 1e-3)
    models.unet.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.unet.parameters() if p.requires_grad)
