"""Bad input through the real entry point: a short message, exit code 2, no traceback, no run."""

import subprocess
import sys

import pytest

from tests.helpers import label_rows, run_cli, write_jsonl


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_data", "data file not found"),
        ("not_json", "none of the 1 rows"),
        ("unknown_format", "unknown format"),
        ("empty_strings", "field 'content' is empty"),
        ("empty_file", "data file is empty"),
        ("misspelled_key", "train.learning_rate"),
        ("bad_model", "did you mean 'smollm2-135m-instruct'"),
        ("unreadable", "this is a folder"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_run(tmp_path, monkeypatch, capsys, make_project, case, expect):
    rows = label_rows(30)
    if case == "not_json":
        rows = ["{this is not json"]
    elif case == "unknown_format":
        rows = [{"question": "q", "answer": "a"}] * 3
    elif case == "empty_strings":
        rows = [{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}]
    elif case == "empty_file":
        rows = []
    config = make_project(rows)
    if case == "misspelled_key":
        config.write_text(config.read_text().replace("  lr: 0.01\n", "  learning_rate: 0.1\n"))
    if case == "missing_data":
        (tmp_path / "data.jsonl").unlink()
    if case == "bad_model":
        config.write_text(config.read_text().replace("base: ", "base: smollm2-135m-instuct #"))
    if case == "unreadable":
        (tmp_path / "data.jsonl").unlink()
        (tmp_path / "data.jsonl").mkdir()
    code, output = run_cli(monkeypatch, capsys, "run", "-c", str(config), "--runs", str(tmp_path / "runs"))
    assert code == 2
    assert expect in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "runs").exists()


def test_misspelled_key_names_file_and_line(tmp_path, monkeypatch, capsys, make_project):
    config = make_project()
    config.write_text(config.read_text().replace("  lr: 0.01\n", "  learning_rate: 0.1\n"))
    code, output = run_cli(monkeypatch, capsys, "run", "-c", str(config))
    assert code == 2 and "tunewise.yaml:" in output and "unknown key" in output and "valid keys" in output


def test_resume_of_a_non_run_folder(tmp_path, monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "run", "--resume", str(tmp_path))
    assert code == 2 and "not a tunewise run folder" in output


def test_init_writes_a_valid_project_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    from tunewise.config import load_config

    code, _ = run_cli(monkeypatch, capsys, "init", str(tmp_path / "p"))
    assert code in (0, None)
    config = load_config(tmp_path / "p" / "tunewise.yaml")
    assert config.data.path == str(tmp_path / "p" / "packages.jsonl")
    assert "#" in (tmp_path / "p" / "tunewise.yaml").read_text()  # commented
    code, output = run_cli(monkeypatch, capsys, "init", str(tmp_path / "p"))
    assert code == 2 and "would overwrite" in output


def test_decide_from_answers_file(tmp_path, monkeypatch, capsys):
    answers = tmp_path / "a.yaml"
    answers.write_text("problem: knowledge\nchanges_often: true\nn_examples: 50\nprompt_tried: false\n")
    code, output = run_cli(monkeypatch, capsys, "decide", "--answers", str(answers), "-o", str(tmp_path / "d.json"))
    assert code in (0, None) and "retrieval" in output.lower()
    assert '"rag"' in (tmp_path / "d.json").read_text()
    answers.write_text("problem: knowledge\nchanges_often: true\nn_examples: 50\nprompt_tried: false\nrequests_per_dya: 5\n")
    code, output = run_cli(monkeypatch, capsys, "decide", "--answers", str(answers))
    assert code == 2 and "requests_per_dya" in output and "a.yaml" in output and "Traceback" not in output


def test_installed_entry_point_reports_without_traceback(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", ["not json"])
    (tmp_path / "c.yaml").write_text("data: {path: d.jsonl}\n")
    result = subprocess.run(
        [sys.executable, "-m", "tunewise.cli", "run", "-c", str(tmp_path / "c.yaml")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "d.jsonl" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()


def test_data_check_writes_nothing_and_exits_1_on_rejected_rows(tmp_path, monkeypatch, capsys):
    rows = [{"question": f"what is item {i}?", "answer": f"item {i} is a thing of kind {i % 3}"} for i in range(40)]
    path = write_jsonl(tmp_path / "q.jsonl", rows + ["{broken"])
    before = sorted(p.name for p in tmp_path.iterdir())
    code, output = run_cli(monkeypatch, capsys, "data", "check", str(path), "--map", "question=user,answer=assistant",
                           "--no-semantic")
    assert code == 1 and "q.jsonl:41" in output and "not valid JSON" in output
    assert "<|im_start|>user" in output  # the preview renders rows as they will be trained
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    path.write_text(path.read_text().replace("{broken\n", ""))
    code, _ = run_cli(monkeypatch, capsys, "data", "check", str(path), "--map", "question=user,answer=assistant",
                      "--no-semantic")
    assert code in (0, None)


def test_data_prepare_writes_splits_manifest_and_report(tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", label_rows(50))
    out = tmp_path / "prepared"
    code, output = run_cli(monkeypatch, capsys, "data", "prepare", str(path), "-o", str(out), "--no-semantic",
                           "--split", "random")
    assert code in (0, None), output
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "rejected.jsonl", "manifest.json", "report.html"):
        assert (out / name).exists(), name
    code, output = run_cli(monkeypatch, capsys, "data", "prepare", str(path), "-o", str(out), "--split", "group")
    assert code == 2 and "--group-key" in output


def test_eval_of_a_folder_that_is_not_a_trained_run(tmp_path, monkeypatch, capsys, make_project):
    code, output = run_cli(monkeypatch, capsys, "eval", str(tmp_path))
    assert code == 2 and "not a tunewise run folder" in output
    from rich.console import Console

    from tunewise.pipeline import start_run

    run, _ = start_run(make_project(), [], tmp_path / "runs", Console(quiet=True))
    code, output = run_cli(monkeypatch, capsys, "eval", str(run.root))
    assert code == 2 and "needs the output of train first" in output and "Traceback" not in output


def test_missing_api_key_variable_is_named(monkeypatch):
    from tunewise.config import EndpointConfig
    from tunewise.errors import TunewiseError
    from tunewise.evaluate.runner import endpoint_of

    monkeypatch.delenv("TW_TEST_KEY", raising=False)
    cfg = EndpointConfig(name="api", url="http://127.0.0.1:9/v1/", model="m", api_key_env="TW_TEST_KEY")
    with pytest.raises(TunewiseError) as err:
        endpoint_of(cfg, "eval.endpoints[api]")
    assert "TW_TEST_KEY is not set" in str(err.value) and "eval.endpoints[api].api_key_env" in str(err.value)
    monkeypatch.setenv("TW_TEST_KEY", "sk-1")
    endpoint = endpoint_of(cfg, "eval.endpoints[api]")
    assert endpoint.api_key == "sk-1" and endpoint.url == "http://127.0.0.1:9/v1" and "sk-1" not in repr(endpoint)


def test_ship_commands_refuse_bad_input_with_exit_2(tmp_path, monkeypatch, capsys):
    registry = ["--registry", str(tmp_path / "reg")]
    code, out = run_cli(monkeypatch, capsys, "registry", "promote", "sections", *registry)
    assert code == 2 and "the registry is empty" in out.lower() and "Traceback" not in out
    code, out = run_cli(monkeypatch, capsys, "registry", "add", "../x", str(tmp_path), *registry)
    assert code == 2 and "name" in out
    code, out = run_cli(monkeypatch, capsys, "registry", "add", "sections", str(tmp_path / "nope"), *registry)
    assert code == 2 and "nope" in out
    code, out = run_cli(monkeypatch, capsys, "export", str(tmp_path))
    assert code == 2 and "--merge" in out
    code, out = run_cli(monkeypatch, capsys, "serve", "--adapter", "no-equals-sign", "--no-registry")
    assert code == 2 and "NAME=FOLDER" in out
    code, out = run_cli(monkeypatch, capsys, "serve", "--adapter", f"a={tmp_path / 'missing'}", "--no-registry")
    assert code == 2 and "no such folder" in out
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    code, out = run_cli(monkeypatch, capsys, "serve", "--api-key-env", "NO_SUCH_KEY_VAR", "--no-registry")
    assert code == 2 and "NO_SUCH_KEY_VAR" in out
    code, out = run_cli(monkeypatch, capsys, "registry", "list", *registry)
    assert code in (0, None) and "empty" in out


def test_serve_with_vllm_writes_the_command(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """vLLM is not installed here: the script is still written, and the message says where."""
    from tests.unit.test_server import make_adapter
    from tunewise.models import load_tokenizer

    adapter = make_adapter(tiny_model_dir, load_tokenizer(tiny_model_dir), tmp_path / "a", seed=1)
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(monkeypatch, capsys, "serve", "--engine", "vllm", "--base", str(tiny_model_dir),
                        "--adapter", f"sections={adapter}", "--no-registry", "--port", "9001")
    script = (tmp_path / "serve-vllm.sh").read_text()
    assert code == 2 and "vLLM is not installed" in out and "serve-vllm.sh" in out
    assert "vllm serve" in script and "--enable-lora" in script and "--max-lora-rank 8" in script
    assert '"name": "sections"' in script and str(adapter.resolve()) in script and "--port 9001" in script


def test_train_resume_of_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "train", "--resume", str(tmp_path))
    assert code == 2 and "Traceback" not in out and str(tmp_path) in out


def test_train_resume_trains_a_run_that_stopped_before_training(tmp_path, monkeypatch, capsys, make_project):
    from rich.console import Console

    from tunewise import pipeline

    run, config = pipeline.start_run(make_project(), [], tmp_path / "runs", Console(quiet=True))
    pipeline.run_stages(run, config, Console(quiet=True), stages=["decide", "baseline"])
    code, out = run_cli(monkeypatch, capsys, "train", "--resume", str(run.root))
    assert code in (0, None) and "train done" in out and run.train_summary.exists()
    assert (run.adapter / "adapter_model.safetensors").exists() and not run.verdict.exists()
    code, out = run_cli(monkeypatch, capsys, "train", "--resume", str(run.root))
    assert code in (0, None) and "already trained" in out
