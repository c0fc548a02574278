"""A small run of the demo task on the embedded model, trained once per test session."""

from pathlib import Path

import pytest
from rich.console import Console

from tunewise.pipeline import run_pipeline

DEMO = Path(__file__).parents[2] / "examples" / "debian-sections" / "tunewise.yaml"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(run, verdict) of the demo config on 160 examples, one epoch, 16 test items. Generation at
    batch size 1, the shape a lone request has in `tunewise serve`: bf16 results depend on the
    batch's padding, and the ship test checks the served answers token for token."""
    overrides = ["data.max_examples=160", "train.epochs=1", "eval.max_test=24", "eval.bootstrap_samples=500",
                 "eval.batch_size=1", "eval.forgetting=false"]
    return run_pipeline(DEMO, overrides, tmp_path_factory.mktemp("demo") / "runs", Console(quiet=True))
