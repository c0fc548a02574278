"""Data-parallel training: `torchrun --nproc_per_node 2 -m tunewise train` on CPU (gloo) gives the
same loss curve and weights as one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tests.helpers import label_rows, write_jsonl
from tunewise.config import load_config
from tunewise.runs import RunDir
from tunewise.settings import track_settings, train_settings
from tunewise.train import loop


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> Path:
    from tunewise.pipeline import start_run

    root = tmp_path_factory.mktemp("ddp")
    write_jsonl(root / "data.jsonl", label_rows(60))
    (root / "tunewise.yaml").write_text(
        f"task: {{name: tiny, system_prompt: Reply with JSON.}}\n"
        f"data: {{path: data.jsonl, near_dup_threshold: null, semantic_threshold: null}}\n"
        f"model: {{base: {tiny_model_dir}}}\n"
        "lora: {r: 4, dropout: 0.0}\n"  # dropout draws differ per process; without it the math is identical
        # 48 examples, 5 rows a micro-batch x 2: odd rows per process, last micro-batch of 3 rows
        "train: {epochs: 2, batch_size: 5, grad_accum: 2, lr: 0.01, precision: fp32, patience: null}\n"
        "track: none\n"
    )
    run, _ = start_run(root / "tunewise.yaml", [], root / "runs", Console(quiet=True))
    return run.root


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(prepared, tmp_path):
    single = RunDir(Path(shutil.copytree(prepared, tmp_path / "single")))
    double = Path(shutil.copytree(prepared, tmp_path / "double"))
    config = load_config(single.config)
    loop.train_model(single, train_settings(config), Console(quiet=True), track_settings(config))

    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tunewise", "train",
                           "--resume", str(double)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    one, two = log(single.root), log(double)
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) > 8
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a, b)
    assert json.loads((double / "train_summary.json").read_text())["world_size"] == 2
    ours = load_file(double / "adapter" / "adapter_model.safetensors")
    reference = load_file(single.adapter / "adapter_model.safetensors")
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-5)
    assert "train done" in done.stdout  # the main process reports once
    assert done.stdout.count("train done") == 1
