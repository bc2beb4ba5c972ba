"""The catalog, identifier schemes and the item trie: generation can only ever reach real items."""

from __future__ import annotations

import pytest

from streamrec.catalog import Catalog, ItemTrie, build_trie, identifiers, item_token
from streamrec.errors import ModelError
from streamrec.events import CatalogItem

EOS = 1


def _catalog() -> Catalog:
    return Catalog(
        [
            CatalogItem(item_id="a", title="Red Shoes", category="shoes"),
            CatalogItem(item_id="b", title="Red Shirt", category="shirts"),
            CatalogItem(item_id="c", title="Blue Shirt", category="shirts", available=False),
            CatalogItem(item_id="d", title="Red Shoes", category="shoes"),  # same title as "a"
        ]
    )


def _encode(text: str) -> list[int]:
    """A toy word-level tokenizer: one id per distinct word, then EOS."""
    vocab: dict[str, int] = {}
    return [vocab.setdefault(w, 10 + sum(map(ord, w))) for w in text.split()] + [EOS]


def test_catalog_keeps_unavailable_items_known_but_not_recommendable() -> None:
    cat = _catalog()
    assert "c" in cat and len(cat) == 4
    assert cat.available_ids == ["a", "b", "d"]


def test_a_later_record_replaces_an_item_like_a_compacted_topic() -> None:
    cat = _catalog().updated([CatalogItem(item_id="c", title="Blue Shirt", available=True)])
    assert "c" in cat.available_ids
    assert "c" not in _catalog().available_ids  # the original is untouched


def test_identifiers_are_unique_per_scheme() -> None:
    cat = _catalog()
    tokens = identifiers(cat, "item_token")
    assert tokens["a"] == item_token("a") and len(set(tokens.values())) == 4
    titles = identifiers(cat, "title")
    assert titles["b"] == "Red Shirt"
    assert len(set(titles.values())) == 4  # the repeated title is told apart by its id
    assert titles["d"] == "Red Shoes #d"


def test_unknown_scheme_is_an_error() -> None:
    with pytest.raises(ModelError):
        identifiers(_catalog(), "emoji")  # type: ignore[arg-type]


def test_trie_walks_only_to_available_items() -> None:
    trie = build_trie(_catalog(), "title", _encode)
    assert set(trie.items) == {"a", "b", "d"}  # "c" is unavailable
    red = _encode("Red")[0]
    assert set(trie.allowed([])) == {red}  # no blue item is available
    after_red = trie.allowed([red])
    assert len(after_red) == 2  # Shoes, Shirt
    for seq_item in ("a", "b", "d"):
        path = trie.path(seq_item)
        assert trie.item_at(path) == seq_item
        assert trie.item_at(path[:-1]) is None  # unfinished until EOS
    assert trie.allowed([999]) == []


def test_trie_prunes_branches_whose_items_are_all_excluded() -> None:
    trie = ItemTrie({"x": [5, 6, EOS], "y": [5, 7, EOS], "z": [8, EOS]})
    assert set(trie.allowed([])) == {5, 8}
    excl = trie.excluded_counts({"x", "y"})
    assert trie.allowed([], excl) == [8]
    excl = trie.excluded_counts({"x"})
    assert set(trie.allowed([], excl)) == {5, 8}
    assert trie.allowed([5], excl) == [7]
    assert trie.allowed([], trie.excluded_counts({"unknown"})) == [5, 8]


def test_trie_rejects_two_items_with_one_sequence() -> None:
    with pytest.raises(ModelError):
        ItemTrie({"x": [5, EOS], "y": [5, EOS]})


def test_build_trie_separates_items_a_tokenizer_cannot_tell_apart() -> None:
    cat = Catalog([CatalogItem(item_id="p", title="Ünï"), CatalogItem(item_id="q", title="Ñö")])

    def lossy(text: str) -> list[int]:  # every non-ASCII word becomes <unk> (2)
        return [2 if not w.isascii() else 10 + sum(map(ord, w)) for w in text.split()] + [EOS]

    trie = build_trie(cat, "title", lossy)
    assert len(trie) == 2 and trie.path("p") != trie.path("q")
