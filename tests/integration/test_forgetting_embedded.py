"""The regression set on the embedded SmolLM2-135M-Instruct: its checks are passable by a real
small model, so a fine-tune's drop is measurable (`pytest -m integration`)."""

import time

import pytest
from rich.console import Console

from tunewise.evaluate import forgetting
from tunewise.models import compute_dtype, load_chat, load_model
from tunewise.models.generate import generate

pytestmark = pytest.mark.integration


def test_embedded_base_model_scores_in_a_sane_band(embedded_path):
    items = forgetting.load_regression_set()
    # The whole set takes minutes on a CPU; the first two items of every category make one
    # batch (under a minute) that still touches every category and most check kinds.
    categories = list(dict.fromkeys(it.category for it in items))
    sample = [it for c in categories for it in [it for it in items if it.category == c][:2]]
    assert len(sample) <= 16
    model = load_model(embedded_path, dtype=compute_dtype())
    chat = load_chat(embedded_path, model="smollm2-135m-instruct")
    start = time.perf_counter()
    outputs = generate(model, chat, forgetting.prompts(sample), max_new_tokens=forgetting.MAX_NEW_TOKENS,
                       batch_size=16, console=Console(quiet=True), label="regression set")
    seconds = time.perf_counter() - start
    scores = forgetting.score(sample, outputs)
    accuracy = sum(scores) / len(scores)
    report = "\n".join(f"{s:.0f} {it.id}: {o[:80]!r}" for it, o, s in zip(sample, outputs, scores))
    assert all(outputs), report
    assert 0.25 <= accuracy < 1.0, f"accuracy {accuracy:.2f} in {seconds:.0f}s\n{report}"
