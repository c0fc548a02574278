"""The decide stage: rule order, method choice by memory, answer files, the interview."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tunewise.decide import (
    QUESTIONS,
    Answers,
    Question,
    ask,
    estimate_train_memory_gb,
    load_answers,
    recommend,
)
from tunewise.errors import TunewiseError

EXAMPLE = Path(__file__).parents[2] / "examples" / "debian-sections" / "decide-answers.yaml"


def answers(**overrides: Any) -> Answers:
    """A behavior problem with a measured prompt that misses its target: a fine-tune case."""
    base: dict[str, Any] = dict(
        problem="behavior",
        changes_often=False,
        n_examples=2500,
        prompt_tried=True,
        prompt_meets_target=False,
        model_params_b=0.135,
        gpu_memory_gb=0.0,
    )
    return Answers(**(base | overrides))


def text(decision: Any) -> str:
    return " ".join(decision.reasons).lower()


# --- rule order --------------------------------------------------------------------------


def test_knowledge_problem_goes_to_rag() -> None:
    d = recommend(answers(problem="knowledge"))
    assert (d.recommendation, d.method) == ("rag", None)
    assert "retrieval" in text(d) and "stale" not in text(d)
    assert d.headline() == "Use retrieval (RAG), not fine-tuning"


def test_changing_knowledge_says_a_finetune_goes_stale() -> None:
    d = recommend(answers(problem="knowledge", changes_often=True))
    assert d.recommendation == "rag"
    assert "stale" in text(d)


def test_capability_problem_goes_to_a_stronger_model() -> None:
    d = recommend(answers(problem="capability"))
    assert d.recommendation == "stronger_model"
    assert "reasoning" in text(d)


def test_unsure_says_how_to_find_out() -> None:
    d = recommend(answers(problem="unsure"))
    assert d.recommendation == "better_prompt"
    assert "tunewise run" in text(d) and "knowledge" in text(d)


def test_changing_requirement_keeps_the_prompt() -> None:
    d = recommend(answers(changes_often=True))
    assert d.recommendation == "better_prompt"
    assert "changes weekly" in text(d)


def test_unmeasured_prompt_comes_first() -> None:
    d = recommend(answers(prompt_tried=False, prompt_meets_target=None))
    assert d.recommendation == "better_prompt"
    assert "zero-shot and few-shot" in text(d) and "baseline" in text(d)


def test_prompt_meeting_target_is_kept_at_low_volume() -> None:
    d = recommend(answers(prompt_meets_target=True, requests_per_day=5000))
    assert d.recommendation == "better_prompt"
    assert "meets the quality target" in text(d)


@pytest.mark.parametrize(
    ("serving", "cause"),
    [
        ({"requests_per_day": 250_000}, "250,000 requests per day"),
        ({"latency_sensitive": True}, "response time"),
        ({"private_data": True}, "own hardware"),
    ],
)
def test_serving_needs_justify_a_small_finetuned_model(serving: dict, cause: str) -> None:
    d = recommend(answers(prompt_meets_target=True, **serving))
    assert d.recommendation == "finetune"
    assert cause in text(d) and "small fine-tuned model" in text(d)


def test_too_few_examples_keeps_the_prompt() -> None:
    d = recommend(answers(n_examples=60))
    assert d.recommendation == "better_prompt"
    assert "60 good examples" in text(d) and "at least 100" in text(d)


def test_few_examples_warns_about_200() -> None:
    d = recommend(answers(n_examples=150))
    assert d.recommendation == "finetune"
    assert any("200" in w for w in d.warnings)


def test_enough_examples_has_no_warning() -> None:
    d = recommend(answers(n_examples=2500))
    assert d.recommendation == "finetune" and d.warnings == []
    assert "2,500 examples" in text(d)


# --- method choice by memory -------------------------------------------------------------


def test_small_model_on_cpu_uses_lora() -> None:
    d = recommend(answers(model_params_b=0.135, gpu_memory_gb=0.0))
    assert d.method == "lora"
    assert f"{d.memory_gb['lora']:g} gb" in text(d) and "0.135b" in text(d)


def test_big_model_on_cpu_warns_about_hardware() -> None:
    d = recommend(answers(model_params_b=7, gpu_memory_gb=0.0))
    assert d.method == "qlora"
    assert any("GPU" in w and f"{d.memory_gb['qlora']:g} GB" in w for w in d.warnings)


def test_full_finetune_when_it_fits_and_data_is_plenty() -> None:
    d = recommend(answers(model_params_b=1, gpu_memory_gb=80, n_examples=10_000))
    assert d.memory_gb["full"] <= 80
    assert d.method == "full" and d.warnings == []
    assert d.headline() == "Fine-tune all weights (full fine-tuning)"


def test_full_fits_but_few_examples_uses_lora() -> None:
    d = recommend(answers(model_params_b=1, gpu_memory_gb=80, n_examples=1000))
    assert d.method == "lora"
    assert "5,000" in text(d)


def test_7b_on_80gb_is_lora_because_full_does_not_fit() -> None:
    d = recommend(answers(model_params_b=7, gpu_memory_gb=80, n_examples=10_000))
    assert d.memory_gb["full"] > 80 >= d.memory_gb["lora"]
    assert d.method == "lora"
    assert "your gpu has 80 gb" in text(d)


def test_7b_on_24gb_follows_the_estimate() -> None:
    d = recommend(answers(model_params_b=7, gpu_memory_gb=24))
    expected = "lora" if d.memory_gb["lora"] <= 24 else "qlora"
    assert d.method == expected and d.warnings == []


def test_13b_on_24gb_uses_qlora() -> None:
    d = recommend(answers(model_params_b=13, gpu_memory_gb=24))
    assert d.memory_gb["lora"] > 24 >= d.memory_gb["qlora"]
    assert d.method == "qlora" and d.warnings == []
    assert d.headline() == "Fine-tune with QLoRA"


def test_70b_on_24gb_warns_that_even_qlora_does_not_fit() -> None:
    d = recommend(answers(model_params_b=70, gpu_memory_gb=24))
    assert d.method == "qlora"
    assert any("even qlora does not fit" in w.lower() and "smaller" in w for w in d.warnings)


def test_decision_is_json_ready() -> None:
    d = recommend(answers())
    data = json.loads(json.dumps(d.to_dict()))
    assert data["recommendation"] == "finetune" and data["method"] == "lora"
    assert data["headline"] == "Fine-tune with LoRA"
    assert set(data["memory_gb"]) == {"lora", "qlora", "full"}


def test_estimate_is_ordered_and_grows_with_size() -> None:
    for size in (0.135, 1, 7, 70):
        qlora, lora, full = (estimate_train_memory_gb(size, m) for m in ("qlora", "lora", "full"))
        assert 0 < qlora < lora < full
    assert estimate_train_memory_gb(7, "lora") < estimate_train_memory_gb(13, "lora")
    assert estimate_train_memory_gb(7, "lora", seq_len=4096) > estimate_train_memory_gb(7, "lora")
    assert estimate_train_memory_gb(7, "full") == pytest.approx(7 * 16 * 1.2, rel=0.1)


# --- answer files ------------------------------------------------------------------------


def test_shipped_example_recommends_lora_finetune() -> None:
    d = recommend(load_answers(EXAMPLE))
    assert (d.recommendation, d.method) == ("finetune", "lora")


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "answers.yaml"
    path.write_text(body)
    return path


VALID = "problem: behavior\nchanges_often: false\nn_examples: 300\nprompt_tried: false\n"


def test_load_valid_file(tmp_path: Path) -> None:
    a = load_answers(write(tmp_path, VALID))
    assert a.n_examples == 300 and a.model_params_b == 0.135


def test_unknown_key_is_named_with_the_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "n_exmaples: 5\n")
    with pytest.raises(TunewiseError) as err:
        load_answers(path)
    assert err.value.field == "n_exmaples" and err.value.line == 5
    assert "answers.yaml:5" in str(err.value) and "n_exmaples" in str(err.value)
    assert "n_examples" in (err.value.fix or "")


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace("300", "many"))
    with pytest.raises(TunewiseError) as err:
        load_answers(path)
    assert err.value.field == "n_examples" and err.value.line == 3
    assert "answers.yaml" in str(err.value) and "whole number" in str(err.value)


def test_bad_choice_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(TunewiseError, match="behavior, knowledge") as err:
        load_answers(write(tmp_path, VALID.replace("behavior", "style")))
    assert err.value.field == "problem"


def test_missing_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(TunewiseError, match="missing") as err:
        load_answers(write(tmp_path, VALID.replace("changes_often: false\n", "")))
    assert err.value.field == "changes_often"


def test_measured_prompt_needs_its_result(tmp_path: Path) -> None:
    body = VALID.replace("prompt_tried: false", "prompt_tried: true")
    with pytest.raises(TunewiseError, match="prompt_meets_target") as err:
        load_answers(write(tmp_path, body))
    assert "answers.yaml" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TunewiseError, match="not found") as err:
        load_answers(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value)


def test_bad_yaml_gives_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "latency_sensitive: [true\n")
    with pytest.raises(TunewiseError, match="not valid YAML") as err:
        load_answers(path)
    assert err.value.line is not None and "answers.yaml" in str(err.value)


@pytest.mark.parametrize("body", ["", "- behavior\n- 300\n"])
def test_not_a_mapping(tmp_path: Path, body: str) -> None:
    with pytest.raises(TunewiseError, match="mapping") as err:
        load_answers(write(tmp_path, body))
    assert "answers.yaml" in str(err.value)


# --- the interview -----------------------------------------------------------------------


def test_one_question_per_answer_field() -> None:
    assert [q.key for q in QUESTIONS] == list(Answers.model_fields)
    for q in QUESTIONS:
        assert q.text.endswith("?")
        assert (q.kind == "choice") == bool(q.choices)


def scripted(replies: dict[str, list[str]]):
    """A prompt callable that answers each question from its own queue of replies."""
    asked: list[str] = []

    def prompt(q: Question) -> str:
        asked.append(q.key)
        return replies[q.key].pop(0)

    return prompt, asked


REPLIES = {
    "problem": ["Behavior"],
    "changes_often": ["maybe", "n"],
    "n_examples": ["2,500"],
    "prompt_tried": ["yes"],
    "prompt_meets_target": ["false"],
    "requests_per_day": ["-3", "0"],
    "latency_sensitive": ["no"],
    "private_data": ["y"],
    "model_params_b": ["0.135"],
    "gpu_memory_gb": ["0"],
}


def test_ask_reasks_on_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    prompt, asked = scripted({k: list(v) for k, v in REPLIES.items()})
    a = ask(prompt)
    assert a.changes_often is False and a.n_examples == 2500 and a.private_data is True
    assert a.problem == "behavior" and a.prompt_meets_target is False
    assert asked.count("changes_often") == 2 and asked.count("requests_per_day") == 2
    assert "'maybe' is not yes or no" in capsys.readouterr().out
    assert recommend(a).method == "lora"


def test_ask_skips_the_target_question_without_a_measured_prompt() -> None:
    replies = {k: list(v) for k, v in REPLIES.items()} | {"prompt_tried": ["no"]}
    prompt, asked = scripted(replies)
    assert ask(prompt).prompt_meets_target is None
    assert "prompt_meets_target" not in asked


def test_ask_gives_up_after_three_reasks() -> None:
    replies = {k: list(v) for k, v in REPLIES.items()} | {"n_examples": ["lots"] * 10}
    prompt, asked = scripted(replies)
    with pytest.raises(TunewiseError) as err:
        ask(prompt)
    assert err.value.field == "n_examples" and asked.count("n_examples") == 4
