"""Semantic item ids: each item named by a few tokens from small codebooks, learned by residual
k-means over item vectors, so that the vocabulary stays a few hundred tokens whatever the catalog's
size and an item never seen in training gets a code from its text. Pure numpy, no model here.

A code is `levels` cluster indices (coarse to fine: each level clusters what the levels above left
unexplained) and one last index that tells apart the items whose vectors fell into one cell."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streamrec.errors import ModelError

Code = tuple[int, ...]
WORD = re.compile(r"\w+", re.UNICODE)
CHUNK = 65536  # rows per distance block: 10^6 items x 256 centroids never sit in memory at once


def _word_vector(word: str, dim: int) -> npt.NDArray[np.float32]:
    """A fixed pseudo-random unit-variance vector per word, the same in every process (a stable
    hash, not Python's salted one)."""
    seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def text_vectors(texts: Sequence[str], dim: int = 64) -> npt.NDArray[np.float32]:
    """Unit vectors from item text: the mean of its words' random vectors (a random projection of
    the bag of words), so items sharing words lie close. Words are lower-cased; a text without
    words gets the zero vector."""
    cache: dict[str, npt.NDArray[np.float32]] = {}
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for n, text in enumerate(texts):
        words = WORD.findall(text.casefold())
        if not words:
            continue
        for w in words:
            if w not in cache:
                cache[w] = _word_vector(w, dim)
            out[n] += cache[w]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def nearest(x: npt.NDArray[np.float32], centroids: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Each row's nearest centroid (squared Euclidean), in blocks of CHUNK rows."""
    c2 = (centroids * centroids).sum(axis=1)
    out = np.empty(len(x), dtype=np.int64)
    for b in range(0, len(x), CHUNK):
        block = x[b : b + CHUNK]
        out[b : b + CHUNK] = np.argmin(c2[None, :] - 2.0 * block @ centroids.T, axis=1)
    return out


def kmeans(x: npt.NDArray[np.float32], k: int, iters: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """Lloyd's k-means from a k-means++ start; an emptied cluster restarts at the row farthest from
    its centroid, so every code stays in use."""
    k = min(k, len(x))
    centroids = plus_plus(x, k, rng)
    for _ in range(iters):
        labels = nearest(x, centroids)
        counts = np.bincount(labels, minlength=k).astype(np.float32)
        # Per-cluster sums by sorting (np.add.at is slow at 10^6 rows).
        order = np.argsort(labels, kind="stable")
        present = np.flatnonzero(counts)
        sums = np.zeros_like(centroids)
        sums[present] = np.add.reduceat(x[order], np.searchsorted(labels[order], present), axis=0)
        empty = counts == 0
        centroids = np.where(empty[:, None], centroids, sums / np.maximum(counts, 1)[:, None])
        if empty.any():
            far = np.argsort(-((x - centroids[labels]) ** 2).sum(axis=1))[: int(empty.sum())]
            centroids[np.flatnonzero(empty)] = x[far]
    return centroids.astype(np.float32)


def plus_plus(
    x: npt.NDArray[np.float32], k: int, rng: np.random.Generator, sample: int = 50_000
) -> npt.NDArray[np.float32]:
    """k-means++ seeding (each next centre drawn in proportion to its squared distance from the
    nearest one so far) over a sample of at most `sample` rows: a random start often leaves two
    centres in one cluster and one across two, a local optimum Lloyd's steps do not leave."""
    pool = x if len(x) <= sample else x[rng.choice(len(x), size=sample, replace=False)]
    chosen = [int(rng.integers(len(pool)))]
    d2 = ((pool - pool[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = float(d2.sum())
        p = d2.astype(np.float64)
        nxt = int(rng.choice(len(pool), p=p / p.sum())) if total > 0 else int(rng.integers(len(pool)))
        chosen.append(nxt)
        np.minimum(d2, ((pool - pool[nxt]) ** 2).sum(axis=1), out=d2)
    return pool[chosen].astype(np.float32)


@dataclass(frozen=True)
class Codebook:
    """Residual k-means codebooks (one (k, dim) array per level) and the size of the last level,
    the one that separates collisions. The code vocabulary is `sizes`: fixed once fitted."""

    centroids: tuple[npt.NDArray[np.float32], ...]
    collision_size: int

    @property
    def sizes(self) -> tuple[int, ...]:
        return (*(len(c) for c in self.centroids), self.collision_size)

    def cells(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
        """Each vector's index at every codebook level, (n, levels)."""
        residual = np.array(x, dtype=np.float32, copy=True)
        out = np.empty((len(x), len(self.centroids)), dtype=np.int64)
        for level, c in enumerate(self.centroids):
            out[:, level] = nearest(residual, c)
            residual -= c[out[:, level]]
        return out

    def save(self, path: str) -> None:
        arrays = {f"level{n}": c for n, c in enumerate(self.centroids)}
        np.savez(path, collision_size=np.array(self.collision_size), **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str) -> Codebook:
        with np.load(path) as f:
            levels = sorted((k for k in f.files if k.startswith("level")), key=lambda k: int(k[5:]))
            return cls(tuple(f[k].astype(np.float32) for k in levels), int(f["collision_size"]))


def fit_codebook(
    x: npt.NDArray[np.float32],
    levels: int = 3,
    k: int = 256,
    iters: int = 12,
    seed: int = 0,
    headroom: int = 2,
    sample: int = 200_000,
) -> Codebook:
    """Residual k-means over item vectors `x` (centroids from a sample of at most `sample`). The
    collision level gets `headroom` times the fullest cell's items (at least 8), so that new items
    can still join the cells they fall in."""
    if len(x) == 0:
        raise ModelError("no item vectors to fit semantic ids on")
    rng = np.random.default_rng(seed)
    # The centroids come from a sample: beyond a few hundred thousand items more rows barely move
    # them, and the fit's time would grow with the catalog.
    rows = x if len(x) <= sample else x[rng.choice(len(x), size=sample, replace=False)]
    residual = np.array(rows, dtype=np.float32, copy=True)
    centroids = []
    for _ in range(levels):
        c = kmeans(residual, k, iters, rng)
        residual -= c[nearest(residual, c)]
        centroids.append(c)
    book = Codebook(tuple(centroids), 1)
    _, counts = np.unique(book.cells(x), axis=0, return_counts=True)
    return Codebook(book.centroids, max(8, headroom * int(counts.max())))


def assign_codes(
    book: Codebook, items: Sequence[str], x: npt.NDArray[np.float32], taken: Mapping[str, Code] | None = None
) -> dict[str, Code]:
    """Codes for `items` (vectors `x`) that no code in `taken` (item -> code, kept as they are)
    collides with: each item's cells, plus the first free index of its cell's collision level, in
    `items` order. Pure function of the arguments: two processes that assign one catalog in one
    order agree. An item whose cell is full moves to the nearest cell of the finest level with room."""
    used: dict[Code, set[int]] = {}
    for code in (taken or {}).values():
        used.setdefault(code[:-1], set()).add(code[-1])
    cells = book.cells(x)
    out: dict[str, Code] = {}
    last = book.centroids[-1]
    for n, item in enumerate(items):
        cell: Code = tuple(int(c) for c in cells[n])
        free = _first_free(used.get(cell, set()), book.collision_size)
        if free is None:
            # The finest level's other centroids, nearest first from the residual left above it.
            above = x[n] - sum(book.centroids[lv][cells[n, lv]] for lv in range(len(book.centroids) - 1))
            for alt in np.argsort(((last - above) ** 2).sum(axis=1)):
                cell = (*cell[:-1], int(alt))
                if (free := _first_free(used.get(cell, set()), book.collision_size)) is not None:
                    break
            else:
                raise ModelError(f"no room left for item {item!r} in its semantic-id cells")
        used.setdefault(cell, set()).add(free)
        out[item] = (*cell, free)
    return out


def _first_free(used: set[int], size: int) -> int | None:
    return next((j for j in range(size) if j not in used), None)


def code_token(level: int, index: int) -> str:
    """The vocabulary token of one code index at one level."""
    return f"<c{level}_{index}>"


def code_tokens(sizes: Iterable[int]) -> list[str]:
    """The whole code vocabulary, level by level: fixed by the codebook, the same in every process."""
    return [code_token(level, j) for level, size in enumerate(sizes) for j in range(size)]


def code_text(code: Code) -> str:
    """An item's identifier under the `semantic` scheme: its code's tokens, one per level."""
    return "".join(code_token(level, j) for level, j in enumerate(code))
