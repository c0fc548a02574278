"""The adapter registry: versions per adapter name, promotion, canary and rollback, in one SQLite file.

    registry = Registry.default()                     # $TUNEWISE_HOME/registry
    registry.add("sections", Path("runs/<run>"))      # copies runs/<run>/adapter in as v1
    registry.promote("sections")                      # v1 serves all traffic (needs a SHIP verdict)
    registry.canary("sections", None, 0.1)            # the newest version gets 10% of the traffic
    registry.rollback("sections")                     # drop the canary (or undo the last promotion)

Layout of the registry folder:

    <root>/registry.sqlite           the database (WAL mode; safe with a CLI writing while a server reads)
    <root>/adapters/<name>/v<N>/     a copy of the run's adapter: safetensors, json and tokenizer files only
    <root>/tmp/                      copies in progress (renamed into adapters/ when complete)

Every write is one `BEGIN IMMEDIATE` transaction that also bumps a counter, `stamp()`, so a server can
poll it per request and reload its routes only when something changed. Adapter paths are confined to
`<root>/adapters` and the files are checked against the digest taken when they were added, so a row or
a folder tampered with later is refused rather than loaded; pickle weights are never copied in.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from tunewise.artifacts import (
    DataManifest,
    Decision,
    Verdict,
    WeightsRecord,
    weights_in,
)
from tunewise.errors import TunewiseError
from tunewise.runs import RunDir, sha256_file

_UMASK = os.umask(0)
os.umask(_UMASK)
SCHEMA_VERSION = 1
DB_FILE = "registry.sqlite"
SHIP, NO_SHIP = Decision.SHIP.value, Decision.DO_NOT_SHIP.value  # as the registry's database stores them
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
RESERVED_NAMES = {"base"}  # the server answers to `base` for the base model itself
WEIGHTS = "adapter_model.safetensors"
# What a copy keeps: weights in safetensors, configs, tokenizer files; never a pickle (.bin/.pt/.pkl/.ckpt).
KEPT_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".jinja", ".tiktoken", ".md"}

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS adapters (
        name TEXT PRIMARY KEY,
        created TEXT NOT NULL,
        current INTEGER,
        canary INTEGER,
        share REAL NOT NULL DEFAULT 0,
        FOREIGN KEY (name, current) REFERENCES versions (name, version),
        FOREIGN KEY (name, canary) REFERENCES versions (name, version),
        CHECK ((canary IS NULL AND share = 0) OR (canary IS NOT NULL AND share > 0 AND share < 1)),
        CHECK (canary IS NULL OR (current IS NOT NULL AND canary != current))
    )""",
    """CREATE TABLE IF NOT EXISTS versions (
        name TEXT NOT NULL REFERENCES adapters (name),
        version INTEGER NOT NULL CHECK (version >= 1),
        path TEXT NOT NULL,
        run TEXT NOT NULL,
        dataset_version TEXT,
        base TEXT,
        decision TEXT CHECK (decision IN ('SHIP', 'DO NOT SHIP')),
        reason TEXT,
        primary_metric TEXT,
        finetuned REAL,
        best_baseline TEXT,
        baseline REAL,
        sha256 TEXT NOT NULL,
        created TEXT NOT NULL,
        PRIMARY KEY (name, version)
    )""",
    """CREATE TABLE IF NOT EXISTS promotions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        at TEXT NOT NULL,
        active INTEGER NOT NULL DEFAULT 1,
        FOREIGN KEY (name, version) REFERENCES versions (name, version)
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        who TEXT NOT NULL,
        name TEXT NOT NULL REFERENCES adapters (name),
        action TEXT NOT NULL CHECK (action IN ('add', 'promote', 'canary', 'rollback')),
        version INTEGER,
        forced INTEGER NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT ''
    )""",
]


@dataclass(frozen=True)
class Version:
    """One registered copy of an adapter, with the run it came from and that run's verdict."""

    name: str
    version: int
    path: Path  # as recorded; load through Registry.resolve, which checks it
    run: str  # the run folder it was added from
    dataset_version: str | None
    base: str | None  # the base model it was trained on
    decision: str | None  # "SHIP", "DO NOT SHIP", or None (no verdict)
    reason: str | None
    primary_metric: str | None
    finetuned: float | None  # the fine-tune's mean on the primary metric
    best_baseline: str | None
    baseline: float | None  # the best baseline's mean on the primary metric
    sha256: str  # digest of the copied files
    created: str

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    @property
    def ships(self) -> bool:
        return self.decision == SHIP


@dataclass(frozen=True)
class Route:
    """Where the traffic for one name goes: `share` of it to `canary`, the rest to `current`."""

    name: str
    current: Version | None
    canary: Version | None
    share: float  # 0.0 without a canary

    def role(self, version: int) -> str | None:
        """'current', 'canary' or None, for a listing."""
        if self.current is not None and self.current.version == version:
            return "current"
        if self.canary is not None and self.canary.version == version:
            return "canary"
        return None


@dataclass(frozen=True)
class Event:
    """One line of the audit history: who did what to which version, when."""

    id: int
    at: str
    who: str
    name: str
    action: str  # add | promote | canary | rollback
    version: int | None
    forced: bool
    detail: str


def pick(route: Route, key: float) -> Version:
    """The version that serves a request: the canary when `key` < share, else the current one.
    The server passes `random.random()`; a fixed key makes the choice reproducible."""
    if not 0.0 <= key < 1.0:
        raise ValueError(f"key must be in [0, 1), got {key}")
    if route.current is None:
        raise TunewiseError(f"adapter '{route.name}' has no promoted version to serve",
                            fix=f"promote one: tunewise registry promote {route.name}")
    if route.canary is not None and key < route.share:
        return route.canary
    return route.current


def check_name(name: str) -> str:
    """`name` if it is a safe adapter name (a folder name, a URL part, a served model name)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name or name in RESERVED_NAMES:
        raise TunewiseError(
            f"invalid adapter name {name!r}: use 1 to 64 characters from a-z, 0-9, '.', '_' and '-', "
            f"starting with a letter or digit, without '..' and other than {', '.join(sorted(RESERVED_NAMES))}",
            fix="pick a name like 'sections' or 'support-bot.v2'",
        )
    return name


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in this environment; the audit line still says where
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _check_safetensors(path: Path) -> None:
    """Refuse a file that is not a safetensors file (a renamed pickle, a truncated copy)."""
    size = path.stat().st_size
    bad = TunewiseError("not a valid safetensors file", file=path,
                        fix="save the adapter as safetensors: model.save_pretrained(folder, safe_serialization=True)")
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad
        n = int.from_bytes(head, "little")
        if n < 2 or n > size - 8:
            raise bad
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad from None
    if not isinstance(header, dict):
        raise bad
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    if max(ends, default=0) > size - 8 - n:
        raise bad


def _copy_hashed(src: Path, dst: Path) -> str:
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:
        for block in iter(lambda: fin.read(1 << 20), b""):
            digest.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _folder_digest(file_hashes: dict[str, str]) -> str:
    """One digest for a flat folder: every file's name and content."""
    lines = "".join(f"{name}\0{h}\n" for name, h in sorted(file_hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _adapter_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The files of an adapter folder that a registry copy keeps, and the names it leaves out."""
    fix = "train and evaluate it first (tunewise run -c tunewise.yaml), then add the run folder"
    if not folder.is_dir():
        raise TunewiseError("the run has no adapter folder", file=folder, fix=fix)
    weights = weights_in(folder)
    if not weights.is_adapter:
        raise TunewiseError("not a PEFT adapter folder (no adapter_config.json)", file=folder, fix=fix)
    if not weights.safetensors:
        pickled = weights.pickled
        why = f" ({', '.join(pickled)}: pickle, which tunewise never loads)" if pickled else ""
        raise TunewiseError(
            f"no {WEIGHTS} in the adapter folder{why}", file=folder,
            fix="save the adapter as safetensors: model.save_pretrained(folder, safe_serialization=True)",
        )
    kept, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in KEPT_SUFFIXES:
            kept.append(path)
        else:
            skipped.append(path.name)
    for path in kept:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
    return kept, skipped


def _run_record(run: RunDir) -> dict[str, Any]:
    """What the registry records about a run: dataset version, base model, the verdict's figures."""
    record = WeightsRecord.read(run.adapter_provenance) if run.adapter_provenance.is_file() else None
    provenance = record.provenance if record is not None else None
    manifest = DataManifest.read(run.manifest) if run.manifest.is_file() else None
    verdict = Verdict.read(run.verdict) if run.verdict.exists() else None
    decision = verdict.decision.value if verdict else None
    primary, best = (verdict.primary_metric, verdict.best_baseline) if verdict else (None, None)
    means = verdict.means if verdict else {}
    return {
        # the adapter's own provenance says what it was trained on; the manifest may be newer
        "dataset_version": (provenance.dataset_version if provenance else None) or (manifest.version if manifest else None),
        "base": record.train.base if record is not None and record.train is not None else None,
        "decision": decision,
        "reason": verdict.reason if verdict else None,
        "primary_metric": primary,
        "finetuned": _float_or_none(means.get("finetuned")),
        "best_baseline": best,
        "baseline": _float_or_none(means.get(best)) if best else None,
    }


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Registry:
    """Adapter versions per name and the route of each name, in `<root>/registry.sqlite`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.db = self.root / DB_FILE
        self.adapters_dir = self.root / "adapters"
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()  # stamp()'s connection
        self._init_schema()

    @classmethod
    def default(cls) -> Registry:
        """The registry in tunewise's own folder: $TUNEWISE_HOME/registry."""
        from tunewise.models import tunewise_home  # imports torch; only needed here

        return cls(tunewise_home() / "registry")

    # --- connections and transactions

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.db, timeout=30.0, isolation_level=None)  # transactions are explicit
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA foreign_keys = ON")
        return con

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One snapshot: every SELECT inside sees the same committed state."""
        with closing(self._connect()) as con:
            con.execute("BEGIN")
            try:
                yield con
            finally:
                con.execute("ROLLBACK")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (taking the write lock at once) that bumps the stamp on commit."""
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("UPDATE meta SET value = value + 1 WHERE key = 'stamp'")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def _init_schema(self) -> None:
        with closing(self._connect()) as con:
            con.execute("PRAGMA journal_mode = WAL")  # persistent in the file; readers never block the writer
            found = self._schema_version(con)
            if found == SCHEMA_VERSION:
                return
            con.execute("BEGIN IMMEDIATE")
            try:
                found = self._schema_version(con)  # another process may have created it meanwhile
                if found is None:
                    for statement in SCHEMA:
                        con.execute(statement)
                    con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                                (SCHEMA_VERSION,))
                    con.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('stamp', 0)")
                elif found > SCHEMA_VERSION:
                    raise TunewiseError(
                        f"the registry has schema version {found}, newer than this tunewise understands "
                        f"({SCHEMA_VERSION})", file=self.db, fix="upgrade tunewise: pip install -U tunewise")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    @staticmethod
    def _schema_version(con: sqlite3.Connection) -> int | None:
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet
            return None
        return None if row is None else int(row[0])

    # --- rows to values

    def _version(self, row: sqlite3.Row) -> Version:
        return Version(
            name=row["name"], version=row["version"], path=self.root / row["path"], run=row["run"],
            dataset_version=row["dataset_version"], base=row["base"], decision=row["decision"],
            reason=row["reason"], primary_metric=row["primary_metric"], finetuned=row["finetuned"],
            best_baseline=row["best_baseline"], baseline=row["baseline"], sha256=row["sha256"],
            created=row["created"],
        )

    def _names(self, con: sqlite3.Connection) -> list[str]:
        return [r[0] for r in con.execute("SELECT name FROM adapters ORDER BY name")]

    def _adapter_row(self, con: sqlite3.Connection, name: str) -> sqlite3.Row:
        check_name(name)
        row = con.execute("SELECT * FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = self._names(con)
            listed = f"; known: {', '.join(known)}" if known else "; the registry is empty"
            raise TunewiseError(f"no adapter named '{name}' in the registry {self.root}{listed}",
                                fix="add it from a run folder: tunewise registry add NAME RUN_DIR")
        return row

    def _version_row(self, con: sqlite3.Connection, name: str, version: int | None) -> Version:
        """`version` of `name`, or its newest version when `version` is None."""
        self._adapter_row(con, name)
        if version is None:
            row = con.execute("SELECT * FROM versions WHERE name = ? ORDER BY version DESC LIMIT 1",
                              (name,)).fetchone()
        else:
            row = con.execute("SELECT * FROM versions WHERE name = ? AND version = ?", (name, version)).fetchone()
        if row is None:
            existing = [f"v{r[0]}" for r in con.execute(
                "SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))]
            raise TunewiseError(
                f"adapter '{name}' has no version {version}; it has {', '.join(existing) or 'none'}",
                fix=f"pick one of them (tunewise registry list {name})")
        return self._version(row)

    def _route(self, con: sqlite3.Connection, row: sqlite3.Row) -> Route:
        current = self._version_row(con, row["name"], row["current"]) if row["current"] is not None else None
        canary = self._version_row(con, row["name"], row["canary"]) if row["canary"] is not None else None
        return Route(row["name"], current, canary, float(row["share"]))

    def _log(self, con: sqlite3.Connection, name: str, action: str, version: int | None, detail: str,
             forced: bool = False) -> None:
        con.execute("INSERT INTO events (at, who, name, action, version, forced, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (_now(), _who(), name, action, version, int(forced), detail))

    # --- reading

    def stamp(self) -> int:
        """A counter that every committed write bumps: poll it, reload routes only when it changed.
        Cheap enough per request: one kept connection per thread (and process), one indexed read."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():  # a new thread, or a forked child
            local.con, local.pid = self._connect(), os.getpid()
        rows = local.con.execute("SELECT value FROM meta WHERE key = 'stamp'").fetchall()  # all: ends the read
        return int(rows[0][0])

    def names(self) -> list[str]:
        with self._read() as con:
            return self._names(con)

    def versions(self, name: str | None = None) -> list[Version]:
        """Every version of `name` (every name when None), oldest first."""
        with self._read() as con:
            if name is None:
                rows = con.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
            else:
                self._adapter_row(con, name)
                rows = con.execute("SELECT * FROM versions WHERE name = ? ORDER BY version", (name,)).fetchall()
            return [self._version(r) for r in rows]

    def route(self, name: str) -> Route:
        with self._read() as con:
            return self._route(con, self._adapter_row(con, name))

    def routes(self) -> dict[str, Route]:
        """The route of every name that has a promoted version (what a server serves)."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[int, dict[str, Route]]:
        """The stamp and the routes read together, so a server never pairs new routes with an old stamp."""
        with self._read() as con:
            stamp = int(con.execute("SELECT value FROM meta WHERE key = 'stamp'").fetchone()[0])
            rows = con.execute("SELECT * FROM adapters WHERE current IS NOT NULL ORDER BY name").fetchall()
            return stamp, {r["name"]: self._route(con, r) for r in rows}

    def history(self, name: str | None = None, limit: int | None = None) -> list[Event]:
        """The audit trail (add, promote, canary, rollback), newest first."""
        with self._read() as con:
            where, args = ("", []) if name is None else ("WHERE name = ?", [name])
            if name is not None:
                self._adapter_row(con, name)
            rows = con.execute(f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?",
                               [*args, -1 if limit is None else limit]).fetchall()
        return [Event(r["id"], r["at"], r["who"], r["name"], r["action"], r["version"], bool(r["forced"]),
                      r["detail"]) for r in rows]

    def path_of(self, name: str, version: int) -> Path:
        """The version's folder, resolved (symlinks too) and guaranteed inside `<root>/adapters`."""
        with self._read() as con:
            recorded = self._version_row(con, name, version).path
        path = recorded.resolve()
        inside = self.adapters_dir  # under the resolved root; a symlinked adapters/ is refused too
        if path == inside or not path.is_relative_to(inside):
            raise TunewiseError(
                f"adapter '{name}' v{version}: its path {path} is outside the registry's adapters folder {inside}",
                file=self.db, fix="the registry was tampered with; re-add the adapter from its run folder")
        if not path.is_dir():
            raise TunewiseError(f"adapter '{name}' v{version}: its folder is missing", file=path,
                                fix="re-add the adapter from its run folder: tunewise registry add NAME RUN_DIR")
        return path

    def resolve(self, name: str, version: int) -> Version:
        """The version with its checked path, its files verified against the digest taken at `add`.
        Load adapters only through this: it refuses paths outside the registry and changed files."""
        path = self.path_of(name, version)
        with self._read() as con:
            found = self._version_row(con, name, version)
        hashes: dict[str, str] = {}
        for entry in sorted(path.iterdir()):
            if entry.is_symlink() or not entry.is_file():
                raise TunewiseError(f"adapter '{name}' v{version}: unexpected entry '{entry.name}' in its folder",
                                    file=path, fix="re-add the adapter from its run folder")
            hashes[entry.name] = sha256_file(entry)
        if _folder_digest(hashes) != found.sha256 or WEIGHTS not in hashes:
            raise TunewiseError(f"adapter '{name}' v{version}: its files changed since it was added "
                                "(digest mismatch)", file=path, fix="re-add the adapter from its run folder")
        return replace(found, path=path)

    # --- writing

    def add(self, name: str, run_dir: Path) -> Version:
        """Copy the run's adapter in as the next version of `name`, with the run's verdict."""
        check_name(name)
        run = RunDir(Path(run_dir).expanduser().resolve())
        files, skipped = _adapter_files(run.adapter)
        record = _run_record(run)

        staging = self.root / "tmp"
        staging.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=staging, prefix=f"{name}-"))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a server run as another user reads it
        moved: Path | None = None
        try:
            hashes = {src.name: _copy_hashed(src, tmp / src.name) for src in files}
            digest = _folder_digest(hashes)
            with self._write() as con:
                if con.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is None:
                    con.execute("INSERT INTO adapters (name, created) VALUES (?, ?)", (name, _now()))
                same = con.execute("SELECT version FROM versions WHERE name = ? AND sha256 = ?",
                                   (name, digest)).fetchone()
                if same is not None:
                    raise TunewiseError(f"this adapter is already '{name}' v{same[0]} (same files)", file=run.adapter,
                                        fix=f"promote that version: tunewise registry promote {name} {same[0]}")
                number = con.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE name = ?",
                                     (name,)).fetchone()[0]
                rel = Path("adapters") / name / f"v{number}"
                con.execute(
                    "INSERT INTO versions (name, version, path, run, dataset_version, base, decision, reason, "
                    "primary_metric, finetuned, best_baseline, baseline, sha256, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, number, rel.as_posix(), str(run.root), record["dataset_version"], record["base"],
                     record["decision"], record["reason"], record["primary_metric"], record["finetuned"],
                     record["best_baseline"], record["baseline"], digest, _now()),
                )
                detail = f"from {run.root}; verdict {record['decision'] or 'none'}"
                if skipped:
                    detail += f"; left out {', '.join(skipped)}"
                self._log(con, name, "add", number, detail)
                # last, still inside the transaction: the complete copy moves into place, then the commit
                final = self.root / rel
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():  # left by a crash between a rename and its commit; no row points to it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                moved = final
        except BaseException:
            if moved is not None:  # the commit failed after the rename
                shutil.rmtree(moved, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with self._read() as con:
            return self._version_row(con, name, number)

    def _check_verdict(self, found: Version, force: bool, command: str) -> None:
        if found.ships or force:
            return
        why = (f"has the verdict {found.decision}: {found.reason or 'no reason recorded'}" if found.decision
               else f"has no verdict (its run {found.run} had no verdict.json when it was added)")
        raise TunewiseError(
            f"adapter '{found.name}' v{found.version} {why}",
            fix=f"choose a version whose verdict is SHIP, or override with `--force` (recorded in the history): "
                f"{command} --force",
        )

    def promote(self, name: str, version: int | None = None, *, force: bool = False) -> Version:
        """Make `version` (the newest when None) serve all of `name`'s traffic; needs a SHIP verdict
        unless `force`. A canary of that same version is cleared."""
        with self._read() as con:
            found = self._version_row(con, name, version)
            if self._adapter_row(con, name)["current"] == found.version:
                return found  # already current: nothing to write, the stamp stays
        self._check_verdict(found, force, f"tunewise registry promote {name} {found.version}")
        self.path_of(name, found.version)
        with self._write() as con:
            row = self._adapter_row(con, name)
            found = self._version_row(con, name, found.version)  # still there, inside the lock
            if row["current"] == found.version:
                return found  # already current: nothing to record
            previous = row["current"]
            if row["canary"] == found.version:
                con.execute("UPDATE adapters SET current = ?, canary = NULL, share = 0 WHERE name = ?",
                            (found.version, name))
            else:
                con.execute("UPDATE adapters SET current = ? WHERE name = ?", (found.version, name))
            con.execute("INSERT INTO promotions (name, version, at) VALUES (?, ?, ?)", (name, found.version, _now()))
            detail = f"v{previous} -> v{found.version}" if previous is not None else f"first: v{found.version}"
            if row["canary"] == found.version:
                detail += f" (was the canary at {row['share']:.0%})"
            self._log(con, name, "promote", found.version, f"{detail}; verdict {found.decision or 'none'}",
                      forced=force and not found.ships)
        return found

    def canary(self, name: str, version: int | None, share: float, *, force: bool = False) -> Route:
        """Send `share` (0 < share < 1) of `name`'s traffic to `version` (the newest when None) and the
        rest to the current version; the same verdict rule as `promote`."""
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 < share < 1.0:
            raise TunewiseError(f"canary share must be between 0 and 1 (exclusive), got {share!r}",
                                field="share", fix="pass a fraction such as 0.1 for 10% of the traffic")
        with self._read() as con:
            found = self._version_row(con, name, version)
        self._check_verdict(found, force, f"tunewise registry canary {name} {found.version} --share {share}")
        self.path_of(name, found.version)
        with self._write() as con:
            row = self._adapter_row(con, name)
            found = self._version_row(con, name, found.version)
            if row["current"] is None:
                raise TunewiseError(f"adapter '{name}' has no current version for the canary to share traffic with",
                                    fix=f"promote one first: tunewise registry promote {name}")
            if row["current"] == found.version:
                raise TunewiseError(f"adapter '{name}' v{found.version} is already the current version",
                                    fix=f"add a newer version (tunewise registry add {name} RUN_DIR) and canary that")
            con.execute("UPDATE adapters SET canary = ?, share = ? WHERE name = ?", (found.version, float(share), name))
            detail = f"v{found.version} gets {share:.0%}, v{row['current']} the rest"
            if row["canary"] is not None:
                detail += f" (replaces canary v{row['canary']} at {row['share']:.0%})"
            self._log(con, name, "canary", found.version, f"{detail}; verdict {found.decision or 'none'}",
                      forced=force and not found.ships)
            return self._route(con, self._adapter_row(con, name))

    def rollback(self, name: str) -> Route:
        """Drop `name`'s canary if it has one; otherwise go back to the previously promoted version."""
        with self._write() as con:
            row = self._adapter_row(con, name)
            if row["canary"] is not None:
                con.execute("UPDATE adapters SET canary = NULL, share = 0 WHERE name = ?", (name,))
                self._log(con, name, "rollback", row["current"],
                          f"canary v{row['canary']} dropped; all traffic to v{row['current']}")
            else:
                stack = con.execute("SELECT id, version FROM promotions WHERE name = ? AND active = 1 ORDER BY id",
                                    (name,)).fetchall()
                if len(stack) < 2:
                    now = f"v{row['current']} is the only version promoted" if row["current"] else "nothing is promoted"
                    raise TunewiseError(f"adapter '{name}' has nothing to roll back to: {now}",
                                        fix=f"promote another version: tunewise registry promote {name} VERSION")
                target = stack[-2]["version"]
                self.path_of(name, target)  # (its own read) a tampered target is refused before it serves
                con.execute("UPDATE promotions SET active = 0 WHERE id = ?", (stack[-1]["id"],))
                con.execute("UPDATE adapters SET current = ? WHERE name = ?", (target, name))
                self._log(con, name, "rollback", target, f"v{row['current']} -> v{target}")
            return self._route(con, self._adapter_row(con, name))
