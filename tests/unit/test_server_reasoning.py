"""A reasoning family's answer through the server: `content` is what evaluation scores, the block
comes as `reasoning_content`, streamed or not (the split is the evaluate stage's own)."""

from __future__ import annotations

import pytest

from tunewise.deploy.server import ReasoningStream, _choice
from tunewise.models.chat import REASONING_TAGS, split_reasoning

OUTPUTS = [
    "<think>\nthe section of vim is editors\n</think>\n\n{\"section\": \"editors\"}",
    "  <think>a</think>b",
    "no reasoning here",
    "<thinking is not the tag",
    "<think>never closed",
]


@pytest.mark.parametrize("text", OUTPUTS)
def test_chat_choice_splits_like_evaluation(text):
    message = _choice("chat", 0, text, "stop", REASONING_TAGS)["message"]
    expected = split_reasoning(text)
    assert message["content"] == expected.text and message.get("reasoning_content") == expected.reasoning
    assert _choice("chat", 0, text, "stop")["message"]["content"] == text  # a family without reasoning tags


@pytest.mark.parametrize("text", OUTPUTS[:4])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_deltas_add_up_to_the_final_split(text, size):
    stream = ReasoningStream(REASONING_TAGS)
    got = {"reasoning_content": "", "content": ""}
    for start in range(0, len(text), size):
        for piece in stream.feed(text[start:start + size]):
            (field, delta), = piece.items()
            got[field] += delta
    expected = split_reasoning(text)
    assert got["content"].strip() == expected.text
    assert got["reasoning_content"].strip() == (expected.reasoning or "")
    assert REASONING_TAGS[0] not in got["content"] and REASONING_TAGS[1] not in got["content"]


def test_a_prompt_that_opens_the_block_streams_reasoning_first():
    stream = ReasoningStream(REASONING_TAGS, thinking=True)
    pieces = [p for chunk in ("step one", " step two</th", "ink>\n\nanswer") for p in stream.feed(chunk)]
    assert pieces == [{"reasoning_content": "step one"}, {"reasoning_content": " step two"},
                      {"content": "answer"}]


def test_the_server_answers_a_qwen3_chat_with_reasoning_content(tmp_path, tokenizer, monkeypatch):
    """Through HTTP: the route gives the job the family's tags; the worker's text (here a fixed one
    in place of the random model's) comes back split."""
    import json
    import urllib.request

    from tests.families import family_tokenizer, tiny_model_folder
    from tests.openai_server import running as run_app
    from tunewise.deploy.engine import Engine
    from tunewise.deploy.server import create_app

    folder = tiny_model_folder("qwen-3", family_tokenizer("qwen-3", tokenizer), tmp_path / "qwen3")
    jobs = []

    def answer(self, job):
        jobs.append(job)
        job.ids = [1, 2]
        job.done.set_result(("<think>\nvim is an editor\n</think>\n\neditors", "stop"))
        return job

    monkeypatch.setattr(Engine, "submit", answer)
    with run_app(create_app(str(folder), {}), "tunewise serve") as url:
        body = {"model": "base", "messages": [{"role": "user", "content": "Package: vim"}], "max_tokens": 8}
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            message = json.loads(response.read())["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "editors", "reasoning_content": "vim is an editor"}
    assert jobs[0].reasoning == REASONING_TAGS and not jobs[0].thinking  # enable_thinking: false by default
