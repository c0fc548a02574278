"""The data stage: read and validate, clean, split, decontaminate, measure, write.

`prepare` computes everything and writes nothing (`tunewise data check` stops there);
`write_prepared` writes the splits, rejected.jsonl and manifest.json atomically, with whatever
else the caller adds to the folder before it moves into place (the pipeline adds the data
report: the data stage does not call the report). `tunewise data prepare` and `tunewise run`
use the same two functions.

What counts as a duplicate: the same chat (whitespace and case aside), or rows with the same
answer whose inputs are nearly the same (MinHash) or mean the same (embeddings, with most of
their rare words in common). Rows whose answers differ are never duplicates; with the same
input they are conflicting labels, listed and kept. Decontamination compares training and
held-out inputs. Both compare what is specific to each row: phrasing shared by many rows (a
template, an instruction every row repeats) is left out (`similar.SharedPhrasing`).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tunewise import __version__
from tunewise.artifacts import DataManifest
from tunewise.data import similar, stats
from tunewise.data.clean import answer_key, conflicting_labels, drop_exact_duplicates
from tunewise.data.formats import Problem, read_examples
from tunewise.data.outputs import detect_output_type, label_of
from tunewise.data.records import Example, with_system
from tunewise.data.split import group_split, random_split, stratified_split, time_split
from tunewise.errors import TunewiseError
from tunewise.runs import (
    atomic_write_json,
    atomic_write_jsonl,
    replace_dir,
    sha256_file,
)

SPLITS = ("train", "val", "test")
MAX_STRATA = 50  # more distinct outputs than this are not a label set


@dataclass(frozen=True)
class DataSettings:
    """The data stage's knobs as plain values (settings.data_settings unpacks the config into these)."""

    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    split: str = "auto"
    group_key: str | None = None
    time_key: str | None = None
    near_dup_threshold: float | None = 0.8
    semantic_threshold: float | None = 0.95
    decontaminate: bool = True
    eval_files: tuple[str, ...] = ()
    max_examples: int | None = None
    strict: bool = False
    mapping: dict[str, str] = field(default_factory=dict)
    max_seq_len: int | None = None
    system_prompt: str = ""
    output_type: str = "auto"


@dataclass
class Prepared:
    """Everything the data stage found, before anything is written."""

    splits: dict[str, list[Example]]
    problems: list[Problem]
    clusters: list[dict]  # {"kind", "how", "kept", "removed": [sources]}
    contaminated: list[dict]  # {"source", "overlaps", "how"}
    counts: dict[str, int]
    stats: dict
    formats: dict[str, str]
    inputs: dict[str, str]  # path -> sha256
    split_strategy: str
    output_type: str
    lengths: list[int] = field(default_factory=list)  # tokens per kept example
    conflicts: list[dict] = field(default_factory=list)  # {"input", "sources", "answers"}: same input, other answers
    shared_phrasing: list[dict] = field(default_factory=list)  # {"text", "rows"}: left out when comparing rows

    @property
    def warnings(self) -> list[str]:
        out = []
        balance = self.stats.get("label_balance")
        if balance and balance.get("warning"):
            out.append(balance["warning"])
        if self.conflicts:
            rows = sum(len(c["sources"]) for c in self.conflicts)
            first = self.conflicts[0]
            out.append(f"{len(self.conflicts)} inputs have conflicting labels ({rows} rows, all kept), e.g. "
                       f"{', '.join(first['sources'][:3])}: settle each (fix or drop the wrong answer); "
                       "the data report lists them")
        over = self.stats.get("tokens", {}).get("over_max_seq_len", 0)
        if self.counts.get("too_long"):
            out.append(f"{self.counts['too_long']} examples are longer than max_seq_len and were dropped")
        elif over:
            out.append(f"{over} examples are longer than max_seq_len")
        return out


def _chat_tokens(chat, example: Example, system_prompt: str) -> int:
    return chat.count(with_system(example.messages, system_prompt))


def _drop_clusters(examples: list[Example], clusters: list[list[int]], kind: str,
                   how: str) -> tuple[list[Example], list[dict]]:
    """Keep the first member of each cluster; report every cluster and which member was kept."""
    removed: set[int] = set()
    report = []
    for members in clusters:
        removed.update(members[1:])
        report.append({"kind": kind, "how": how, "kept": examples[members[0]].source,
                       "removed": [examples[i].source for i in members[1:]]})
    return [e for i, e in enumerate(examples) if i not in removed], report


def _compared_input(example: Example) -> str:
    """What dedup compares: the input, or the text itself for a row without a prompt."""
    return example.input_text or example.target


def _drop_similar(examples: list[Example], answers: list[str], s: DataSettings, counts: dict, clusters: list[dict],
                  log: Callable[[str], None]) -> tuple[list[Example], list[dict]]:
    """Near and semantic duplicates: the same answer, nearly the same row-specific input, and most
    of the input's rare words in common (short rows that differ by an id or a number are distinct).
    `answers` are the examples' `answer_key`s."""
    inputs = [_compared_input(e) for e in examples]
    # rows pair up only within one answer; rows without a prompt compare their text, so they share one group
    groups = [a if e.prompt_messages else "" for e, a in zip(examples, answers)]
    # phrasing repeated under several answers is scaffolding; under one answer it is content
    labels = [a if e.prompt_messages else i for i, (e, a) in enumerate(zip(examples, answers))]
    shared = similar.SharedPhrasing(inputs, labels=labels)
    specific = shared.specific
    if s.near_dup_threshold is not None:
        found = similar.near_duplicate_clusters(specific, threshold=s.near_dup_threshold, groups=groups,
                                                keep_pair=shared.same_content(inputs, inputs))
        keep = _survivors(len(examples), found)
        examples, report = _drop_clusters(examples, found, "near",
                                          f"same answer, inputs MinHash Jaccard >= {s.near_dup_threshold} and "
                                          f"rare-word overlap >= {similar.MIN_WORD_OVERLAP} (shared phrasing left out)")
        inputs, specific, groups = [inputs[i] for i in keep], [specific[i] for i in keep], [groups[i] for i in keep]
        clusters += report
        counts["near_duplicates"] = sum(len(c["removed"]) for c in report)
    if s.semantic_threshold is not None:
        log(f"embedding {len(examples)} examples for semantic duplicates")
        found = similar.semantic_duplicate_clusters(specific, threshold=s.semantic_threshold, groups=groups,
                                                    keep_pair=shared.same_content(inputs, inputs))
        examples, report = _drop_clusters(examples, found, "semantic",
                                          f"same answer, inputs cosine > {s.semantic_threshold} and rare-word "
                                          f"overlap >= {similar.MIN_WORD_OVERLAP} (shared phrasing left out)")
        clusters += report
        counts["semantic_duplicates"] = sum(len(c["removed"]) for c in report)
    return examples, _phrasing(shared)


def _survivors(n: int, clusters: list[list[int]]) -> list[int]:
    removed = {i for members in clusters for i in members[1:]}
    return [i for i in range(n) if i not in removed]


def _phrasing(shared: similar.SharedPhrasing, top: int = 5) -> list[dict]:
    return [{"text": text, "rows": rows} for text, rows in shared.phrases.most_common(top)]


def _split(examples: list[Example], s: DataSettings, output_type: str) -> tuple[dict[str, list[Example]], str]:
    strategy = s.split
    labels = [label_of(e.target, output_type) for e in examples]
    if strategy == "auto":
        few = None not in labels and len(set(labels)) <= MAX_STRATA
        strategy = "stratified" if few else "random"
    if strategy == "stratified":
        if None in labels:
            raise TunewiseError("outputs are free text: there are no labels to stratify by", field="data.split",
                                fix="use data.split: random (or auto)")
        return stratified_split(examples, s.val_fraction, s.test_fraction, s.seed,
                                lambda e: label_of(e.target, output_type)), strategy
    if strategy == "group":
        return group_split(examples, s.val_fraction, s.test_fraction, s.seed, s.group_key), strategy
    if strategy == "time":
        return time_split(examples, s.val_fraction, s.test_fraction, s.time_key), strategy
    return random_split(examples, s.val_fraction, s.test_fraction, s.seed), strategy


def _contamination(train: list[Example], held_out: list[Example], s: DataSettings) -> dict[int, tuple[int, str]]:
    """train index -> (held-out index, how) for training inputs that repeat a held-out input's own
    content (phrasing shared by many rows of the pool is left out of the comparison)."""
    train_texts = [e.prompt_text or e.text for e in train]
    eval_texts = [e.prompt_text or e.text for e in held_out]
    shared = similar.SharedPhrasing(train_texts + eval_texts)
    train_specific, eval_specific = shared.specific[: len(train)], shared.specific[len(train) :]
    same_words = shared.same_content(train_texts, eval_texts)
    found: dict[int, tuple[int, str]] = {}
    for i, j in similar.ngram_overlaps(train_specific, eval_specific).items():
        found[i] = (j, "13-gram overlap (or the same input, when shorter)")
    if s.near_dup_threshold is not None:
        hits = similar.cross_near_duplicates(train_specific, eval_specific, threshold=s.near_dup_threshold,
                                             keep_pair=same_words)
        for i, j in hits.items():
            found.setdefault(i, (j, f"near-duplicate input (MinHash Jaccard >= {s.near_dup_threshold}, "
                                    f"rare-word overlap >= {similar.MIN_WORD_OVERLAP})"))
    if s.semantic_threshold is not None:
        hits = similar.cross_semantic_duplicates(train_specific, eval_specific, threshold=s.semantic_threshold,
                                                 keep_pair=same_words)
        for i, j in hits.items():
            found.setdefault(i, (j, f"semantic duplicate input (cosine > {s.semantic_threshold}, "
                                    f"rare-word overlap >= {similar.MIN_WORD_OVERLAP})"))
    return found


def prepare(
    paths: list[Path], s: DataSettings, *, chat=None, log: Callable[[str], None] = lambda _: None
) -> Prepared:
    """Read, validate, clean, split and decontaminate; raises TunewiseError on unusable input."""
    keep = tuple(k for k in (s.group_key, s.time_key) if k)
    examples: list[Example] = []
    problems: list[Problem] = []
    formats: dict[str, str] = {}
    for path in paths:
        found, bad, fmt = read_examples(path, mapping=s.mapping, keep=keep, strict=s.strict)
        examples += found
        problems += bad
        formats[str(path)] = fmt
    counts: dict[str, int] = {"read": len(examples) + len(problems), "rejected": len(problems)}
    log(f"read {counts['read']} rows from {len(paths)} file(s): {len(examples)} valid, {len(problems)} rejected")

    tokens: dict[int, int] = {}  # id(example) -> tokens under the chat template
    if chat is not None:
        tokens = {id(e): _chat_tokens(chat, e, s.system_prompt) for e in examples}
        if s.max_seq_len:
            too_long = [e for e in examples if tokens[id(e)] > s.max_seq_len]
            for e in too_long:
                file, _, line = e.source.rpartition(":")
                problems.append(Problem(file, int(line), f"{tokens[id(e)]} tokens under the chat template > "
                                        f"max_seq_len {s.max_seq_len}: dropped rather than truncated", "too_long"))
            examples = [e for e in examples if tokens[id(e)] <= s.max_seq_len]
            counts["too_long"] = len(too_long)

    clusters: list[dict] = []
    before = len(examples)
    kept, duplicates = drop_exact_duplicates(examples)
    clusters += [{"kind": "exact", "how": "the same chat, whitespace and case aside", "kept": k, "removed": v}
                 for k, v in _group_duplicates(duplicates).items()]
    counts["exact_duplicates"] = before - len(kept)
    answers = [answer_key(e) for e in kept]
    conflicts = conflicting_labels(kept, answers)
    counts["conflicts"] = len(conflicts)
    examples, shared_phrasing = _drop_similar(kept, answers, s, counts, clusters, log)
    counts["sampled_out"] = 0
    if s.max_examples is not None and len(examples) > s.max_examples:
        counts["sampled_out"] = len(examples) - s.max_examples
        examples = random.Random(s.seed).sample(examples, s.max_examples)
    if not examples:
        raise TunewiseError("no examples are left after cleaning", field="data.path")

    output_type = s.output_type if s.output_type != "auto" else detect_output_type([e.target for e in examples])
    splits, strategy = _split(examples, s, output_type)

    contaminated: list[dict] = []
    if s.decontaminate:
        held_out = splits["val"] + splits["test"]
        for eval_file in s.eval_files:
            held_out += read_examples(eval_file, mapping=s.mapping)[0]
        hits = _contamination(splits["train"], held_out, s)
        contaminated = [{"source": splits["train"][i].source, "overlaps": held_out[j].source, "how": how}
                        for i, (j, how) in sorted(hits.items())]
        splits["train"] = [e for i, e in enumerate(splits["train"]) if i not in hits]
        counts["contaminated"] = len(hits)
    if not splits["train"]:
        raise TunewiseError("decontamination removed every training example", field="data.decontaminate")
    counts.update({name: len(splits[name]) for name in SPLITS})

    final = splits["train"] + splits["val"] + splits["test"]
    lengths = [tokens[id(e)] for e in final] if tokens else []
    summary = {
        "output_type": output_type,
        "label_balance": stats.label_balance(splits["train"], output_type),
        "variety": stats.instruction_variety(final),
        "output_format": stats.output_format(final),
    }
    if lengths:
        summary["tokens"] = stats.token_length_stats(lengths, s.max_seq_len)
    return Prepared(
        splits=splits, problems=problems, clusters=clusters, contaminated=contaminated, counts=counts,
        stats=summary, formats=formats, inputs={str(p): sha256_file(Path(p)) for p in [*paths, *s.eval_files]},
        split_strategy=strategy, output_type=output_type, lengths=lengths, conflicts=conflicts,
        shared_phrasing=shared_phrasing,
    )


def _group_duplicates(duplicates: list[dict]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for d in duplicates:
        groups.setdefault(d["duplicate_of"], []).append(d["source"])
    return groups


def preview_rows(chat, examples: list[Example], system_prompt: str, n: int = 3) -> list[str]:
    """The first rows exactly as training will see them (chat template applied)."""
    return [chat.render(with_system(e.messages, system_prompt), generation_prompt=False) for e in examples[:n]]


def write_prepared(prepared: Prepared, out_dir: Path, s: DataSettings,
                   also: Callable[[Path, dict], None] | None = None) -> DataManifest:
    """Write splits, rejected.jsonl and manifest.json into `out_dir` atomically; `also(folder,
    manifest)` writes more files into the folder before it is moved into place."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SPLITS:
        atomic_write_jsonl(tmp / f"{name}.jsonl", (e.to_json() for e in prepared.splits[name]))
    atomic_write_jsonl(tmp / "rejected.jsonl", (p.to_json() for p in prepared.problems))
    settings = {**asdict(s), "eval_files": list(s.eval_files)}
    manifest = {
        "tunewise_version": __version__,
        "inputs": prepared.inputs,
        "formats": prepared.formats,
        "settings": settings,
        "split_strategy": prepared.split_strategy,
        "output_type": prepared.output_type,
        "counts": prepared.counts,
        "rejected_by_kind": dict(Counter(p.kind for p in prepared.problems)),
        "sha256": {name: sha256_file(tmp / f"{name}.jsonl") for name in (*SPLITS, "rejected")},
        "stats": prepared.stats,
        "warnings": prepared.warnings,
        "clusters": prepared.clusters,
        "conflicts": prepared.conflicts,
        "shared_phrasing": prepared.shared_phrasing,
        "contaminated": prepared.contaminated,
    }
    manifest["version"] = dataset_version(manifest)
    if also is not None:
        also(tmp, manifest)
    atomic_write_json(tmp / "manifest.json", manifest)
    replace_dir(tmp, out_dir)
    return DataManifest.from_json(manifest)


def dataset_version(manifest: dict) -> str:
    """Hash of what the dataset is (content hashes, settings, counts, findings), not of where
    its files lie: the same data prepared from another folder has the same version."""
    basis = {k: v for k, v in manifest.items() if k not in ("inputs", "formats", "version")}
    basis["inputs"] = sorted(manifest["inputs"].values())
    basis["settings"] = {k: v for k, v in manifest["settings"].items() if k != "eval_files"}
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_split(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as fh:
        return [Example.from_json(json.loads(line)) for line in fh if line.strip()]
