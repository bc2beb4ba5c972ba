"""Semantic item ids: each item named by a few tokens from small codebooks, learned by residual
k-means over item vectors, so that the vocabulary stays a few hundred tokens whatever the catalog's
size and an item never seen in training gets a code from its text. Pure numpy, no model here.

A code is `levels` cluster indices (coarse to fine: each level clusters what the levels above left
unexplained) and one last index that tells apart the items whose vectors fell into one cell."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# Beside a saved model: the codebooks and the text map (CODEBOOK_FILE); beside a model and in each
# adapter (under its sha256): item -> code (CODES_FILE). The trainer alone extends the codes.
CODEBOOK_FILE = "codebook.npz"
CODES_FILE = "item_codes.json"


def auto_k(items: int, levels: int, cap: int = 256) -> int:
    """Clusters per level: about twice the `levels`-th root of the catalog's size, at most `cap`. A
    small catalog then gets cells of several items each, which share what training teaches about a
    prefix; 256 per level would leave most items alone in their cell from the second level on."""
    return int(min(cap, max(4, round(2 * items ** (1 / levels)))))


def _unit(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: npt.NDArray[np.float32] = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return out


def ridge_map(x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], ridge: float = 1.0) -> npt.NDArray[np.float32]:
    """The linear map from rows of `x` to rows of `y` (ridge regression, regularised by `ridge`
    times the mean variance of `x`)."""
    gram = (x.T @ x).astype(np.float64)
    lam = ridge * np.trace(gram) / len(gram) + 1e-9
    return np.linalg.solve(gram + lam * np.eye(len(gram)), (x.T @ y).astype(np.float64)).astype(np.float32)


def item_vectors(
    texts: Sequence[str],
    text_map: npt.NDArray[np.float32] | None,
    text_dim: int,
    cooc: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """Item vectors from text, followed (with a `text_map`) by a co-occurrence part: the `cooc` row
    where it is not zero (an item with history), else the text's image under the map."""
    t = text_vectors(texts, text_dim)
    if text_map is None:
        return t
    c = _unit(t @ text_map)
    if cooc is not None:
        known = np.linalg.norm(cooc, axis=1) > 0
        c[known] = _unit(cooc[known])
    return np.hstack([t, c])


@dataclass(frozen=True)
class SemanticIds:
    """What names items under the `semantic` scheme, apart from the codes themselves: the codebook,
    and how an item's vector is made. The vector is its text's (`text_vectors`), followed, when the
    codebook was fitted with history, by its co-occurrence vector: an item with no history yet gets
    that part from its text, through `text_map` (text vector -> co-occurrence vector, fitted on the
    items that had both)."""

    book: Codebook
    text_map: npt.NDArray[np.float32] | None = None
    text_dim: int = 64

    @property
    def tokens(self) -> list[str]:
        return code_tokens(self.book.sizes)

    def vectors(self, texts: Sequence[str], cooc: npt.NDArray[np.float32] | None = None) -> npt.NDArray[np.float32]:
        return item_vectors(texts, self.text_map, self.text_dim, cooc)

    def assign(
        self, items: Sequence[str], texts: Sequence[str], taken: Mapping[str, Code] | None = None
    ) -> dict[str, Code]:
        """Codes from text for `items` (sorted first: any process that assigns one set of items
        against one `taken` gets the same codes)."""
        order = sorted(range(len(items)), key=lambda n: items[n])
        x = self.vectors([texts[n] for n in order])
        return assign_codes(self.book, [items[n] for n in order], x, taken)

    def save(self, path: str) -> None:
        arrays: dict[str, npt.NDArray[Any]] = {f"level{n}": c for n, c in enumerate(self.book.centroids)}
        if self.text_map is not None:
            arrays["text_map"] = self.text_map
        arrays["collision_size"] = np.array(self.book.collision_size)
        arrays["text_dim"] = np.array(self.text_dim)
        np.savez(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str) -> SemanticIds:
        try:
            with np.load(path) as f:
                text_map = f["text_map"].astype(np.float32) if "text_map" in f.files else None
                text_dim = int(f["text_dim"]) if "text_dim" in f.files else 64
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"unreadable semantic codebook {path!r}: {exc}") from exc
        return cls(Codebook.load(path), text_map, text_dim)


def fit_semantic_ids(
    items: Sequence[str],
    texts: Sequence[str],
    cooc: npt.NDArray[np.float32] | None = None,
    *,
    levels: int = 3,
    k: int | None = None,
    seed: int = 0,
    text_dim: int = 64,
) -> tuple[SemanticIds, dict[str, Code]]:
    """Fit the codebook on the items' vectors (text, plus co-occurrence rows from history when
    `cooc` is given, zero for items without) and give every item its code."""
    t = text_vectors(texts, text_dim)
    text_map = None
    if cooc is not None:
        known = np.linalg.norm(cooc, axis=1) > 0
        if known.sum() >= 2:
            text_map = ridge_map(t[known], _unit(cooc[known]))
    x = item_vectors(texts, text_map, text_dim, cooc)
    book = fit_codebook(x, levels, k or auto_k(len(items), levels), seed=seed)
    order = sorted(range(len(items)), key=lambda n: items[n])
    return SemanticIds(book, text_map, text_dim), assign_codes(book, [items[n] for n in order], x[order])


def read_codes(path: str) -> dict[str, Code]:
    """An item -> code file (CODES_FILE); ModelError when it is unreadable."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return {str(item): tuple(int(j) for j in code) for item, code in raw.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelError(f"unreadable item codes {path!r}: {exc}") from exc


def write_codes(path: str, codes: Mapping[str, Code]) -> None:
    text = json.dumps({item: list(code) for item, code in sorted(codes.items())}, separators=(",", ":"))
    Path(path).write_text(text, encoding="utf-8")


def merged_codes(served: Mapping[str, Code], wanted: Mapping[str, Code], source: str) -> dict[str, Code]:
    """The codes in service extended by an artifact's (`wanted`). The artifact must agree on every
    item both name, and no two items may share a code: otherwise what it learned of one item's
    code would be served for another (ModelError). Items it does not name keep their codes (an
    older adapter, rolled back to, names fewer items than the trainer has coded since)."""
    moved = sorted(i for i, c in wanted.items() if i in served and served[i] != c)
    if moved:
        raise ModelError(
            f"{source}: its item codes differ from those in service for {len(moved)} item(s) (e.g. {moved[:3]}); "
            "serve an artifact trained from the codes in service, or restart the worker"
        )
    out = {**served, **wanted}
    if len(set(out.values())) < len(out):
        raise ModelError(f"{source}: its item codes give one code to two items")
    return out


def code_source(texts: Mapping[str, tuple[str, str]], item: str) -> str:
    """The text an item's code is computed from: its title and category (`texts`: item -> both)."""
    return " ".join(x for x in texts.get(item, ("", "")) if x)
