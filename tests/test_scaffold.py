"""The scaffold shared by the algorithm scripts is duplicated on purpose and must stay identical (the role of
diffusers' "Copied from" check): every function, class and constant of drtune.py's scaffold region, the
command-line arguments it defines, and the __main__ block. Each script imports nothing from this repo but
rewards.py."""
import ast
import os

import pytest
from conftest import ROOT

SCRIPTS = ["drtune.py", "refl.py", "draft.py", "alignprop.py", "dpo.py", "spo.py", "grpo.py"]
# scripts whose whole scaffold region is the same text; dpo.py, spo.py and grpo.py train differently: they write their
# own main() and keep identical every other scaffold piece they use
FULL_SCAFFOLD = ["drtune.py", "refl.py", "draft.py", "alignprop.py"]
BEGIN = "# Scaffold: identical in every algorithm script"
END = "# Algorithm:"
REPO_MODULES = {name.removesuffix(".py") for name in os.listdir(ROOT) if name.endswith(".py")} - {"rewards"}


def source(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def scaffold_region(text):
    start = text.index(BEGIN)
    return text[start:text.index(END, start)]


def top_level(text):
    """name -> source of each top-level def, class and assignment, plus the __main__ block."""
    tree = ast.parse(text)
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            out["__main__"] = ast.get_source_segment(text, node)
    return out


PRESENT = [s for s in SCRIPTS if os.path.exists(os.path.join(ROOT, s))]


@pytest.mark.parametrize("name", [s for s in PRESENT if s != "drtune.py"])
def test_scaffold_is_identical(name):
    reference, other = source("drtune.py"), source(name)
    shared = top_level(scaffold_region(reference))
    assert shared, "no scaffold found in drtune.py"
    theirs = top_level(other)
    if name in FULL_SCAFFOLD:
        assert scaffold_region(other) == scaffold_region(reference), f"{name}: scaffold region differs from drtune.py"
        assert theirs["__main__"] == top_level(reference)["__main__"]
    for key, code in shared.items():
        if key in theirs and (key != "main" or name in FULL_SCAFFOLD):
            assert theirs[key] == code, f"{name}: {key} differs from drtune.py's scaffold"


@pytest.mark.parametrize("name", [s for s in PRESENT if s != "drtune.py"])
def test_world_demo_settings_are_identical(name):
    """Every --preset demo starts from the same trained tiny world (the constants above each script's presets)."""
    reference, other = top_level(source("drtune.py")), top_level(source(name))
    for key in ("HERE", "WORLD", "WORLD_DEMO", "WORLD_DEMO_SD3"):
        assert other[key] == reference[key], f"{name}: {key} differs from drtune.py"
    import importlib
    assert importlib.import_module(name.removesuffix(".py")).PRESETS["demo"]["pretrained_model_name_or_path"].endswith(
        os.path.join("tiny_models", "world-sd15"))


def test_evaluate_copies_the_scaffold_pieces_it_shares():
    """evaluate.py needs only rewards.py too: the scaffold pieces it copies (prompt sets, errors, loading checks)
    stay identical; it writes its own parser, checks and main."""
    shared = top_level(scaffold_region(source("drtune.py")))
    theirs = top_level(source("evaluate.py"))
    copied = [key for key in shared if key in theirs and key not in ("build_parser", "check_arguments", "main", "cli")]
    assert "read_prompt_set" in copied
    for key in copied:
        assert theirs[key] == shared[key], f"evaluate.py: {key} differs from drtune.py's scaffold"


@pytest.mark.parametrize("name", PRESENT)
def test_scripts_import_only_rewards_from_this_repo(name):
    imported = set()
    for node in ast.walk(ast.parse(source(name))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & REPO_MODULES, f"{name} imports {imported & REPO_MODULES}"
    assert "rewards" in imported


def test_common_arguments_are_the_specs():
    """The flags SPEC.md's common contract names, in the diffusers examples' vocabulary."""
    import drtune
    flags = {a.dest for a in drtune.build_parser()._actions}
    for flag in ("pretrained_model_name_or_path", "revision", "variant", "output_dir", "seed", "resolution",
                 "train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_grad_norm",
                 "max_train_steps", "rank", "mixed_precision", "gradient_checkpointing", "checkpointing_steps",
                 "checkpoints_total_limit", "resume_from_checkpoint", "report_to", "validation_steps",
                 "num_inference_steps", "guidance_scale", "reward", "train_prompts", "eval_prompts", "preset"):
        assert flag in flags, flag
