"""Semantic ids: residual k-means codes over item vectors, unique per item, from text for new items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from streamrec.codes import Codebook, assign_codes, code_text, code_tokens, fit_codebook, text_vectors
from streamrec.errors import ModelError


def clustered(
    n: int, groups: int, dim: int = 16, seed: int = 0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """`n` vectors around `groups` well-separated centres: (vectors, group of each)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim)) * 10
    group = rng.integers(0, groups, n)
    return (centres[group] + rng.standard_normal((n, dim)) * 0.1).astype(np.float32), group


def test_text_vectors_are_the_same_everywhere_and_put_shared_words_close() -> None:
    texts = ["Toy Story (1995)", "toy story 2", "Heat (1995)", ""]
    x = text_vectors(texts)
    np.testing.assert_array_equal(x, text_vectors(texts))  # no process-salted hash
    assert np.allclose(np.linalg.norm(x[:3], axis=1), 1.0) and not x[3].any()
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2


def test_codes_are_unique_and_their_first_level_follows_the_clusters() -> None:
    x, group = clustered(2000, 8)
    book = fit_codebook(x, levels=3, k=8, seed=1)
    ids = [f"i{n}" for n in range(len(x))]
    codes = assign_codes(book, ids, x)
    assert len(set(codes.values())) == len(ids)
    assert all(len(c) == 4 and all(0 <= j < s for j, s in zip(c, book.sizes, strict=True)) for c in codes.values())
    first = np.array([codes[i][0] for i in ids])
    for g in range(8):  # each cluster is one first-level code, and no two share one
        assert len(set(first[group == g])) == 1
    assert len(set(first)) == 8
    # The vocabulary is the codebook's, not the catalog's: 3 x 8 plus the collision level.
    assert len(code_tokens(book.sizes)) == 24 + book.collision_size < len(ids) // 10
    assert code_text(codes["i0"]) == "".join(f"<c{lv}_{j}>" for lv, j in enumerate(codes["i0"]))


def test_a_new_item_gets_a_free_code_in_the_cell_of_its_vectors(tmp_path: Path) -> None:
    x, _ = clustered(500, 4)
    book = fit_codebook(x, levels=2, k=4, seed=0)
    old = assign_codes(book, [f"i{n}" for n in range(500)], x)
    book.save(str(tmp_path / "codes.npz"))
    again = Codebook.load(str(tmp_path / "codes.npz"))
    assert again.sizes == book.sizes
    twin = x[7:8] + np.float32(1e-4)  # a new item whose vector is i7's
    new = assign_codes(again, ["n0"], twin, taken=old)
    assert new["n0"][:-1] == old["i7"][:-1] and new["n0"] not in set(old.values())
    assert assign_codes(again, ["n0"], twin, taken=old) == new  # a pure function of its arguments


def test_a_full_cell_sends_the_item_to_the_nearest_cell_with_room() -> None:
    x, _ = clustered(64, 2, seed=3)
    book = Codebook(fit_codebook(x, levels=2, k=2, seed=0).centroids, collision_size=2)
    codes = assign_codes(book, [f"i{n}" for n in range(4)], np.repeat(x[:1], 4, axis=0))
    assert len(set(codes.values())) == 4
    cells = {c[:-1] for c in codes.values()}
    assert len(cells) == 2 and {c[0] for c in cells} == {codes["i0"][0]}  # overflow leaves only the finest level


def test_too_many_twins_for_every_cell_is_a_clear_error() -> None:
    x, _ = clustered(64, 2, seed=3)
    book = Codebook(fit_codebook(x, levels=1, k=2, seed=0).centroids, collision_size=1)
    with pytest.raises(ModelError, match="no room left"):
        assign_codes(book, ["a", "b", "c"], np.repeat(x[:1], 3, axis=0))


def test_items_with_history_are_coded_by_it_and_new_ones_through_their_text(tmp_path: Path) -> None:
    """Two groups of items whose titles say nothing of which group they are in, but whose history
    does: the first level follows the history. A new item without history whose title shares a word
    with one group's titles is coded into that group's first-level cell (through the ridge map from
    text to co-occurrence vectors), and the codebook with its map survives a save."""
    from streamrec.codes import SemanticIds, auto_k, fit_semantic_ids

    rng = np.random.default_rng(0)
    items = [f"i{n}" for n in range(200)]
    group = np.arange(200) % 2
    texts = [f"{'red' if g else 'blue'} thing {rng.integers(10**6)}" for g in group]
    centres = np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0]], dtype=np.float32)
    cooc = (centres[group] + rng.standard_normal((200, 4)) * 0.1).astype(np.float32)
    cooc[-1] = 0  # the last item has no history
    ids, codes = fit_semantic_ids(items, texts, cooc, levels=2, k=2, seed=0)
    assert auto_k(1682, 3) == 24 and auto_k(10**6, 3) == 200 and auto_k(10, 3) == 4
    first = {codes[i][0] for i, g in zip(items, group, strict=True) if g == 0}
    assert len(first) == 1 and first != {codes[i][0] for i, g in zip(items, group, strict=True) if g == 1}
    assert codes["i199"][0] == codes["i197"][0]  # coded by its words: the red items' cell
    new = ids.assign(["fresh"], ["red parcel"], codes)
    assert new["fresh"][0] == codes["i1"][0] and new["fresh"] not in codes.values()
    ids.save(str(tmp_path / "codebook.npz"))
    again = SemanticIds.load(str(tmp_path / "codebook.npz"))
    assert again.assign(["fresh"], ["red parcel"], codes) == new


def test_an_artifacts_codes_extend_those_in_service_or_are_refused(tmp_path: Path) -> None:
    from streamrec.codes import merged_codes, read_codes, write_codes

    served = {"a": (0, 0, 0), "b": (0, 1, 0)}
    assert merged_codes(served, {"a": (0, 0, 0), "c": (1, 0, 0)}, "x") == {**served, "c": (1, 0, 0)}
    assert merged_codes(served, {"a": (0, 0, 0)}, "x") == served  # an older adapter names fewer items
    with pytest.raises(ModelError, match="differ from those in service"):
        merged_codes(served, {"a": (0, 1, 0), "b": (0, 0, 0)}, "x")
    with pytest.raises(ModelError, match="one code to two items"):
        merged_codes(served, {"c": (0, 1, 0)}, "x")
    write_codes(str(tmp_path / "codes.json"), served)
    assert read_codes(str(tmp_path / "codes.json")) == served
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="unreadable item codes"):
        read_codes(str(tmp_path / "bad.json"))
