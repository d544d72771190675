"""The papers' prompt sets: JSON prompt files, the HPS v2 benchmark (400 prompts, 100 per style, drawn once for all)
and training prompts from a folder laid out like the hub dataset zhwang/HPDv2 (or from the hub itself, mocked here),
Pick-a-Pic v1's training and validation_unique prompts from a folder laid out like yuvalkirstain/pickapic_v1_no_images,
--prompt_template, the presets that use them, and --validation_lora_scale."""
import json

import pytest
import torch
from conftest import STYLES, TINY_SD, tiny_argv

import alignprop
import dpo
import draft
import drtune
import refl
import spo

K = dict(num_trained_steps=2, early_stop_max=2)  # drtune.py's K and m within the tiny runs' 4 steps


def test_benchmark_is_400_prompts_100_per_style_interleaved_and_fixed(hpdv2):
    prompts, styles = drtune.read_prompt_set(f"hpsv2-benchmark:{hpdv2}")
    assert len(prompts) == 400 and all(styles.count(s) == 100 for s in STYLES)
    assert styles[:8] == list(STYLES) * 2  # round robin: any prefix (the training grid) covers the styles evenly
    for style in STYLES:
        mine = [int(p.split()[-1]) for p, s in zip(prompts, styles) if s == style]
        assert all(p.startswith(style) for p, s in zip(prompts, styles) if s == style)
        assert mine == sorted(set(mine)) and mine != list(range(100))  # file order, a draw rather than the head
    assert drtune.read_prompt_set(f"hpsv2-benchmark:{hpdv2}") == (prompts, styles)  # the same draw every time
    draws = {style: {p for p, s in zip(prompts, styles) if s == style} for style in STYLES}
    assert len({frozenset(int(p.split()[-1]) for p in d) for d in draws.values()}) == 4  # each style its own draw


def test_training_prompts_each_once_in_first_seen_order(hpdv2):
    assert drtune.read_prompt_set(f"hpsv2-train:{hpdv2}") == (["a cat", "a dog", "a red car"], None)
    assert drtune.read_prompts(str(hpdv2 / "train.json"), []) == ["a cat", "a dog", "a red car"]  # the file itself


def test_json_prompt_files_and_folders(hpdv2, tmp_path):
    assert drtune.read_prompts(str(hpdv2 / "benchmark" / "photo.json"), []) == [f"photo {i}" for i in range(120)]
    prompts, styles = drtune.read_prompt_set(str(hpdv2 / "benchmark"))  # all of a folder, in file-name order
    assert len(prompts) == 480 and prompts[0] == "anime 0" and prompts[-1] == "photo 119"
    assert styles[0] == "anime" and styles[-1] == "photo"
    (tmp_path / "captions.json").write_text(json.dumps([{"caption": "a boat"}, {"caption": None}, {"caption": " "}]))
    assert drtune.read_prompts(str(tmp_path / "captions.json"), []) == ["a boat"]
    (tmp_path / "lines.json").write_text('{"text": "a kite"}\n{"text": "a tree"}\n')  # JSON Lines named .json
    assert drtune.read_prompts(str(tmp_path / "lines.json"), []) == ["a kite", "a tree"]
    (tmp_path / "bad.json").write_text(json.dumps([{"url": "x"}]))
    with pytest.raises(drtune.UsageError, match="no 'prompt', 'caption' or 'text' field"):
        drtune.read_prompts(str(tmp_path / "bad.json"), [])
    (tmp_path / "mixed.json").write_text(json.dumps(["a cat", 3]))
    with pytest.raises(drtune.UsageError, match="a list of strings or of records"):
        drtune.read_prompts(str(tmp_path / "mixed.json"), [])


def test_named_sets_from_the_hub_dataset(hpdv2, monkeypatch):
    """Without a folder the files come from the hub dataset zhwang/HPDv2 (benchmark/{style}.json, train.json)."""
    import huggingface_hub
    calls = []

    def download(repo_id, filename, repo_type=None, **kwargs):
        calls.append((repo_id, filename, repo_type))
        return str(hpdv2 / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert drtune.read_prompt_set("hpsv2-benchmark") == drtune.read_prompt_set(f"hpsv2-benchmark:{hpdv2}")
    assert calls == [("zhwang/HPDv2", f"benchmark/{s}.json", "dataset") for s in STYLES]
    assert drtune.read_prompts("hpsv2-train:someone/HPDv2-mirror", []) == ["a cat", "a dog", "a red car"]
    assert calls[-1] == ("someone/HPDv2-mirror", "train.json", "dataset")


def test_offline_and_bad_sources_are_one_clear_error(hpdv2, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(drtune.UsageError, match=r"--eval_prompts: could not fetch benchmark/anime.json from the hub "
                                                r"dataset zhwang/HPDv2.*--eval_prompts NAME:/path/to/folder"):
        drtune.read_prompt_set("hpsv2-benchmark", "--eval_prompts")
    with pytest.raises(drtune.UsageError, match="has no train.json"):
        drtune.read_prompt_set(f"hpsv2-train:{hpdv2 / 'benchmark'}")
    with pytest.raises(drtune.UsageError, match="no such folder"):
        drtune.read_prompt_set("hpsv2-train:/no/such/folder")
    (tmp_path / "short" / "benchmark").mkdir(parents=True)
    for style in STYLES:
        (tmp_path / "short" / "benchmark" / f"{style}.json").write_text(json.dumps(["one prompt"]))
    with pytest.raises(drtune.UsageError, match="holds 1 prompts; the benchmark draws 100 per style"):
        drtune.read_prompt_set(f"hpsv2-benchmark:{tmp_path / 'short'}")


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    """A tiny copy of yuvalkirstain/pickapic_v1_no_images: data/{split}-00000-of-00001-*.parquet, one row per
    comparison (prompts repeat), the prompt in 'caption' beside other columns; validation is not validation_unique."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("pickapic_v1_no_images")
    (root / "data").mkdir()
    splits = {"train": [" a cat ", "a dog", "a cat", None, "a red car", "a dog"],
              "validation": ["not unique 0", "not unique 1"],
              "validation_unique": [f"held-out prompt {i}" for i in range(5)]}
    for split, captions in splits.items():
        rows = [dict(caption=c, ranking_id=i, label_0=1.0) for i, c in enumerate(captions)]
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001-0123abcd.parquet")
    return root


def test_pickapic_sets_from_a_local_copy(pickapic):
    assert drtune.read_prompt_set(f"pickapic-train:{pickapic}") == (["a cat", "a dog", "a red car"], None)
    held_out = [f"held-out prompt {i}" for i in range(5)]
    assert drtune.read_prompt_set(f"pickapic-validation:{pickapic}", "--eval_prompts") == (held_out, None)
    for preset in ("sd15-paper", "sdxl-paper"):  # SPO's presets name sets that a local copy serves
        args = spo.parse_args(["--preset", preset])
        assert spo.read_prompts(f"{args.train_prompts}:{pickapic}", []) == ["a cat", "a dog", "a red car"]
        assert spo.read_prompts(f"{args.eval_prompts}:{pickapic}", [], "--eval_prompts") == held_out


def test_pickapic_sets_from_the_hub_read_only_their_split(pickapic, monkeypatch):
    """Without a folder the split's files come from yuvalkirstain/pickapic_v1_no_images, and only them."""
    import datasets
    calls, load = [], datasets.load_dataset

    def from_hub(path, data_files=None, split=None, **kwargs):
        calls.append((path, data_files, split))
        return load(str(pickapic), data_files=data_files, split=split, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", from_hub)
    assert drtune.read_prompts("pickapic-validation", []) == [f"held-out prompt {i}" for i in range(5)]
    assert calls == [("yuvalkirstain/pickapic_v1_no_images",
                      {"validation_unique": "data/validation_unique-*.parquet"}, "validation_unique")]
    assert drtune.read_prompts("pickapic-train:someone/pickapic-mirror", []) == ["a cat", "a dog", "a red car"]
    assert calls[-1] == ("someone/pickapic-mirror", {"train": "data/train-*.parquet"}, "train")


def test_pickapic_offline_and_bad_sources_are_one_clear_error(pickapic, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(drtune.UsageError, match=r"--eval_prompts: could not read data/validation_unique-\*.parquet of "
                                                r"yuvalkirstain/pickapic_v1_no_images.*--eval_prompts "
                                                r"pickapic-validation:/path/to/folder"):
        drtune.read_prompt_set("pickapic-validation", "--eval_prompts")
    with pytest.raises(drtune.UsageError, match="no such folder"):
        drtune.read_prompt_set("pickapic-train:/no/such/folder")
    with pytest.raises(drtune.UsageError, match=r"could not read data/train-\*.parquet"):
        drtune.read_prompt_set(f"pickapic-train:{pickapic / 'data'}")  # the data folder itself, not its parent


def test_the_official_spo_prompt_file_reads_as_it_is(tmp_path):
    """SPO's assets/prompts/4k_training_prompts.json: a list of records with 'caption' and 'trainset_idx'."""
    records = [{"caption": "a cat driving a car", "trainset_idx": 215221}, {"caption": "a lake", "trainset_idx": 53}]
    (tmp_path / "4k_training_prompts.json").write_text(json.dumps(records))
    args = spo.parse_args(["--preset", "sd15-paper", "--train_prompts", str(tmp_path / "4k_training_prompts.json")])
    assert spo.read_prompts(args.train_prompts, []) == ["a cat driving a car", "a lake"]


def test_prompt_template_applies_to_training_and_evaluation_prompts(hpdv2, tmp_path):
    args = drtune.parse_args(tiny_argv(TINY_SD, str(tmp_path / "out"), train_prompts=f"hpsv2-train:{hpdv2}",
                                       eval_prompts=f"hpsv2-benchmark:{hpdv2}", prompt_template="{}, and books.", **K))
    drtune.check_arguments(args)
    assert args.train_prompt_list == ["a cat, and books.", "a dog, and books.", "a red car, and books."]
    benchmark = drtune.read_prompts(f"hpsv2-benchmark:{hpdv2}", [])
    assert args.eval_prompt_list == [f"{p}, and books." for p in benchmark[:2]]  # --num_eval_prompts 2
    with pytest.raises(drtune.UsageError, match="--prompt_template 'books' has no {}"):
        drtune.check_arguments(drtune.parse_args(tiny_argv(TINY_SD, str(tmp_path / "o"), prompt_template="books", **K)))


def test_paper_presets_use_the_papers_prompts():
    for module, preset in ((drtune, "sd15-paper"), (drtune, "sdxl-paper"), (drtune, "sd15-symmetry"),
                           (drtune, "sd15-objectness"), (refl, "paper"), (draft, "paper"), (draft, "paper-lv"),
                           (alignprop, "paper")):
        args = module.parse_args(["--preset", preset])
        assert (args.train_prompts, args.eval_prompts) == ("hpsv2-train", "hpsv2-benchmark"), (module, preset)
    for preset in ("sd15-paper", "sdxl-paper"):
        assert dpo.parse_args(["--preset", preset]).eval_prompts == "hpsv2-benchmark"
        args = spo.parse_args(["--preset", preset])  # SPO's paper: Pick-a-Pic v1's prompts
        assert (args.train_prompts, args.eval_prompts) == ("pickapic-train", "pickapic-validation"), preset
    assert drtune.parse_args(["--preset", "sdxl-paper"]).validation_lora_scale == 0.7  # FDXL's inference scale
    assert drtune.parse_args(["--preset", "sd15-paper"]).validation_lora_scale == 1.0
    objectness = drtune.parse_args(["--preset", "sd15-objectness"])
    assert objectness.reward == "objectness" and objectness.prompt_template == "{}, and books."


def test_symmetry_preset_regularizes_with_clipscore_and_zero_stays_available():
    from rewards import parse_spec
    weights = dict(parse_spec(drtune.parse_args(["--preset", "sd15-symmetry"]).reward))
    assert weights["symmetry"] == 1 and weights["clipscore"] > 0
    plain = drtune.parse_args(["--preset", "sd15-symmetry", "--reward", "symmetry"])  # the regularizer off
    assert dict(parse_spec(plain.reward)) == {"symmetry": 1.0}


def test_validation_lora_scale_scales_the_weight_change_and_is_restored():
    """Inside lora_scale(unet, s) every LoRA layer adds s x its weight change; outside, the scale is 1 again."""
    from peft.tuners.lora import LoraLayer
    args = drtune.parse_args(tiny_argv(TINY_SD, "unused", **K))
    info = drtune.check_arguments(args)
    models = drtune.load_models(args, info, torch.device("cpu"), torch.float32)
    unet = models.unet
    drtune.add_lora(unet, args)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    layer = next(m for m in unet.modules() if isinstance(m, LoraLayer))
    x = torch.randn(3, layer.base_layer.in_features)
    with torch.no_grad():
        base, full = layer.base_layer(x), layer(x)
        with drtune.lora_scale(unet, 0.7):
            scaled = layer(x)
        with drtune.lora_scale(unet, 0.0):
            off = layer(x)
        again = layer(x)
    torch.testing.assert_close(scaled - base, 0.7 * (full - base), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(off, base)
    torch.testing.assert_close(again, full)
    assert (full - base).abs().max() > 1e-3
    scheduler = drtune.make_scheduler(args)  # the grids: generate() at --validation_lora_scale
    args.validation_lora_scale = 0.0
    at_zero = drtune.generate(models, scheduler, unet, ["a cat"], args, 0)
    unet.disable_adapters()
    off_images = drtune.generate(models, scheduler, unet, ["a cat"], args, 0)
    unet.enable_adapters()
    args.validation_lora_scale = 1.0
    torch.testing.assert_close(at_zero, off_images)
    assert (drtune.generate(models, scheduler, unet, ["a cat"], args, 0) - off_images).abs().max() > 1e-3
    with pytest.raises(drtune.UsageError, match="--validation_lora_scale must be >= 0"):
        drtune.check_arguments(drtune.parse_args(tiny_argv(TINY_SD, "unused", validation_lora_scale=-1, **K)))
