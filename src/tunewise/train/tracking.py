"""Experiment tracking for the train stage: MLflow (default), W&B, TensorBoard or none.

The training loop opens one tracker on the main process and logs each row of its train log
and, at the end, the summary and the run's artifacts:

    with open_tracker(settings, run, console) as tracker:
        tracker.log_metrics({"step": 10, "train_loss": 1.9, "lr": 2e-4})
        tracker.log_summary(summary, artifacts=[run.config, run.adapter])

Leaving the `with` normally marks the tracked run FINISHED, a Ctrl-C marks it KILLED and any
other exception FAILED (the exception goes on). The tracking run's id is kept in
`<run>/tracking.json`, so `tunewise train --resume` continues the same tracked run.

A tracker that cannot open is a `TunewiseError` before training starts; one that fails
during training prints one warning and stops tracking, and training goes on (train_log.jsonl
still has every row). The tracking libraries are imported only when chosen: they are slow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
from dataclasses import dataclass, replace
from numbers import Real
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.text import Text

from tunewise.artifacts import Provenance, Seeds, TrainPlan
from tunewise.errors import TunewiseError
from tunewise.runs import RunDir, atomic_write_json, read_json

FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"
_SHORT = 500  # longest non-numeric summary value logged as a tag


@dataclass(frozen=True)
class TrackSettings:
    """What the tracker records, built once by the pipeline (settings.py)."""

    backend: str  # mlflow | wandb | tensorboard | none
    experiment: str  # the task's name: MLflow experiment, W&B project
    params: dict[str, Any]  # the resolved config as dotted keys (train.seed -> 0), then the training plan's
    config_yaml: str  # the run's config.yaml, for TensorBoard's text tab
    method: str
    seeds: Seeds

    def with_plan(self, plan: TrainPlan) -> "TrackSettings":
        """These settings with the training plan's resolved values added to the params."""
        return replace(self, params={**self.params, **plan.params()})


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a row except `step` (bools are not metrics)."""
    return {
        k: float(v) for k, v in row.items()
        if k != "step" and isinstance(v, Real) and not isinstance(v, bool)
    }


def _provenance_tags(settings: TrackSettings, run: RunDir) -> dict[str, str]:
    prov = Provenance.of(run, settings.seeds)
    tags = {
        "seed": str(settings.seeds.train),
        "method": settings.method,
        "run_dir": str(run.root.resolve()),
        **{f"libraries.{name}": version for name, version in prov.libraries.items()},
    }
    if prov.dataset_version is not None:
        tags["dataset_version"] = str(prov.dataset_version)
    if prov.config_sha256 is not None:
        tags["config_sha256"] = prov.config_sha256
    return tags


def _stored_id(run: RunDir, backend: str) -> str | None:
    path = run.tracking
    return read_json(path).get(backend, {}).get("run_id") if path.exists() else None


def _store_id(run: RunDir, backend: str, **entry: str) -> None:
    path = run.tracking
    stored = read_json(path) if path.exists() else {}
    stored[backend] = entry
    atomic_write_json(path, stored)


def _say(console: Console, line: str) -> None:
    console.print(Text(line), soft_wrap=True)  # one line, never wrapped: the command must paste


# --- MLflow: a SQLite store and an artifact folder next to the run folders


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hold MLflow's and alembic's INFO lines (table creation, migrations) while we call it."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


class _MlflowRun:
    def __init__(self, settings: TrackSettings, run: RunDir, console: Console) -> None:
        from mlflow import (
            MlflowClient,  # importing mlflow sets its loggers' levels: before quieting them
        )

        self.runs_folder = run.root.resolve().parent
        self.db = self.runs_folder / "mlflow.db"
        self.uri = f"sqlite:///{self.db}"
        self.step = 0
        with _quiet_mlflow():  # a new store announces its tables and migrations at INFO
            self.client = MlflowClient(tracking_uri=self.uri)
            self._open(settings, run, console)

    def _open(self, settings: TrackSettings, run: RunDir, console: Console) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import (
            MAX_PARAM_VAL_LENGTH,
            MAX_PARAMS_TAGS_PER_BATCH,
        )

        run_id = _stored_id(run, "mlflow")
        existing = None
        if run_id:
            try:
                existing = self.client.get_run(run_id)
            except MlflowException:  # the store was replaced since: start a new run
                existing = None
            if existing is not None and existing.info.lifecycle_stage != "active":
                existing = None
        if existing is None:
            name = settings.experiment
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                experiment_id = self.client.create_experiment(
                    name, artifact_location=str(self.runs_folder / "mlartifacts")
                )
            elif experiment.lifecycle_stage != "active":
                raise TunewiseError(
                    f"the MLflow experiment '{name}' was deleted",
                    file=self.db,
                    fix=f"restore it: mlflow experiments restore --experiment-id {experiment.experiment_id} "
                    f"(with MLFLOW_TRACKING_URI={self.uri}), or choose another task.name",
                )
            else:
                experiment_id = experiment.experiment_id
            created = self.client.create_run(experiment_id, run_name=run.root.name)
            self.run_id, logged, verb = created.info.run_id, {}, "new"
            _store_id(run, "mlflow", run_id=self.run_id, experiment_id=experiment_id, tracking_uri=self.uri)
        else:
            self.run_id, logged, verb = run_id, existing.data.params, "resumed"
            self.client.update_run(run_id, status="RUNNING")

        # params are write-once in MLflow: log the new keys; a changed value is noted in a tag
        params = {k: _as_text(v)[:MAX_PARAM_VAL_LENGTH] for k, v in settings.params.items()}
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        tags = _provenance_tags(settings, run)
        if changed:
            tags["config_changed_on_resume"] = ", ".join(changed)[:_SHORT]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        tag_list = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(tag_list), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=tag_list[i : i + MAX_PARAMS_TAGS_PER_BATCH])
        if run.config.exists():
            self.client.log_artifact(self.run_id, str(run.config))
        _say(
            console,
            f"tracking: MLflow ({verb} run {run.root.name} in experiment '{settings.experiment}', {self.db}); "
            f"view: mlflow ui --backend-store-uri {shlex.quote(self.uri)}",
        )

    def log_metrics(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        self.step = int(row["step"])
        now = get_current_time_millis()
        metrics = [Metric(k, v, now, self.step) for k, v in _numeric(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_summary(self, summary: dict[str, Any], artifacts: Sequence[Path]) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        numbers = _numeric(summary)
        metrics = [Metric(k, v, now, self.step) for k, v in numbers.items()]
        texts = {k: _as_text(v) for k, v in summary.items() if k not in numbers and k != "step"}
        tags = [RunTag(f"summary.{k}", v) for k, v in texts.items() if len(v) <= _SHORT]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
        for path in map(Path, artifacts):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


# --- Weights & Biases: offline unless WANDB_MODE says otherwise


class _WandbRun:
    def __init__(self, settings: TrackSettings, run: RunDir, console: Console) -> None:
        import wandb

        self.wandb = wandb
        quiet = wandb.Settings(
            silent=True, console="off", x_disable_stats=True, x_disable_meta=True,
            x_disable_machine_info=True, disable_git=True, save_code=False,
        )
        wandb.setup(settings=quiet)  # silent is process-wide in wandb: init's settings leave termlog on
        try:
            self._open(settings, run, console, quiet)
        except BaseException:
            wandb.teardown(exit_code=1)
            raise

    def _open(self, settings: TrackSettings, run: RunDir, console: Console, quiet: Any) -> None:
        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = self.wandb.init(
            project=settings.experiment,
            name=run.root.name,
            dir=str(run.root.resolve()),
            config={**settings.params, **_provenance_tags(settings, run)},
            tags=[settings.method],
            mode=mode,
            id=_stored_id(run, "wandb"),
            resume="allow",
            settings=quiet,
        )
        self.root_name = run.root.name
        if self.run.settings.mode == "disabled":
            _say(console, "tracking: off (W&B is disabled by WANDB_MODE=disabled)")
            return
        _store_id(run, "wandb", run_id=self.run.id, project=settings.experiment)
        folder = Path(self.run.dir).parent  # <run>/wandb/offline-run-<time>-<id>, one per session
        if self.run.offline:
            sessions = f"{shlex.quote(str(folder.parent))}/offline-run-*-{self.run.id}"
            _say(console, f"tracking: W&B offline run {self.run.id} in {folder}; upload: wandb sync {sessions}")
        else:
            _say(console, f"tracking: W&B run {self.run.url} (local copy in {folder})")

    def log_metrics(self, row: dict[str, Any]) -> None:
        self.run.log(_numeric(row), step=int(row["step"]))  # steps must grow within one session

    def log_summary(self, summary: dict[str, Any], artifacts: Sequence[Path]) -> None:
        self.run.summary.update(summary)
        files = self.wandb.Artifact(f"{self.root_name}-files", type="run-files")
        for path in map(Path, artifacts):
            if path.is_dir():  # a folder of weights: the adapter
                model = self.wandb.Artifact(f"{self.root_name}-{path.name}", type="model")
                model.add_dir(str(path), name=path.name)
                self.run.log_artifact(model)
            else:
                files.add_file(str(path))
        if files.manifest.entries:
            self.run.log_artifact(files)

    def close(self, status: str) -> None:
        exit_code = 0 if status == FINISHED else 1
        self.run.finish(exit_code=exit_code)
        # finish() returns before wandb-core has written the .wandb file; teardown waits for it
        # (and undoes the process-wide setup() above)
        self.wandb.teardown(exit_code=exit_code)


# --- TensorBoard: event files in <run>/tensorboard


class _TensorboardRun:
    def __init__(self, settings: TrackSettings, run: RunDir, console: Console) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = run.root.resolve() / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.logdir), flush_secs=30)
        self.step = 0
        indent = lambda text: "".join(f"    {line}\n" for line in text.splitlines())  # noqa: E731  markdown code
        self.writer.add_text("config", indent(settings.config_yaml), 0)
        tags = _provenance_tags(settings, run)
        self.writer.add_text("provenance", indent("\n".join(f"{k}: {v}" for k, v in tags.items())), 0)
        _say(console, f"tracking: TensorBoard in {self.logdir}; view: tensorboard --logdir {shlex.quote(str(self.logdir))}")

    def log_metrics(self, row: dict[str, Any]) -> None:
        self.step = int(row["step"])
        for key, value in _numeric(row).items():
            self.writer.add_scalar(f"train/{key}", value, self.step)

    def log_summary(self, summary: dict[str, Any], artifacts: Sequence[Path]) -> None:
        lines = [f"{k}: {_as_text(v)}" for k, v in summary.items()]
        lines += [f"artifact: {Path(p).resolve()}" for p in artifacts]
        self.writer.add_text("summary", "".join(f"    {line}\n" for line in lines), self.step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.add_text("status", status, self.step)
        self.writer.close()


class _NoRun:
    def log_metrics(self, row: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any], artifacts: Sequence[Path]) -> None:
        pass

    def close(self, status: str) -> None:
        pass


_BACKENDS = {"mlflow": _MlflowRun, "wandb": _WandbRun, "tensorboard": _TensorboardRun}
_FIXES = {
    "mlflow": "close other programs writing to it, or move the file away to start a new store; "
    "or set track: none (the metrics stay in train_log.jsonl)",
    "wandb": "check WANDB_MODE (unset means offline) and the wandb folder in the run; or set track: none",
    "tensorboard": "check that the run folder is writable; or set track: none",
}


class Tracker:
    """What the training loop logs to. A failing backend warns once, then tracking stops."""

    def __init__(self, backend: Any, console: Console) -> None:
        self._backend = backend
        self._console = console
        self.failed: str | None = None

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Log every number of a train-log row (all but `step`) at `row["step"]`."""
        self._guard(self._backend.log_metrics, row)

    def log_summary(self, summary: dict[str, Any], artifacts: Sequence[Path] = ()) -> None:
        """Final numbers as metrics (other short values as tags) and files/folders as artifacts."""
        self._guard(self._backend.log_summary, summary, list(artifacts))

    def close(self, status: str) -> None:
        if self.failed is None:
            self._guard(self._backend.close, status)
        else:  # already warned; still try not to leave the tracked run RUNNING
            with contextlib.suppress(Exception):
                self._backend.close(status)

    def _guard(self, call, *args: Any) -> None:
        if self.failed is not None:
            return
        try:
            call(*args)
        except Exception as err:  # the tracker must never cost the training
            self.failed = f"{type(err).__name__}: {err}"
            self._console.print(
                Text(f"warning: experiment tracking failed and is off for the rest of this run "
                     f"(train_log.jsonl still has every row): {self.failed}", style="yellow")
            )


@contextlib.contextmanager
def open_tracker(settings: TrackSettings, run: RunDir, console: Console) -> Iterator[Tracker]:
    """Track this training run with `settings.backend`; the tracked run's status follows the `with` block."""
    backend_cls = _BACKENDS.get(settings.backend)
    if backend_cls is None:
        backend: Any = _NoRun()
    else:
        try:
            backend = backend_cls(settings, run, console)
        except TunewiseError:
            raise
        except Exception as err:
            where = run.root.resolve().parent / "mlflow.db" if settings.backend == "mlflow" else run.root
            cause = getattr(err, "orig", None) or err  # SQLAlchemy's own error, without the SQL it ran
            raise TunewiseError(
                f"cannot open {settings.backend} tracking: {type(cause).__name__}: {cause}",
                file=where,
                field="track",
                fix=f"pip install {settings.backend}; or set track: none" if isinstance(err, ImportError)
                else _FIXES[settings.backend],
            ) from err
    tracker = Tracker(backend, console)
    status = FINISHED
    try:
        yield tracker
    except KeyboardInterrupt:
        status = KILLED
        raise
    except BaseException:
        status = FAILED
        raise
    finally:
        tracker.close(status)
