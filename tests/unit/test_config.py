from pathlib import Path

import pytest

from tunewise.config import Config, load_config
from tunewise.decide import load_answers, recommend
from tunewise.errors import TunewiseError

EXAMPLES = Path(__file__).parents[2] / "examples"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tunewise.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_yaml_files_validate():
    shipped = sorted(EXAMPLES.glob("*/tunewise.yaml"))
    assert shipped, "no example configs found"
    for path in shipped:
        config = load_config(path)
        assert Path(config.data.path).exists(), path
        assert config.decide is not None and recommend(config.decide).recommendation == "finetune"
    for path in EXAMPLES.glob("*/decide-answers.yaml"):
        assert recommend(load_answers(path)).method == "lora"


def test_relative_data_path_resolves_against_config_dir(tmp_path):
    config = load_config(write(tmp_path, "data:\n  path: d.jsonl\n"))
    assert config.data.path == str(tmp_path / "d.jsonl")
    assert config.lora.r == 16 and config.train.lr is None and config.method == "lora"
    from tunewise.settings import train_settings
    from tunewise.train.plan import learning_rate

    assert learning_rate(train_settings(config)) == 2e-4  # unset: the method's default
    assert learning_rate(train_settings(config.model_copy(update={"method": "full"}))) == 2e-5


def test_misspelled_key_is_named_with_its_line_and_valid_keys(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\ntrain:\n  lr: 0.001\n  epoch: 3\n")
    with pytest.raises(TunewiseError) as err:
        load_config(path)
    text = str(err.value)
    assert f"{path}:5" in text and "train.epoch" in text and "unknown key" in text
    assert "epochs" in text  # the fix lists the valid keys


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(TunewiseError, match=r"lora.r") as err:
        load_config(write(tmp_path, "data:\n  path: d.jsonl\nlora:\n  r: many\n"))
    assert ":4" in str(err.value)


def test_missing_required_key(tmp_path):
    with pytest.raises(TunewiseError, match="data"):
        load_config(write(tmp_path, "task:\n  name: x\n"))


def test_set_overrides_and_is_validated(tmp_path):
    path = write(tmp_path, "data:\n  path: d.jsonl\n")
    config = load_config(path, ["train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]", "task.name=abc"])
    assert config.train.lr == 1e-4 and config.lora.target_modules == ["q_proj", "v_proj"] and config.task.name == "abc"
    with pytest.raises(TunewiseError, match="train.nope"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(TunewiseError, match="key=value"):
        load_config(path, ["train.lr"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(TunewiseError, match=r"not valid YAML") as err:
        load_config(write(tmp_path, "data:\n  path: [unclosed\n"))
    assert "tunewise.yaml:" in str(err.value)
    with pytest.raises(TunewiseError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cross_field_fractions(tmp_path):
    with pytest.raises(TunewiseError, match="val_fraction"):
        load_config(write(tmp_path, "data:\n  path: d.jsonl\n  val_fraction: 0.3\n  test_fraction: 0.3\n"))


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Config.__mro__[1]) and ann.__module__ == Config.__module__:
                walk(ann)

    walk(Config)


def test_endpoint_arms_need_free_names_and_red_flags_are_known(tmp_path):
    head = "data:\n  path: d.jsonl\neval:\n"
    ok = load_config(write(tmp_path, head + "  endpoints:\n    - {name: gpt, url: 'http://x/v1', model: m}\n"))
    assert ok.eval.endpoints[0].baseline is True and ok.eval.block_on == ["length_drift", "refusal", "forgetting"]
    with pytest.raises(TunewiseError, match="name 'few_shot' is taken"):
        load_config(write(tmp_path, head + "  endpoints:\n    - {name: few_shot, url: 'http://x/v1', model: m}\n"))
    with pytest.raises(TunewiseError) as err:
        load_config(write(tmp_path, head + "  block_on: [overfiting]\n"))
    assert "eval.block_on" in str(err.value) and "overfitting" in str(err.value)
    with pytest.raises(TunewiseError, match="eval.judge.url"):
        load_config(write(tmp_path, head + "  judge: {model: m}\n"))
