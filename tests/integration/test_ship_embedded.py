"""Ship the demo task's adapter (embedded model, `pytest -m integration`): export it merged and as
GGUF with parity checks, then serve it next to a second adapter over real HTTP, answering what
the evaluate stage recorded, and promote, canary and roll it back through the registry."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tests.unit.test_serve_registry import fake_run
from tests.unit.test_server import client, make_adapter, running
from tunewise.config import load_config
from tunewise.deploy import create_app
from tunewise.deploy.export import export_run
from tunewise.deploy.registry import Registry
from tunewise.evaluate.arms import build_prompts
from tunewise.data import load_split
from tunewise.evaluate import runner  # (its test_items would be collected as a test)
from tunewise.models import load_tokenizer, resolve_base
from tunewise.runs import read_jsonl

pytestmark = pytest.mark.integration
KEY = "ship-key"
N = 8  # test items checked over HTTP


@pytest.fixture(scope="module")
def exported(demo_run, tmp_path_factory):
    from rich.console import Console

    run, _ = demo_run
    out = tmp_path_factory.mktemp("export")
    return export_run(run.root, out, merge=True, gguf=True, quant="q8_0", console=Console(quiet=True))


def test_export_merged_and_gguf_match_the_adapter(demo_run, exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, verdict = demo_run
    base = resolve_base("smollm2-135m-instruct")
    merged = AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), run.adapter)
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = unmerged(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-3)  # fp32 sums in another order
        gguf = AutoModelForCausalLM.from_pretrained(exported["gguf"].parent, gguf_file=exported["gguf"].name,
                                                    dtype=torch.float32)
        # q8_0 keeps 8 bits per weight: logits move a little, and the next token only where the
        # merged model itself nearly ties (measured on random ids: mean 0.2, max 2.6 of logits ~ +-40)
        diff = (gguf(ids).logits - want).abs()
        assert diff.mean() < 0.5 and diff.max() < 4.0, (diff.mean(), diff.max())
        config = load_config(run.config)
        tokenizer = load_tokenizer(exported["merged"])
        test = runner.test_items(run, config.eval.max_test)[:N]
        for messages in build_prompts("finetuned", test, config.task.system_prompt, [[]] * N):
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]
            ours, theirs = merged(prompt).logits[0, -1], gguf(prompt).logits[0, -1]
            top2 = ours.topk(2).values
            assert ours.argmax() == theirs.argmax() or top2[0] - top2[1] < 0.5
    card = exported["card"].read_text()
    assert verdict.decision.value in card and "smollm2-135m-instruct" in card
    stops = json.loads((exported["merged"] / "generation_config.json").read_text())["eos_token_id"]
    tokenizer = load_tokenizer(exported["merged"])
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (stops if isinstance(stops, list) else [stops])


def test_served_adapter_answers_what_was_evaluated_and_follows_the_registry(demo_run, tmp_path):
    run, verdict = demo_run
    config = load_config(run.config)
    test = runner.test_items(run, config.eval.max_test)[:N]
    prompts = build_prompts("finetuned", test, config.task.system_prompt, [[]] * N)
    recorded = [row["output"] for row in read_jsonl(run.predictions("finetuned"))][:N]
    base = resolve_base(config.model.base)
    budget = runner.max_new_tokens(config.eval.max_new_tokens, load_tokenizer(base), load_split(run.split("train")))  # the evaluate stage's
    other = make_adapter(base, load_tokenizer(base), tmp_path / "other", seed=3)

    registry = Registry(tmp_path / "registry")
    registry.add("sections", run.root)
    retrained = make_adapter(base, load_tokenizer(base), tmp_path / "v2", seed=4)  # stands in for a retrain
    registry.add("sections", fake_run(tmp_path / "run2", retrained, verdict.decision.value))
    force = verdict.decision != "SHIP"
    registry.promote("sections", 1, force=force)
    app = create_app(config.model.base, {"other": other}, registry=registry, api_key=KEY)
    with running(app) as url:
        api = client(url, KEY)
        assert {(m.id, getattr(m, "parent", None)) for m in api.models.list().data} >= {
            ("base", None), ("other", "base"), ("sections", "base")}

        def ask(model: str, messages) -> tuple[str, str]:
            reply = api.chat.completions.create(model=model, messages=messages, max_tokens=budget, temperature=0)
            return reply.model, reply.choices[0].message.content

        served = [ask("sections", p)[1] for p in prompts]
        assert served == recorded  # token for token what the evaluate stage recorded
        assert [ask("other", p)[1] for p in prompts[:2]] != served[:2]  # the second adapter is its own model

        registry.canary("sections", 2, 0.5, force=force)
        seen = Counter(ask("sections", prompts[0]) for _ in range(16))
        assert {model for model, _ in seen} == {"sections@v1", "sections@v2"}
        assert {text for model, text in seen if model == "sections@v1"} == {recorded[0]}
        registry.promote("sections", 2, force=force)
        assert {ask("sections", prompts[0])[0] for _ in range(4)} == {"sections@v2"}
        registry.rollback("sections")  # one command, no restart
        assert {ask("sections", prompts[0])[0] for _ in range(4)} == {"sections@v1"}
