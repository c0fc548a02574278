"""Every model family tunewise claims: its real chat template and special tokens (tests/families.py)
through `ChatFormat`: training masks, system prompts, stop tokens, reasoning blocks, base models,
and the refusals for templates that cannot be used exactly."""

from __future__ import annotations

import pytest
import torch

from tests.families import FAMILIES, SHIPPED, family_tokenizer, generation_eos
from tunewise.errors import TunewiseError
from tunewise.models.chat import IGNORE, ChatFormat

CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Which section holds vim?"},
    {"role": "assistant", "content": "editors"},
    {"role": "user", "content": "And  curl, please?"},
    {"role": "assistant", "content": "web tools\nonly"},
]
NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def formats(tokenizer) -> dict[str, ChatFormat]:
    out = {}
    for name in NAMES:
        tok = family_tokenizer(name, tokenizer)
        out[name] = ChatFormat.build(tok, model=name, generation_eos=generation_eos(name, tok))
    return out


def labeled_runs(chat: ChatFormat, encoded) -> list[str]:
    """The labeled stretches of an encoded chat, decoded with special tokens kept."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [chat.tokenizer.decode(run) for run in runs]


def squash(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("name", NAMES)
def test_masks_cover_each_answer_and_its_end_of_turn_only(formats, name):
    chat = formats[name]
    family = FAMILIES[name]
    encoded = chat.encode(CHAT)
    runs = labeled_runs(chat, encoded)
    assert chat.end_of_turn == (family.end_of_turn,)
    assert [squash(r) for r in runs] == [squash("editors" + family.end_of_turn),
                                         squash("web tools\nonly" + family.end_of_turn)]
    # nothing of the scaffolding: every labeled token is an answer token or the end-of-turn token
    eot = chat.tokenizer.convert_tokens_to_ids(family.end_of_turn)
    special = set(chat.tokenizer.all_special_ids) - {eot}
    labeled = [t for t, lab in zip(encoded.input_ids, encoded.labels) if lab != IGNORE]
    assert not special & set(labeled)
    assert labeled.count(eot) == 2
    # the ids spell the rendered chat (bos once, from the template or the tokenizer)
    assert squash(chat.tokenizer.decode(encoded.input_ids)) == squash(chat.render(CHAT, generation_prompt=False))
    if chat.tokenizer.bos_token_id is not None and family.bos:
        assert encoded.input_ids[:2].count(chat.tokenizer.bos_token_id) <= 1  # never a doubled bos
    assert len(encoded.labels) == len(encoded.input_ids)
    final = labeled_runs(chat, chat.encode(CHAT, final_only=True))
    assert [squash(r) for r in final] == [squash("web tools\nonly" + family.end_of_turn)]


@pytest.mark.parametrize("name", NAMES)
def test_evaluation_prompt_is_what_training_saw(formats, name):
    """The prompt a model completes at evaluation and in the server is the training text up to the answer."""
    chat = formats[name]
    single = [CHAT[0], CHAT[1], CHAT[2]]
    prompt = chat.prompt(single[:-1])
    full = chat.render(single, generation_prompt=False)
    assert full.startswith(prompt), (prompt, full)
    assert full[len(prompt):].lstrip().startswith("editors")
    encoded = chat.encode(single)
    first = encoded.labels.index(next(lab for lab in encoded.labels if lab != IGNORE))
    assert encoded.input_ids[:first] == chat.ids(prompt)


@pytest.mark.parametrize("name", NAMES)
def test_system_prompt_is_placed_the_familys_way(formats, name):
    chat = formats[name]
    text = chat.prompt(CHAT[:4])
    assert text.count("Answer in one word.") == 1
    if FAMILIES[name].fold_system:
        assert chat.fold_system
        folded = chat.conversation(CHAT)
        assert [m["role"] for m in folded] == ["user", "assistant", "user", "assistant"]
        assert folded[0]["content"] == "Answer in one word.\n\nWhich section holds vim?"
    # in the first user turn or before it, never moved after it
    assert text.index("Answer in one word.") < text.index("Which section holds vim?")


def test_gemma_2_raises_on_a_system_turn_and_tunewise_folds_it(formats, tokenizer):
    tok = family_tokenizer("gemma-2", tokenizer)
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(CHAT[:2], tokenize=False)
    assert "<start_of_turn>user\nAnswer in one word.\n\nWhich section" in formats["gemma-2"].prompt(CHAT[:2])


def test_mistral_v03_would_move_the_system_prompt_to_the_last_turn(formats, tokenizer):
    tok = family_tokenizer("mistral-v0.3", tokenizer)
    raw = tok.apply_chat_template(CHAT[:4], tokenize=False)
    assert raw.index("Answer in one word.") > raw.index("Which section holds vim?")  # the template's own move
    ours = formats["mistral-v0.3"].prompt(CHAT[:4])
    assert ours.index("Answer in one word.") < ours.index("Which section holds vim?")


@pytest.mark.parametrize("name", NAMES)
def test_generation_stops_at_the_familys_end_of_turn_tokens(formats, name):
    chat = formats[name]
    family = FAMILIES[name]
    tok = chat.tokenizer
    for stop in (family.end_of_turn, family.eos, *family.generation_eos):
        assert tok.convert_tokens_to_ids(stop) in chat.stop_ids
    words = tok("a section", add_special_tokens=False)["input_ids"]
    for stop in chat.stop_ids:
        assert chat.answer([*words, stop, *words]).text == "a section"
    # the opener of a next user turn stops too, and no template token leaks into the text
    leaked = tok(chat.render([{"role": "user", "content": "more"}], generation_prompt=False),
                 add_special_tokens=False)["input_ids"]
    assert chat.answer([*words, *leaked]).text == "a section"


def test_qwen3_thinking_is_a_setting_and_is_recorded(tokenizer):
    tok = family_tokenizer("qwen-3", tokenizer)
    off = ChatFormat.build(tok, model="qwen-3")
    assert off.kwargs == {"enable_thinking": False} and off.record()["kwargs"] == {"enable_thinking": False}
    assert off.prompt(CHAT[1:2]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = ChatFormat.build(tok, model="qwen-3", kwargs={"enable_thinking": True})
    assert on.prompt(CHAT[1:2]).endswith("<|im_start|>assistant\n")
    for chat in (off, on):  # the empty <think></think> the template adds is never trained on
        assert all("think" not in run for run in labeled_runs(chat, chat.encode(CHAT)))


def test_reasoning_the_user_wrote_is_trained_and_stripped_from_answers(tokenizer):
    chat = ChatFormat.build(family_tokenizer("qwen-3", tokenizer), model="qwen-3", kwargs={"enable_thinking": True})
    written = [*CHAT[1:2], {"role": "assistant", "content": "<think>\nvim edits text\n</think>\n\neditors"}]
    runs = labeled_runs(chat, chat.encode(written))
    assert [squash(r) for r in runs] == [squash("<think>\nvim edits text\n</think>\n\neditors<|im_end|>")]
    # an earlier turn whose reasoning the template drops: only its answer is labeled
    multi = [*written, {"role": "user", "content": "next"}, {"role": "assistant", "content": "web"}]
    assert [squash(r) for r in labeled_runs(chat, chat.encode(multi))] == ["editors<|im_end|>", "web<|im_end|>"]
    ids = chat.tokenizer("<think>\nstep one\n</think>\n\nweb<|im_end|>", add_special_tokens=False)["input_ids"]
    answer = chat.answer(ids)
    assert (answer.text, answer.reasoning) == ("web", "step one")


def test_llama_32_date_is_fixed_unless_set(tokenizer):
    tok = family_tokenizer("llama-3.2", tokenizer)
    fixed = ChatFormat.build(tok, model="llama-3.2")
    assert "Today Date: 26 Jul 2024" in fixed.prompt(CHAT[:2])
    dated = ChatFormat.build(tok, model="llama-3.2", kwargs={"date_string": "01 Dec 2026"})
    assert "Today Date: 01 Dec 2026" in dated.prompt(CHAT[:2])


@pytest.mark.parametrize(("name", "default", "stop"), [
    ("gemma-3", "gemma", "<end_of_turn>"), ("smollm2", "chatml", "<|im_end|>"),
])
def test_a_base_model_gets_an_explicit_recorded_default(tokenizer, name, default, stop):
    tok = family_tokenizer(name, tokenizer, template=False)
    assert tok.chat_template is None
    chat = ChatFormat.build(tok, model="my-base")
    assert chat.source == f"default:{default}" and chat.record()["source"] == f"default:{default}"
    assert "no chat template" in chat.warnings[0] and "my-base" in chat.warnings[0]
    assert chat.end_of_turn == (stop,)
    assert [squash(r) for r in labeled_runs(chat, chat.encode(CHAT))] == [
        squash("editors" + stop), squash("web tools\nonly" + stop)]


def test_a_vocabulary_without_turn_tokens_gets_the_plain_default(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    tok.eos_token = "<|endoftext|>"
    real_vocab = tok.get_vocab

    def without_chatml():
        return {k: v for k, v in real_vocab().items() if k not in ("<|im_start|>", "<|im_end|>")}

    tok.get_vocab = without_chatml
    chat = ChatFormat.build(tok, model="plain-base")
    assert chat.source == "default:plain"
    assert chat.end_of_turn == ("<|endoftext|>",)
    assert chat.stop_strings == ("### User:",)
    assert chat.split("Paris\n\n### User:\nand Rome?").text == "Paris"


def test_a_template_the_user_gives_is_used(tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text((SHIPPED / "gemma.jinja").read_text(encoding="utf-8"), encoding="utf-8")
    tok = family_tokenizer("gemma-3", tokenizer, template=False)
    for given in (str(path), path.read_text(encoding="utf-8")):
        chat = ChatFormat.build(tok, model="my-base", template=given)
        assert chat.source == "config" and not chat.warnings


@pytest.mark.parametrize(("template", "kwargs", "message"), [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", {}, "no special token closes the assistant's turn"),
    ("{% for m in messages %}{{ '<|im_start|>' + m['content'] | upper + '<|im_end|>' }}{% endfor %}", {},
     "does not appear in the rendered chat"),
    ("{{ raise_exception('no chats here') }}", {}, "raises on a plain user/assistant chat"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %", {}, "not valid Jinja"),
    (None, {"enable_thinking": False}, "does not read enable_thinking"),
])
def test_templates_that_cannot_be_used_exactly_are_refused(tokenizer, template, kwargs, message):
    with pytest.raises(TunewiseError) as err:
        ChatFormat.build(tokenizer, model="org/some-model", template=template, kwargs=kwargs)
    assert message in str(err.value)
    assert err.value.fix and err.value.field.startswith("model.chat_template")
    if "cannot train" in str(err.value):
        assert "org/some-model" in str(err.value)


def test_an_unusable_template_stops_a_run_before_any_stage(make_project, monkeypatch, capsys, tmp_path):
    """Through the real entry point: exit 2, the model, reason and fix, no traceback, no run folder."""
    from tests.helpers import run_cli

    config = make_project()
    code, out = run_cli(monkeypatch, capsys, "run", "-c", str(config), "--runs", str(tmp_path / "runs"),
                        "--set", "model.chat_template={% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert code == 2 and "Traceback" not in out
    assert "no special token closes the assistant's turn" in out and "fix:" in out
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    code, out = run_cli(monkeypatch, capsys, "run", "-c", str(config), "--runs", str(tmp_path / "runs"),
                        "--set", "model.chat_template_kwargs.enable_thinking=false")
    assert code == 2 and "does not read enable_thinking" in out


@pytest.mark.parametrize("name", ["gemma-3", "llama-3", "phi-3.5"])
def test_generation_stops_at_end_of_turn_when_it_is_not_eos(tokenizer, tmp_path, name):
    """A real `generate` through the evaluate stage's batch function: a model that always says the
    family's end-of-turn token stops after it; stopping only at eos would run to the budget."""
    from tests.families import tiny_model_folder
    from tunewise.models import load_chat, load_model
    from tunewise.models.generate import generate_batch

    folder = tiny_model_folder(name, family_tokenizer(name, tokenizer), tmp_path / name)
    chat = load_chat(folder, model=name)
    eot = chat.tokenizer.convert_tokens_to_ids(FAMILIES[name].end_of_turn)
    assert eot != chat.tokenizer.eos_token_id
    model = load_model(folder).eval()
    head = torch.nn.Linear(model.config.hidden_size, len(chat.tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eot] = 10.0  # every next token is the end-of-turn token
    model.lm_head = head
    prompts = [chat.prompt(CHAT[:2]), chat.prompt(CHAT[1:2])]
    new = generate_batch(model, chat, prompts, max_new_tokens=12)
    assert new.tolist() == [[eot], [eot]]  # stopped at once, not at the 12-token budget
    assert [chat.text(row) for row in new.tolist()] == ["", ""]
