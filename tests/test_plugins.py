"""Plug-in rewards (--reward path/to/file.py:function or package.module:function) in every script, their one-line
errors, and the tiny world's pixel checker as a reward."""
import os
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_SD, read_metrics, tiny_argv

import alignprop
import dpo
import draft
import drtune
import grpo
import refl
import rewards
import spo

sys.path.insert(0, os.path.join(ROOT, "tiny_models"))
import world  # noqa: E402

BRIGHTNESS = '''import torch


def brightness(images, prompts):
    """Mean pixel value, with its gradient."""
    return images.mean(dim=(1, 2, 3))


brightness.differentiable = True


def darkness(images, prompts):
    """No gradient: numpy."""
    return (1 - images.detach().cpu().numpy().mean(axis=(1, 2, 3))).tolist()


def wrong_shape(images, prompts):
    return torch.zeros(len(images), 2)


def broken(images, prompts):
    raise KeyError("no such prompt")


def says_differentiable(images, prompts):
    return torch.zeros(len(images))


says_differentiable.differentiable = True


def words(images, prompts):
    return "good"


NOT_A_FUNCTION = 3
'''

VALID = {drtune: dict(num_trained_steps=2, early_stop_max=2), refl: dict(stop_range=2), draft: dict(draft_k=2),
         alignprop: {}, dpo: dict(online=True, images_per_prompt=2, prompts_per_round=2),
         spo: dict(num_inference_steps=6, warm_steps=2, pair_threshold=0.0),
         grpo: dict(group_size=2, sampler="ddim", eta=1.0)}
GRADIENT = [drtune, refl, draft, alignprop]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """my_rewards.py in a folder that is also on sys.path (for the package.module:function form)."""
    (tmp_path / "my_rewards.py").write_text(BRIGHTNESS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def test_parse_spec_reads_plug_ins_beside_names():
    assert rewards.parse_spec("symmetry:1,my_rewards.py:brightness:0.5,pkg.mod:fn") == [
        ("symmetry", 1.0), ("my_rewards.py:brightness", 0.5), ("pkg.mod:fn", 1.0)]
    assert rewards.parse_spec("dir/sub/r.py:score") == [("dir/sub/r.py:score", 1.0)]
    with pytest.raises(ValueError, match="unknown reward 'symetry'.*path/to/file.py:function"):
        rewards.parse_spec("symetry:1")


@pytest.mark.parametrize("module", list(VALID), ids=lambda m: m.__name__)
def test_every_script_trains_on_a_plug_in(module, plugin):
    """A differentiable plug-in (file form) for the gradient methods, a numpy one (module form, in a weighted sum)
    for the others: two steps, the reward logged under its reference."""
    spec = ("my_rewards.py:brightness" if module in GRADIENT else "symmetry:0.5,my_rewards:darkness:2")
    out = str(plugin / "run")
    module.main(module.parse_args(tiny_argv(TINY_SD, out, **dict(VALID[module], reward=spec, max_train_steps=2))))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["eval_reward"] is not None
    key = "raw_my_rewards.py:brightness" if module in GRADIENT else "raw_my_rewards:darkness"
    if module is not dpo:  # online DPO logs the pair margin, not the raw rewards
        assert key in rows[-1], rows[-1]


def one_line(module, argv, capsys, monkeypatch):
    monkeypatch.setattr(module, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    code = module.cli(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{module.__name__}.py: error: --reward"), lines
    return lines[0]


@pytest.mark.parametrize("module", GRADIENT, ids=lambda m: m.__name__)
def test_gradient_methods_refuse_a_plug_in_without_gradient(module, plugin, capsys, monkeypatch):
    line = one_line(module, tiny_argv(TINY_SD, str(plugin / "o"), **dict(VALID[module], reward="my_rewards:darkness")),
                    capsys, monkeypatch)
    assert "my_rewards:darkness is not differentiable" in line and "function.differentiable = True" in line


@pytest.mark.parametrize("spec,message", [
    ("missing.py:score", "no such file 'missing.py'"),
    ("my_rewards.py:nothing", "has no function 'nothing' (it has brightness, broken, darkness"),
    ("my_rewards.py:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
    ("no_such_package.rewards:score", "cannot import module 'no_such_package.rewards'"),
    ("my_rewards.py:broken", "failed on 2 random 32x32 images: KeyError: 'no such prompt'"),
    ("my_rewards.py:wrong_shape", "returned shape (2, 2) for 2 images"),
    ("my_rewards.py:words", "returned str, not one number per image"),
    ("my_rewards.py:says_differentiable", "sets differentiable = True but its scores carry no gradient"),
    ("symmetry,my_rewards.py:darkness:x", "bad weight 'x'"),
])
@pytest.mark.parametrize("module", [drtune, grpo], ids=lambda m: m.__name__)
def test_bad_plug_ins_are_one_line_before_any_model(module, spec, message, plugin, capsys, monkeypatch):
    line = one_line(module, tiny_argv(TINY_SD, str(plugin / "o"), **dict(VALID[module], reward=spec)), capsys,
                    monkeypatch)
    assert message in line, line


def test_a_plug_in_file_that_fails_to_import_is_one_line(plugin, capsys, monkeypatch):
    (plugin / "bad.py").write_text("import not_installed_anywhere\n")
    line = one_line(grpo, tiny_argv(TINY_SD, str(plugin / "o"), **dict(VALID[grpo], reward="bad.py:score")), capsys,
                    monkeypatch)
    assert "importing bad.py failed: ModuleNotFoundError" in line


def test_world_reward_reads_the_fields_a_caption_asks_for():
    """The world's own scenes score (nearly) 1, an empty canvas of the right background scores only that field,
    and moving the two shapes to the wrong sides costs exactly the two position fields."""
    seeds = [s for s in range(400) if len(world.sample_scene(s)["shapes"]) == 2
             and world.sample_scene(s)["shapes"][0]["position"] is not None][:12]
    scenes = [world.sample_scene(s) for s in seeds]
    captions = [world.caption(s) for s in scenes]
    images = torch.tensor(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    scores = torch.as_tensor(world.reward(images, captions))
    assert scores.shape == (12,) and scores.mean() > 0.9
    for scene in scenes:  # mirror the positions: left <-> right, top <-> bottom
        for shape in scene["shapes"]:
            shape["x"], shape["y"] = 1 - shape["x"], 1 - shape["y"]
    swapped = torch.tensor(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    fields = [world.fields(im, c) for im, c in zip((swapped * 255).byte().permute(0, 2, 3, 1).numpy(), captions)]
    assert all(not f["position_0"] and not f["position_1"] for f in fields)
    assert (torch.as_tensor(world.reward(swapped, captions)) < scores).all()
    background = world.parse(captions[0])["background"]
    blank = torch.tensor(world.COLORS[background]).float().view(1, 3, 1, 1).expand(1, 3, 32, 32) / 255
    assert world.reward(blank, captions[:1])[0] == pytest.approx(1 / 7)
    assert not getattr(world.reward, "differentiable", False)
