"""The run folder: its paths, atomic writes and the resolved config (typed contents: artifacts.py).

Every stage reads only what earlier stages wrote here and writes its own outputs atomically
(temp file, then rename), so a crash or Ctrl-C never leaves a half-written artifact and a
stage whose output exists can be skipped on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from tunewise.errors import TunewiseError

CONFIG_FILE = "config.yaml"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    names = ("tunewise", "torch", "transformers", "peft", "numpy", "scipy")
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder (see DESIGN.md for what each stage writes)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def decision(self) -> Path:
        return self.root / "decision.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    def split(self, name: str) -> Path:
        return self.data / f"{name}.jsonl"

    def predictions(self, arm: str) -> Path:
        return self.root / "predictions" / f"{arm}.jsonl"

    def metrics(self, arm: str) -> Path:
        return self.root / "metrics" / f"{arm}.json"

    def regression_predictions(self, who: str) -> Path:
        """Outputs of the base or fine-tuned model on the general regression set (forgetting)."""
        return self.root / "predictions" / f"regression_{who}.jsonl"

    def regression_metrics(self, who: str) -> Path:
        return self.root / "metrics" / f"regression_{who}.json"

    @property
    def judge(self) -> Path:
        """pointwise.jsonl, pairwise.jsonl and summary.json of the LLM judge."""
        return self.root / "judge"

    @property
    def judge_summary(self) -> Path:
        return self.judge / "summary.json"

    @property
    def judge_pointwise(self) -> Path:
        return self.judge / "pointwise.jsonl"

    @property
    def judge_pairwise(self) -> Path:
        return self.judge / "pairwise.jsonl"

    @property
    def index(self) -> Path:
        """The retrieval index of the train split (retrieved few-shot arm)."""
        return self.root / "index"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def adapter_provenance(self) -> Path:
        """tunewise.json next to the trained weights: what they were trained on and how."""
        return self.adapter / "tunewise.json"

    @property
    def export(self) -> Path:
        """`tunewise export`'s default folder."""
        return self.root / "export"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"

    @property
    def tracking(self) -> Path:
        """The tracked run's id per backend, so a resumed training continues the same tracked run."""
        return self.root / "tracking.json"

    @property
    def verdict(self) -> Path:
        return self.root / "verdict.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def set_status(self, state: str, **extra: Any) -> None:
        atomic_write_json(self.status, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})


def new_run_dir(runs_root: Path, name: str) -> RunDir:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = runs_root / f"{stamp}-{slug}"
    n = 1
    while root.exists():
        n += 1
        root = runs_root / f"{stamp}-{slug}-{n}"
    root.mkdir(parents=True)
    return RunDir(root)


def open_run_dir(path: str | Path) -> RunDir:
    run = RunDir(Path(path))
    if not run.config.exists():
        raise TunewiseError(
            f"not a tunewise run folder (no {CONFIG_FILE})",
            file=path,
            fix="pass a folder made by `tunewise run`, e.g. runs/20260101-120000-task",
        )
    return run
