"""A model folder whose weights are incomplete (a component's weights, its config, the asked --variant's files, a
shard of a sharded model), in a local folder or an offline hub cache, is one line naming the flag and the fix before
any model loads, in every script and in evaluate.py; so is an evaluate.py --output_dir that cannot be created. The
complete layouts from_pretrained reads (a variant, sharded, pickled .bin) pass the check and load."""
import os

import pytest
import torch
from conftest import TINY_SD, tiny_argv
from test_reliability import SCRIPTS, VALID, cli_error, no_models  # noqa: F401 (no_models is a fixture)

import drtune
import evaluate
import model_folders


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return model_folders.incomplete(tmp_path_factory.mktemp("models"))


def script_argv(module, model, output_dir, flags):
    return tiny_argv(model, str(output_dir), **dict(VALID[module], **flags))


CASES = ["unet weights", "variant", "variant of one component", "config", "shard", "index", "sdxl text_encoder_2",
         "sd3 text_encoder_3", "flux vae", "--pretrained_vae_model_name_or_path"]


@pytest.mark.parametrize("case", CASES)
def test_incomplete_model_folders_are_one_line_before_any_model(case, broken, tmp_path, capsys, no_models):
    model, flags, flag, message = broken[case]
    code, line = cli_error(drtune, script_argv(drtune, model, tmp_path / "out", flags), capsys)
    assert code == 2 and flag in line and message in line, line


@pytest.mark.parametrize("case", ["unet weights", "variant of one component"])
@pytest.mark.parametrize("module", SCRIPTS[1:], ids=lambda m: m.__name__)
def test_every_script_checks_the_model_files(module, case, broken, tmp_path, capsys, no_models):
    model, flags, flag, message = broken[case]
    code, line = cli_error(module, script_argv(module, model, tmp_path / "out", flags), capsys)
    assert code == 2 and flag in line and message in line, line


@pytest.mark.parametrize("layout", ["variant", "sharded", "bin"])
def test_complete_layouts_pass_the_check_and_load_the_same_weights(layout, tmp_path):
    model, flags = model_folders.complete(tmp_path)[layout]
    args = drtune.parse_args(script_argv(drtune, model, tmp_path / "out", flags))
    loaded = drtune.load_models(args, drtune.check_arguments(args), torch.device("cpu"), torch.float32)
    plain = drtune.parse_args(script_argv(drtune, TINY_SD, tmp_path / "plain", {}))
    reference = drtune.load_models(plain, drtune.check_arguments(plain), torch.device("cpu"), torch.float32)
    for name in ("unet", "vae"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    ours, theirs = loaded.text_encoders[0].state_dict(), reference.text_encoders[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An offline hub cache (HF_HUB_OFFLINE) that holds someone/tiny-sd15 without its UNet weights and
    someone/whole-sd15 complete."""
    from huggingface_hub import constants
    cache = model_folders.hub_cache(tmp_path / "hub", "someone/tiny-sd15")
    model_folders.hub_cache(cache, "someone/whole-sd15", remove=None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_with_weights_missing_from_an_offline_cache_is_one_line(offline_cache, tmp_path, capsys, no_models):
    code, line = cli_error(drtune, script_argv(drtune, "someone/tiny-sd15", tmp_path / "out", {}), capsys)
    assert code == 2 and "--pretrained_model_name_or_path someone/tiny-sd15: unet has no weights file" in line
    assert "HF_HUB_OFFLINE" in line and "hf download someone/tiny-sd15" in line
    args = drtune.parse_args(script_argv(drtune, "someone/whole-sd15", tmp_path / "out", {}))
    assert drtune.check_arguments(args)["family"] == "sd15"  # a complete snapshot in the cache passes


@pytest.mark.parametrize("module", [drtune, evaluate], ids=["drtune", "evaluate"])
def test_a_hub_id_the_cache_lacks_with_the_hub_unreachable_is_one_line(module, tmp_path, monkeypatch, capsys,
                                                                       no_models):
    """Online (HF_HUB_OFFLINE unset) with the network down: the cache holds someone/tiny-sd15's model_index.json but
    not its UNet weights, which from_pretrained would fetch. One line before any model loads, naming the fix; a
    complete snapshot in the cache needs no network and passes."""
    from huggingface_hub import constants
    cache = model_folders.hub_cache(tmp_path / "hub", "someone/tiny-sd15")
    model_folders.hub_cache(cache, "someone/whole-sd15", remove=None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: connection refused
    if module is drtune:
        code, line = cli_error(drtune, script_argv(drtune, "someone/tiny-sd15", tmp_path / "out", {}), capsys)
        args = drtune.parse_args(script_argv(drtune, "someone/whole-sd15", tmp_path / "out", {}))
        assert drtune.check_arguments(args)["family"] == "sd15"
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a red circle\n")
        code, line = eval_error(eval_argv("someone/tiny-sd15", tmp_path / "eval", prompts), capsys, monkeypatch)
    assert code == 2 and "--pretrained_model_name_or_path someone/tiny-sd15: the hub cache lacks" in line, line
    assert "the hub did not answer" in line and "HF_HUB_OFFLINE=1" in line


def eval_error(argv, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    code = evaluate.cli(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate.py: error: "), err
    return code, err


def eval_argv(model, output_dir, prompts, **flags):
    argv = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir), "--prompts", str(prompts),
            "--rewards", "symmetry", "--resolution", "32", "--num_inference_steps", "2"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


@pytest.mark.parametrize("case", ["unet weights", "variant", "variant of one component", "shard",
                                  "sd3 text_encoder_3", "flux vae", "--pretrained_vae_model_name_or_path"])
def test_evaluate_checks_the_model_files(case, broken, tmp_path, capsys, monkeypatch):
    model, flags, flag, message = broken[case]
    (tmp_path / "p.txt").write_text("a cat\n")
    if case == "variant":  # evaluate.py checks in model_index.json's order: the text encoder comes first
        message = "text_encoder/model.fp16.safetensors is missing"
    code, err = eval_error(eval_argv(model, tmp_path / "out", tmp_path / "p.txt", **flags), capsys, monkeypatch)
    assert code == 2 and flag in err and message in err


def test_evaluate_checks_the_pipelines_other_models(tmp_path, capsys, monkeypatch):
    """evaluate.py loads every model component the pipeline names, an image encoder too; tokenizers and schedulers
    have no weights to check."""
    import json
    import shutil
    model = model_folders.copy(tmp_path, "with-image-encoder")
    shutil.copytree(os.path.join(model, "text_encoder"), os.path.join(model, "image_encoder"))
    os.remove(os.path.join(model, "image_encoder", "model.safetensors"))
    with open(os.path.join(model, "model_index.json")) as f:
        index = json.load(f)
    with open(os.path.join(model, "model_index.json"), "w") as f:
        json.dump(dict(index, image_encoder=["transformers", "CLIPVisionModelWithProjection"]), f)
    (tmp_path / "p.txt").write_text("a cat\n")
    code, err = eval_error(eval_argv(model, tmp_path / "out", tmp_path / "p.txt"), capsys, monkeypatch)
    assert code == 2 and "image_encoder has no weights file" in err


def test_evaluate_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "file").write_text("x")
    for output_dir in (tmp_path / "file", tmp_path / "file" / "out"):
        code, err = eval_error(eval_argv(TINY_SD, output_dir, tmp_path / "p.txt"), capsys, monkeypatch)
        assert code == 2 and f"--output_dir {output_dir}" in err and "is a file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_evaluate_read_only_output_dir_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("a cat\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = eval_error(eval_argv(TINY_SD, locked / "out", tmp_path / "p.txt"), capsys, monkeypatch)
    finally:
        locked.chmod(0o755)
    assert code == 2 and "--output_dir" in err and "not writable" in err
