"""`tunewise import-axolotl`: configs shaped like Axolotl's public examples (tests/fixtures/axolotl,
written from examples/llama-3/{lora-1b,instruct-lora-8b,instruct-dpo-lora-8b}.yml with local data)
become tunewise configs whose data reads without a rejected row; every key not carried is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tunewise.errors import TunewiseError
from tunewise.interop.axolotl import export_axolotl, import_axolotl

FIXTURES = Path(__file__).parents[1] / "fixtures" / "axolotl"


def read_back(tmp_path: Path, name: str):
    """Import, write, load the tunewise.yaml, and prepare its data with the embedded model's template."""
    from tunewise.config import load_config
    from tunewise.data import prepare
    from tunewise.models import base_chat
    from tunewise.settings import data_settings

    folder = Path(shutil.copytree(FIXTURES, tmp_path / "axolotl"))
    imported = import_axolotl(folder / name)
    (tmp_path / "tunewise.yaml").write_text(imported.yaml(folder / name), encoding="utf-8")
    config = load_config(tmp_path / "tunewise.yaml", ["model.base=smollm2-135m-instruct"])  # no hub model here
    prepared = prepare([Path(p) for p in config.data.paths], data_settings(config), chat=base_chat(config.model))
    return imported, config, prepared


def test_lora_recipe_carries_its_shape_and_schedule(tmp_path):
    imported, config, prepared = read_back(tmp_path, "lora-1b.yml")
    assert config.method == "lora" and config.lora.r == 16 and config.lora.alpha == 32
    assert config.lora.target_modules == ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj", "k_proj", "o_proj"]
    t = config.train
    assert (t.lr, t.batch_size, t.grad_accum, t.epochs, t.max_seq_len, t.schedule, t.evals_per_epoch) == (
        2e-4, 2, 2, 1, 2048, "cosine", 4)
    assert t.gradient_checkpointing == "on" and config.data.val_fraction == 0.1
    assert not prepared.problems and sum(len(s) for s in prepared.splits.values()) == 40
    assert set(imported.skipped) >= {"sample_packing", "optimizer", "special_tokens", "warmup_steps", "output_dir"}
    assert "lora_model_dir" not in imported.skipped and "fp16" not in imported.skipped  # empty keys say nothing
    assert "# Axolotl keys not carried over:" in (tmp_path / "tunewise.yaml").read_text()


def test_qlora_chat_recipe_maps_sharegpt_turns_and_names_what_it_drops(tmp_path):
    imported, config, prepared = read_back(tmp_path, "instruct-qlora.yml")
    assert config.method == "qlora" and config.lora.target_modules == "all-linear"
    assert config.data.map == {"conversation": "conversations"} and not prepared.problems
    assert config.track == "wandb" and config.task.name == "sections-qlora"
    assert (config.train.precision, config.train.patience, config.train.seed, config.data.seed) == ("bf16", 3, 7, 7)
    assert "cosine_with_min_lr" in imported.skipped["lr_scheduler"] and "llama3" in imported.skipped["chat_template"]
    assert "deepspeed" in imported.skipped and "paged_adamw_32bit" not in str(imported.config)


def test_dpo_recipe_reads_its_pairs(tmp_path):
    _, config, prepared = read_back(tmp_path, "dpo.yml")
    assert config.method == "dpo" and config.data.map == {"conversation": "prompt"}
    examples = [e for split in prepared.splits.values() for e in split]
    assert len(examples) == 40 and all(e.rejected for e in examples) and not prepared.problems


def test_hub_datasets_need_a_local_copy(tmp_path):
    with pytest.raises(TunewiseError) as err:
        import_axolotl(FIXTURES / "hub.yml")
    assert "teknium/GPT4-LLM-Cleaned" in str(err.value) and "--data" in str(err.value)
    imported = import_axolotl(FIXTURES / "hub.yml", [FIXTURES / "alpaca.jsonl"])
    assert imported.config["data"]["path"] == str((FIXTURES / "alpaca.jsonl").resolve())


def test_cli_writes_the_file_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tunewise.yaml"
    code, text = run_cli(monkeypatch, capsys, "import-axolotl", str(FIXTURES / "lora-1b.yml"), "-o", str(out))
    assert code == 0 and out.exists() and "not carried over: sample_packing" in text
    code, text = run_cli(monkeypatch, capsys, "import-axolotl", str(FIXTURES / "lora-1b.yml"), "-o", str(out))
    assert code == 2 and "would overwrite" in text and "Traceback" not in text


def test_dataset_keys_it_cannot_honour_are_named_and_a_broken_entry_is_refused(tmp_path):
    (tmp_path / "alpaca.jsonl").write_text((FIXTURES / "alpaca.jsonl").read_text())
    (tmp_path / "a.yml").write_text("base_model: x/y\nadapter: lora\ndatasets:\n  - path: alpaca.jsonl\n"
                                    "    ds_type: json\n    type: alpaca\n    split: train[:50%]\n")
    imported = import_axolotl(tmp_path / "a.yml")
    assert "datasets[0].split" in imported.skipped and imported.config["method"] == "lora"
    (tmp_path / "b.yml").write_text("base_model: x/y\ndatasets:\n  - just-a-name\n")
    with pytest.raises(TunewiseError) as err:
        import_axolotl(tmp_path / "b.yml")
    assert "datasets[0] is not a mapping" in str(err.value) and "b.yml" in str(err.value)


def trained_run(tmp_path: Path, method: str, pairs: bool):
    """A run folder as training leaves it, as far as the export reads it: splits and the plan."""
    from tests.helpers import train_plan, write_weights_record
    from tunewise.data.records import Example
    from tunewise.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.data.mkdir(parents=True)
    run.config.write_text("task: {name: sections}\ndata: {path: x.jsonl}\n")
    for split, n in (("train", 12), ("val", 3), ("test", 3)):
        rows = [Example([{"role": "user", "content": f"{split} item {i}"}, {"role": "assistant", "content": "net"}],
                        f"d.jsonl:{i + 1}", rejected="libs" if pairs else None) for i in range(n)]
        run.split(split).write_text("".join(json.dumps(e.to_json()) + "\n" for e in rows))
    run.adapter.mkdir()
    from tunewise.models import load_tokenizer, resolve_base

    template = load_tokenizer(resolve_base("smollm2-135m-instruct")).chat_template  # what training saves
    (run.adapter / "chat_template.jinja").write_text(template)
    preference = {"beta": 0.1, "sft_weight": 0.0} if pairs else None
    write_weights_record(run.adapter, plan=train_plan(base="smollm2-135m-instruct", method=method,
                                                      preference=preference, lr=3e-4, batch_size=2, grad_accum=4))
    return run


@pytest.mark.parametrize("method, pairs", [("lora", False), ("dpo", True)])
def test_a_run_exported_to_axolotl_imports_back_to_the_same_recipe(tmp_path, method, pairs):
    import yaml

    from tunewise.config import load_config
    from tunewise.data import prepare
    from tunewise.models import base_chat
    from tunewise.settings import data_settings

    run = trained_run(tmp_path, method, pairs)
    written = export_axolotl(run.root, tmp_path / "axolotl")
    recipe = yaml.safe_load(written.read_text())
    assert (recipe["lora_r"], recipe["lora_alpha"], recipe["lora_target_linear"]) == (4, 8, True)
    assert (recipe["micro_batch_size"], recipe["gradient_accumulation_steps"], recipe["learning_rate"]) == (2, 4, 3e-4)
    template = (run.adapter / "chat_template.jinja").read_text()
    assert recipe.get("rl") == ("dpo" if pairs else None) and recipe["chat_template_jinja"] == template
    train = [json.loads(line) for line in (tmp_path / "axolotl" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 12 and not (tmp_path / "axolotl" / "test.jsonl").exists()  # the test split stays here
    first = train[0]["conversation" if pairs else "messages"][0]
    assert first == {"role": "system", "content": "Reply with JSON."}  # trained with the task's system prompt

    imported = import_axolotl(written, task="sections")
    (tmp_path / "back.yaml").write_text(imported.yaml(written))
    config = load_config(tmp_path / "back.yaml")
    assert config.method == method and (config.lora.r, config.lora.alpha, config.lora.target_modules) == (
        4, 8, "all-linear")
    assert (config.train.lr, config.train.batch_size, config.train.grad_accum, config.train.epochs,
            config.train.max_seq_len, config.train.schedule) == (3e-4, 2, 4, 2, 64, "cosine")
    assert config.model.chat_template == template
    prepared = prepare([Path(p) for p in config.data.paths], data_settings(config), chat=base_chat(config.model))
    rows = [e for split in prepared.splits.values() for e in split]
    assert len(rows) == 15 and not prepared.problems and all((e.rejected == "libs") == pairs for e in rows)
    assert set(imported.skipped) <= {"output_dir", "optimizer", "test_datasets", "(test split)"}


def test_a_single_target_module_and_a_datasets_string_are_handled(tmp_path):
    (tmp_path / "alpaca.jsonl").write_text((FIXTURES / "alpaca.jsonl").read_text())
    (tmp_path / "a.yml").write_text("base_model: x/y\nadapter: lora\nlora_target_modules: q_proj\n"
                                    "datasets:\n  - path: alpaca.jsonl\n    ds_type: json\n    type: alpaca\n")
    assert import_axolotl(tmp_path / "a.yml").config["lora"]["target_modules"] == ["q_proj"]
    (tmp_path / "b.yml").write_text("base_model: x/y\ndatasets: alpaca.jsonl\n")
    with pytest.raises(TunewiseError) as err:
        import_axolotl(tmp_path / "b.yml")
    assert "must be lists of mappings" in str(err.value) and "b.yml" in str(err.value)
