"""Retrieved few-shot: for each test item, the k most similar training examples.

The RAG-style baseline every fine-tune must beat. Similarity is the cosine of
all-MiniLM-L6-v2 embeddings of the prompts; the train-side index (embeddings + sources)
lives in the run folder and is reused while the train split is unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tunewise.data.records import Example
from tunewise.data.similar import embed
from tunewise.runs import atomic_write_json


def train_index(train: list[Example], folder: Path) -> np.ndarray:
    """Unit-length prompt embeddings of the train split, (N, D), cached in `folder`."""
    sources = [e.source for e in train]
    vectors_path, sources_path = folder / "train_embeddings.npy", folder / "train_sources.json"
    if vectors_path.exists() and sources_path.exists() and json.loads(sources_path.read_text()) == sources:
        return np.load(vectors_path)
    vectors = embed([e.prompt_text or e.text for e in train])  # (N, D)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".train_embeddings.tmp.npy"
    np.save(tmp, vectors)
    os.replace(tmp, vectors_path)
    atomic_write_json(sources_path, sources)
    return vectors


def retrieve_shots(train: list[Example], test: list[Example], k: int, folder: Path) -> list[list[Example]]:
    """Per test item, its k nearest training examples, the most similar one last (next to the question)."""
    index = train_index(train, folder)  # (N, D)
    queries = embed([e.prompt_text or e.text for e in test])  # (Q, D)
    sims = queries @ index.T  # (Q, N)
    k = min(k, len(train))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # (Q, k), unordered
    shots = []
    for row, candidates in zip(sims, top):
        ordered = candidates[np.argsort(row[candidates])]  # ascending similarity
        shots.append([train[i] for i in ordered])
    return shots
