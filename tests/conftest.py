"""Shared fixtures: a tiny random llama with the embedded model's tokenizer, and small data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """The CPU tiers run on the CPU even on a GPU machine (their numbers and timings assume it);
    only `-m gpu` (tests/gpu, tools/gpu_smoke.sh) sees CUDA. CUDA starts lazily, so hiding the
    devices here, before any test touches it, is enough."""
    expression = config.getoption("markexpr") or ""
    if "gpu" not in expression.replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

from tests.helpers import label_rows, tiny_model, write_jsonl
from tunewise.models import load_tokenizer, resolve_base


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    """The embedded SmolLM2 as a safetensors folder (imported once into the cache)."""
    return resolve_base("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(embedded_path):
    return load_tokenizer(embedded_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_path, tokenizer) -> Path:
    """A 2-layer random llama (seconds to train) that shares the embedded model's tokenizer."""
    return tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def make_project(tmp_path, tiny_model_dir):
    """Write data + tunewise.yaml for the tiny model; returns the config path."""

    def make(rows: list | None = None, extra: str = "") -> Path:
        write_jsonl(tmp_path / "data.jsonl", rows if rows is not None else label_rows(60))
        config = tmp_path / "tunewise.yaml"
        config.write_text(
            f"""task:
  name: tiny
  system_prompt: Reply with JSON.
data:
  path: data.jsonl
  near_dup_threshold: null   # the synthetic rows are templated: near-duplicates by design
  semantic_threshold: null
model:
  base: {tiny_model_dir}
train:
  epochs: 2
  batch_size: 8
  lr: 0.01
eval:
  max_new_tokens: 8
  bootstrap_samples: 200
track: none  # MLflow (the default) is tested in test_tracking.py
{extra}""",
            encoding="utf-8",
        )
        return config

    return make


@pytest.fixture(scope="session", autouse=True)
def generation_cache(tmp_path_factory):
    """Each test session gets its own generation cache, so a test never reads outputs that an
    earlier session cached (the tiny model is seeded: its fingerprint repeats across sessions)."""
    path = tmp_path_factory.mktemp("cache") / "generations.sqlite"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("tunewise.evaluate.runner.default_path", lambda: path)
        yield path
