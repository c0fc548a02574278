"""`tunewise sweep` through the real entry point on the tiny random llama: one trial folder per
grid point, one data split, the argmin of validation loss wins, resume and failures."""

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import run_cli
from tunewise.config import load_config
from tunewise.runs import read_json, sha256_file

NO_TRACKING = "track: none\n"
GRID_2X2 = ["--grid", "train.lr=0.001,0.05", "--grid", "lora.r=4,8", "--set", "train.epochs=1"]




def sweep(monkeypatch, capsys, config: Path, *args) -> tuple[Path, dict, str]:
    """Run `tunewise sweep` into <project>/runs; returns (sweep folder, sweep.json, output)."""
    runs = config.parent / "runs"
    code, output = run_cli(monkeypatch, capsys, "sweep", "-c", str(config), "--runs", str(runs), *args)
    assert code == 0, output
    (root,) = runs.iterdir()
    return root, read_json(root / "sweep.json"), output


def trial_dir(root: Path, trial: dict) -> Path:
    return root / "trials" / trial["name"]


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_grid_point_is_a_trial_with_its_settings_and_the_argmin_wins(tmp_path, make_project, monkeypatch, capsys):
    root, result, output = sweep(monkeypatch, capsys, make_project(extra=NO_TRACKING), *GRID_2X2)
    trials = result["trials"]
    assert root.name.endswith("-tiny-sweep") and result["state"] == "complete"
    assert {(t["values"]["train.lr"], t["values"]["lora.r"]) for t in trials} == {
        (0.001, 4), (0.001, 8), (0.05, 4), (0.05, 8)}
    summaries = {}
    for trial in trials:
        folder = trial_dir(root, trial)
        r, lr = trial["values"]["lora.r"], trial["values"]["train.lr"]
        assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"] == r
        weights = load_file(folder / "adapter" / "adapter_model.safetensors")
        assert {w.shape[0] for k, w in weights.items() if "lora_A" in k} == {r}  # the trained adapter has rank r
        config = load_config(folder / "config.yaml")
        assert (config.train.lr, config.lora.r, config.train.epochs) == (lr, r, 1)
        summaries[trial["name"]] = read_json(folder / "train_summary.json")
        assert trial["status"] == "done" and math.isfinite(trial["best_val_loss"])
        assert trial["best_val_loss"] == summaries[trial["name"]]["best_val_loss"]
        assert read_json(folder / "status.json")["state"] == "partial"  # trained; `run --resume` does the rest
    best = min(summaries, key=lambda name: (summaries[name]["best_val_loss"], summaries[name]["steps"]))
    assert result["winner"] == best
    assert len({s["best_val_loss"] for s in summaries.values()}) == 4  # the settings made a difference
    assert f"tunewise run --resume {root / 'trials' / best}" in output.replace("\n", "")
    assert [line for line in output.splitlines() if line.startswith("trial ")] == [
        f"trial {k}/4: {' '.join(t['overrides'])}" for k, t in enumerate(trials, 1)]


def test_data_is_prepared_once_and_every_trial_trains_on_the_same_split(tmp_path, make_project, monkeypatch, capsys):
    from tunewise import pipeline

    calls = []
    real = pipeline.prepare
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    root, result, _ = sweep(monkeypatch, capsys, make_project(extra=NO_TRACKING),
                            "--grid", "lora.r=4,8,16", "--set", "train.epochs=1")
    assert len(calls) == 1
    folders = [trial_dir(root, t) for t in result["trials"]]
    versions = {read_json(f / "data" / "manifest.json")["version"] for f in folders}
    assert versions == {result["dataset_version"]}
    for split in ("train", "val", "test"):
        assert len({(f / "data" / f"{split}.jsonl").read_bytes() for f in folders}) == 1
    assert all((f / "decision.json").exists() for f in folders)  # decide ran once, copied with the data


def test_sweep_html_has_the_table_and_two_inline_plots_and_escapes_user_text(tmp_path, make_project, monkeypatch,
                                                                               capsys):
    root, result, _ = sweep(monkeypatch, capsys, make_project(extra=NO_TRACKING), "--grid", "train.lr=0.001,0.05",
                            "--set", "train.epochs=1", "--set", "task.name=<script>alert(1)</script>")
    html = (root / "sweep.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    for trial in result["trials"]:
        assert f"<td>{trial['name']}</td>" in html
        assert f'<td class="num">{trial["best_val_loss"]:.4f}</td>' in html
    assert '<tr class="best">\n  <td>' + result["winner"] + "</td>" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.mark.parametrize("grid, key", [("data.path=x", "data.path"), ("train.lr=abc", "train.lr"),
                                       ("notakey=1", "notakey"), ("train.lr=0.01,1e-2", "train.lr")])
def test_bad_grid_exits_2_naming_the_key_and_creates_nothing(tmp_path, make_project, monkeypatch, capsys, grid, key):
    config = make_project(extra=NO_TRACKING)
    code, output = run_cli(monkeypatch, capsys, "sweep", "-c", str(config), "--runs", str(tmp_path / "runs"),
                           "--grid", "lora.r=4,8", "--grid", grid)
    assert code == 2, output
    assert f"'{key}'" in output and "fix:" in output and "Traceback" not in output
    assert not (tmp_path / "runs").exists()


def test_resume_trains_only_the_unfinished_trial(tmp_path, make_project, monkeypatch, capsys):
    root, before, _ = sweep(monkeypatch, capsys, make_project(extra=NO_TRACKING),
                            "--grid", "lora.r=4,8", "--set", "train.epochs=1")
    first, second = (trial_dir(root, t) for t in before["trials"])
    (second / "train_summary.json").unlink()  # killed before the end of training
    for path in sorted((second / "adapter").iterdir()):
        path.unlink()
    (second / "adapter").rmdir()
    untouched = folder_state(first)

    code, output = run_cli(monkeypatch, capsys, "sweep", "--resume", str(root))

    assert code == 0, output
    assert "trial 1/2: lora.r=4 (trained already)" in output and "trial 2/2: lora.r=8\n" in output
    assert folder_state(first) == untouched
    assert json.loads((second / "adapter" / "adapter_config.json").read_text())["r"] == 8
    after = read_json(root / "sweep.json")
    assert after["state"] == "complete" and [t["status"] for t in after["trials"]] == ["done", "done"]
    assert after["trials"][1]["best_val_loss"] == read_json(second / "train_summary.json")["best_val_loss"]
    assert after["winner"] == before["winner"]


def test_ctrl_c_leaves_a_consistent_sweep_json_and_resume_finishes(tmp_path, make_project, monkeypatch, capsys):
    from tunewise import pipeline

    real = pipeline.STAGES["train"]
    calls = []

    def interrupted_second(run, config, console):
        calls.append(run.root.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real[0](run, config, console)

    monkeypatch.setitem(pipeline.STAGES, "train", (interrupted_second, real[1]))
    config = make_project(extra=NO_TRACKING)
    code, output = run_cli(monkeypatch, capsys, "sweep", "-c", str(config), "--runs", str(tmp_path / "runs"),
                           "--grid", "lora.r=4,8,16", "--set", "train.epochs=1")
    assert code == 130, output
    (root,) = (tmp_path / "runs").iterdir()
    state = read_json(root / "sweep.json")
    assert state["state"] == "interrupted"
    assert [t["status"] for t in state["trials"]] == ["done", "interrupted", "pending"]
    assert state["winner"] == "trial-01"  # the best so far
    assert read_json(root / "trials" / "trial-02" / "status.json")["state"] == "interrupted"

    monkeypatch.setitem(pipeline.STAGES, "train", real)
    code, output = run_cli(monkeypatch, capsys, "sweep", "--resume", str(root))
    assert code == 0, output
    state = read_json(root / "sweep.json")
    assert state["state"] == "complete" and [t["status"] for t in state["trials"]] == ["done"] * 3
    assert calls == ["trial-01", "trial-02"]  # trial 1 was not trained again


def test_a_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path, make_project, monkeypatch, capsys):
    root, result, output = sweep(monkeypatch, capsys, make_project(extra=NO_TRACKING),
                                 "--grid", "lora.target_modules=[nope],attention", "--set", "train.epochs=1")
    failed, trained = result["trials"]
    assert failed["status"] == "failed" and "nope" in failed["error"] and "best_val_loss" not in failed
    assert trained["status"] == "done" and result["winner"] == trained["name"]
    assert read_json(root / "trials" / failed["name"] / "status.json")["state"] == "failed"
    html = (root / "sweep.html").read_text()
    assert "failed: " in html and "nope" in html
