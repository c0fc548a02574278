"""Run control on the tiny random llama: checkpoints, kill -9 and resume to the same weights,
settings that changed since the checkpoint, NaN loss, early stopping."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tests.helpers import label_rows, run_cli, write_jsonl
from tunewise.config import load_config
from tunewise.errors import TunewiseError
from tunewise.runs import RunDir, read_json, sha256_file
from tunewise.settings import track_settings, train_settings
from tunewise.train import loop
from tunewise.train import plan as plan_module
from tunewise.train.checkpoint import FILES, list_checkpoints, read_trainer_state

QUIET = Console(quiet=True)
# 48 train examples, batch 4: 12 steps an epoch, 24 in all; val every 6 steps, checkpoint every 3
TOTAL_STEPS = 24


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> Path:
    """A run folder with its data split, not trained yet (each test trains a copy)."""
    from tunewise.pipeline import start_run

    root = tmp_path_factory.mktemp("resume")
    write_jsonl(root / "data.jsonl", label_rows(60))
    (root / "tunewise.yaml").write_text(
        f"task: {{name: tiny, system_prompt: Reply with JSON.}}\n"
        f"data: {{path: data.jsonl, near_dup_threshold: null, semantic_threshold: null}}\n"
        f"model: {{base: {tiny_model_dir}}}\n"
        "lora: {r: 4, dropout: 0.1}\n"  # dropout draws from the RNG every step: resume must restore it
        "train: {epochs: 2, batch_size: 4, lr: 0.01, save_every: 3, keep_checkpoints: 2, patience: null}\n"
        "track: none\n"
    )
    run, _ = start_run(root / "tunewise.yaml", [], root / "runs", QUIET)
    return run.root


def copy_run(prepared: Path, tmp_path: Path, name: str = "run") -> RunDir:
    return RunDir(Path(shutil.copytree(prepared, tmp_path / name)))


def train(run: RunDir) -> loop.TrainSummary:
    config = load_config(run.config)
    return loop.train_model(run, train_settings(config), QUIET, track_settings(config))


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> tuple[RunDir, loop.TrainSummary]:
    run = copy_run(prepared, tmp_path_factory.mktemp("uninterrupted"))
    return run, train(run)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], msg=lambda m: f"{key}: {m}")


def val_losses(run: RunDir) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, run.train_log.read_text().splitlines()) if "val_loss" in r]


def test_checkpoints_every_n_steps_keep_the_last_k_and_hold_everything(uninterrupted, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, summary = uninterrupted
    assert summary.steps == TOTAL_STEPS and summary.resumed_from_step is None and not summary.stopped_early
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best", "step-000021", "step-000024"]
    older = run.checkpoints / "step-000021"
    assert all((older / f).exists() for f in FILES)
    state = read_trainer_state(older)
    # step 21 of 12-step epochs: the next step is epoch 1's batch 9
    assert (state.step, state.epoch, state.next_batch) == (21, 1, 9)
    assert [r["step"] for r in state.log] == list(range(22)) and state.fingerprint["train.lr"] == 0.01
    assert state.best_step <= 21 and state.best_val == min(r["val_loss"] for r in state.log if "val_loss" in r)
    optimizer = torch.load(older / "optimizer.pt", weights_only=True)
    assert optimizer["state"][0]["step"] == 21
    # a step checkpoint is a plain PEFT adapter too
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), older)
    assert_same_weights(run.adapter, run.checkpoints / "best")
    assert read_json(run.adapter / "tunewise.json")["step"] == summary.best_step


# The child trains the real recipe with each forward pass slowed by 0.1 s, so that SIGKILL
# lands part-way (at a random moment, writing a checkpoint or not) rather than after the end.
CHILD = """
import sys, time
from rich.console import Console
from tunewise.config import load_config
from tunewise.runs import open_run_dir
from tunewise.settings import track_settings, train_settings
from tunewise.train import loop

real = loop.supervised_loss
def slow(*args, **kwargs):
    time.sleep(0.1)
    return real(*args, **kwargs)
loop.supervised_loss = slow
run = open_run_dir(sys.argv[1])
config = load_config(run.config)
loop.train_model(run, train_settings(config), Console(quiet=True), track_settings(config))
"""


def test_kill_9_part_way_then_resume_ends_with_the_same_weights(prepared, uninterrupted, tmp_path):
    reference, expected = uninterrupted
    run = copy_run(prepared, tmp_path)
    log = tmp_path / "child.log"
    with log.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run.root)], stdout=out, stderr=out)
    deadline = time.monotonic() + 180
    try:
        while not list_checkpoints(run.checkpoints):
            assert child.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        delay = random.uniform(0, 0.6)
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    newest = list_checkpoints(run.checkpoints)[-1]
    killed_at = read_trainer_state(newest).step
    print(f"killed {delay:.2f} s after the first checkpoint; newest complete checkpoint: step {killed_at}")
    assert 3 <= killed_at < TOTAL_STEPS and not run.train_summary.exists()
    (run.checkpoints / ".step-000099.tmp").mkdir(exist_ok=True)  # as a kill mid-write leaves it
    (run.checkpoints / ".step-000099.tmp" / "adapter_model.safetensors").write_bytes(b"half")

    resumed = train(run)

    assert resumed.resumed_from_step == killed_at
    assert (resumed.steps, resumed.best_step) == (expected.steps, expected.best_step)
    assert_same_weights(run.checkpoints / "step-000024", reference.checkpoints / "step-000024")
    assert_same_weights(run.adapter, reference.adapter)
    torch.testing.assert_close(val_losses(run), val_losses(reference))
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best", "step-000021", "step-000024"]


def crash_at_step(monkeypatch, step: int, error: Exception | None = None) -> None:
    """The training forward pass of `step` returns NaN (or raises `error`)."""
    calls = {"n": 0}
    real = loop.supervised_loss

    def patched(causal_lm, **batch):
        loss, n = real(causal_lm, **batch)
        if causal_lm.training:
            calls["n"] += 1
            if calls["n"] == step:
                if error is not None:
                    raise error
                return loss * float("nan"), n
        return loss, n

    monkeypatch.setattr(loop, "supervised_loss", patched)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
        prepared, uninterrupted, tmp_path, monkeypatch):
    run = copy_run(prepared, tmp_path)
    crash_at_step(monkeypatch, 9)  # step 9 would write a checkpoint: it must not
    with pytest.raises(TunewiseError) as err:
        train(run)
    message = str(err.value)
    for expected in ("training loss became nan at step 9", "train.lr = 0.01", "learning rate", "overflow",
                     "bad data row", str(run.split("train")), "step-000006", "lower train.lr",
                     f"tunewise train --resume {run.root}"):
        assert expected in message, (expected, message)
    assert [p.name for p in list_checkpoints(run.checkpoints)] == ["step-000003", "step-000006"]
    assert read_json(run.checkpoints / "best" / "tunewise.json")["step"] <= 6
    assert not run.adapter.exists() and not run.train_summary.exists()

    monkeypatch.undo()  # the cause was transient: resume from the last good checkpoint
    resumed = train(run)
    assert resumed.resumed_from_step == 6
    reference, _ = uninterrupted
    assert_same_weights(run.checkpoints / "step-000024", reference.checkpoints / "step-000024")
    assert_same_weights(run.adapter, reference.adapter)




def test_resume_where_less_memory_is_free_takes_the_same_steps(prepared, tmp_path, monkeypatch):
    """The memory plan halves the micro-batch on the second machine; the checkpoint still resumes
    (only the global batch is in the fingerprint) and every step takes the same examples, so the
    weights end as an uninterrupted run's, up to float summation order (dropout off: its masks
    depend on the micro-batch's shape)."""
    def without_dropout(name: str) -> RunDir:
        run = copy_run(prepared, tmp_path, name)
        run.config.write_text(run.config.read_text().replace("dropout: 0.1", "dropout: 0.0"))
        return run

    reference, run = without_dropout("reference"), without_dropout("run")
    expected = train(reference)
    real_save = loop.save_checkpoint

    def save_then_stop(folder, model, optimizer, scheduler, state, **kwargs):  # the first machine stops at 9
        real_save(folder, model, optimizer, scheduler, state, **kwargs)
        if state.step >= 9:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(run)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert read_trainer_state(list_checkpoints(run.checkpoints)[-1]).step == 9
    plans = []

    def tight(tr, batch_size, grad_accum, *rest):  # the second machine: only half the micro-batch fits
        plans.append((batch_size // 2, grad_accum * 2))
        return batch_size // 2, grad_accum * 2, False, " (halved to fit in memory)"

    monkeypatch.setattr(plan_module, "memory_plan", tight)
    summary = train(run)
    assert plans == [(2, 2)] and summary.resumed_from_step == 9 and summary.steps == expected.steps
    assert val_losses(run) == pytest.approx(val_losses(reference), rel=1e-4)
    wa, wb = (load_file(r.adapter / "adapter_model.safetensors") for r in (run, reference))
    for key in wa:  # bf16 autocast rounds other paddings differently: measured up to 5.5e-5 apart
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-2, atol=2e-4)
    assert max(wa[k].abs().max().item() for k in wa if "lora_B" in k) > 1e-2  # B starts at 0: far above the tolerance


def test_resume_with_changed_training_settings_exits_2_naming_the_keys(prepared, tmp_path, monkeypatch, capsys):
    from tunewise import pipeline

    run = copy_run(prepared, tmp_path)
    with monkeypatch.context() as patch:
        crash_at_step(patch, 5, RuntimeError("simulated crash"))
        with pytest.raises(RuntimeError):
            train(run)
    assert [p.name for p in list_checkpoints(run.checkpoints)] == ["step-000003"]
    text = run.config.read_text()
    run.config.write_text(text.replace("lr: 0.01", "lr: 0.02").replace("r: 4", "r: 8").replace("seed: 0\n", "seed: 1\n"))
    assert load_config(run.config).data.seed == 1 and load_config(run.config).train.seed == 1
    before = {p: sha256_file(p) for p in run.root.rglob("*") if p.is_file() and p != run.status}
    for name in ("decide", "baseline"):  # done as far as this test cares: straight on to train
        monkeypatch.setitem(pipeline.STAGES, name, (lambda *a: None, lambda r, c: True))

    code, output = run_cli(monkeypatch, capsys, "run", "--resume", str(run.root))

    assert code == 2 and "Traceback" not in output, output
    assert "lora.r, train.lr, train.seed" in output and "0.01" in output and "0.02" in output
    assert "data.seed" not in output  # the split is already on disk: its seed changes nothing here
    assert "step-000003" in output and str(run.config) in output
    after = {p: sha256_file(p) for p in run.root.rglob("*") if p.is_file() and p != run.status}
    assert after == before
    assert read_json(run.status)["state"] == "failed"


def test_early_stopping_keeps_the_best_and_a_resume_does_not_train_past_it(prepared, tmp_path, monkeypatch):
    run = copy_run(prepared, tmp_path)
    text = run.config.read_text()
    run.config.write_text(text.replace("patience: null", "patience: 2"))
    # validations at steps 0, 6, 12, 18: best at 6, then two without a new best
    losses = iter([5.0, 4.0, 4.5, 4.6])
    monkeypatch.setattr(loop.SFTObjective, "validate", lambda *args: {"val_loss": next(losses)})
    summary = train(run)
    assert summary.stopped_early and (summary.steps, summary.best_step, summary.best_val_loss) == (18, 6, 4.0)
    assert read_json(run.adapter / "tunewise.json")["step"] == 6
    assert_same_weights(run.adapter, run.checkpoints / "best")
    with pytest.raises(AssertionError):
        assert_same_weights(run.adapter, run.checkpoints / "step-000018")

    # killed after the last checkpoint but before the adapter was written: nothing more to train
    shutil.rmtree(run.adapter)
    run.train_summary.unlink()
    monkeypatch.setattr(loop.SFTObjective, "validate", lambda *args: pytest.fail("validated again"))
    again = train(run)
    assert (again.resumed_from_step, again.steps, again.best_step) == (18, 18, 6)
    assert_same_weights(run.adapter, run.checkpoints / "best")


def test_patience_counts_validations_since_the_best():
    log = [{"step": 0, "val_loss": 3.0}, {"step": 1, "train_loss": 1.0}, {"step": 2, "val_loss": 2.0},
           {"step": 4, "val_loss": 2.5}, {"step": 6, "val_loss": 2.6}]
    assert loop.patience_ran_out(log, best_step=2, patience=2)
    assert not loop.patience_ran_out(log, best_step=2, patience=3)
    assert not loop.patience_ran_out(log, best_step=2, patience=None)
