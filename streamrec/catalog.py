"""The item catalog, the identifier schemes that name items to the model, and the prefix trie that
keeps constrained generation inside the catalog. Pure python: no torch, no tokenizer objects here
(a scheme receives an `encode` callable), so everything can be tested on plain values."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from streamrec.errors import InvalidMessage, ModelError
from streamrec.events import CatalogItem, parse
from streamrec.settings import ContractSettings

SchemeName = Literal["item_token", "title", "semantic"]
SCHEMES: tuple[SchemeName, ...] = ("item_token", "title", "semantic")


@dataclass(frozen=True, slots=True)
class ScoredItem:
    """One recommended item: a catalog id and the model's score (higher is better)."""

    item_id: str
    score: float


class Catalog:
    """Items by id, in a stable order. Unavailable items stay known (a history may mention them)
    but are never recommended."""

    def __init__(self, items: Iterable[CatalogItem]) -> None:
        self._items: dict[str, CatalogItem] = {}
        for item in items:
            self._items[item.item_id] = item  # a later record of the same id wins, like a compacted topic

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def __iter__(self) -> Iterator[CatalogItem]:
        return iter(self._items.values())

    def get(self, item_id: str) -> CatalogItem | None:
        return self._items.get(item_id)

    @property
    def ids(self) -> list[str]:
        return list(self._items)

    @property
    def available_ids(self) -> list[str]:
        return [i for i, item in self._items.items() if item.available]

    def fingerprint(self) -> tuple[int, int]:
        """A cheap identity of the content that serving depends on: a catalog that keeps it needs no
        new trie or identifiers."""
        return (len(self), hash(tuple((i.item_id, i.available, i.title) for i in self)))

    def updated(self, items: Iterable[CatalogItem]) -> Catalog:
        """A new catalog with these records added or replaced (the old one is left untouched)."""
        return Catalog([*self._items.values(), *items])


def decode_item(value: bytes | None, key: bytes | None, limits: ContractSettings) -> CatalogItem:
    """The item a catalog message carries, or InvalidMessage: the contract, and a key (when there is
    one) that is the item's id, since compaction keeps one record per key."""
    item = parse(CatalogItem, value, limits)
    if key is not None and key != item.item_id.encode():
        raise InvalidMessage(f"message key {key[:300]!r} is not the item_id {item.item_id!r}")
    return item


def read_catalog(table: Mapping[bytes, bytes]) -> Catalog:
    """The catalog held in a table or topic mirror (item id -> CatalogItem JSON), skipping entries that
    do not validate (the ingest worker's catalog agent sends those to the dead-letter topic)."""
    items = []
    for value in list(table.values()):  # copied first: the trainer reads a mirror from its own thread
        try:
            items.append(parse(CatalogItem, value))
        except InvalidMessage:
            continue
    return Catalog(items)


def item_token(item_id: str) -> str:
    """The dedicated vocabulary token of an item under the `item_token` scheme."""
    return f"<item_{item_id}>"


ITEM_TOKEN_PREFIX, ITEM_TOKEN_SUFFIX = "<item_", ">"


def item_of_token(token: str) -> str | None:
    """The item an `item_token` names, or None for any other token."""
    if token.startswith(ITEM_TOKEN_PREFIX) and token.endswith(ITEM_TOKEN_SUFFIX) and len(token) > 7:
        return token[len(ITEM_TOKEN_PREFIX) : -len(ITEM_TOKEN_SUFFIX)]
    return None


def item_tokens_to_add(have: Mapping[str, int], size: int, wanted: Mapping[str, int], source: str) -> list[str]:
    """The items to give tokens, in id order, so that a tokenizer whose item tokens are `have` and
    whose next id is `size` maps items exactly as `wanted` (an artifact's mapping, item -> token id).
    The artifact must extend what is served: every item served keeps its id, and its new items take
    the next ids, one after the other. Anything else would put trained rows on other items: ModelError."""
    moved = sorted(i for i, t in have.items() if wanted.get(i, t) != t)
    lacking = sorted(i for i in have if i not in wanted)
    if moved or lacking:
        detail = f"{len(moved)} item(s) with other token ids (e.g. {moved[:3]})" if moved else ""
        if lacking:
            detail += f"{'; ' if detail else ''}{len(lacking)} served item(s) it does not map (e.g. {lacking[:3]})"
        raise ModelError(
            f"{source}: its item mapping does not extend the one in service: {detail}. Its item rows would land "
            "on other items; serve an artifact trained from the mapping in service, or restart the worker "
            "(it then starts from the base model's mapping)"
        )
    new = sorted((t, i) for i, t in wanted.items() if i not in have)
    expected = list(range(size, size + len(new)))
    if [t for t, _ in new] != expected:
        raise ModelError(
            f"{source}: its new items' token ids {[t for t, _ in new][:5]}... are not the next ids of the model "
            f"in service ({size}..): it was made from another base model or vocabulary"
        )
    return [i for _, i in new]


def identifiers(
    catalog: Catalog, scheme: SchemeName, codes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, str]:
    """The text that names each catalog item to the model, unique per item.

    `item_token`: one added token per item. `title`: the title itself; repeated titles get the id
    appended, because two items sharing one token sequence could not be told apart by the trie.
    `semantic`: the tokens of the item's code (`codes`: item -> code); items without one are left out."""
    if scheme == "item_token":
        return {item.item_id: item_token(item.item_id) for item in catalog}
    if scheme == "semantic":
        from streamrec.codes import code_text

        codes = codes or {}
        return {item.item_id: code_text(codes[item.item_id]) for item in catalog if item.item_id in codes}
    if scheme != "title":
        raise ModelError(f"unknown identifier scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    counts: dict[str, int] = {}
    for item in catalog:
        key = " ".join(item.title.split()).casefold()  # the title as written below
        counts[key] = counts.get(key, 0) + 1
    out: dict[str, str] = {}
    for item in catalog:
        title = " ".join(item.title.split())
        title = item.title if title == item.title else title  # the catalog's own string: no copy per item
        out[item.item_id] = title if counts[title.casefold()] == 1 else f"{title} #{item.item_id}"
    return out


@dataclass(slots=True, eq=False)
class TrieNode:
    """One prefix of the trie; decoding keeps one per live beam, so a step is a dictionary lookup."""

    children: dict[int, TrieNode] = field(default_factory=dict)
    item_id: str | None = None  # set on the node reached by an item's complete sequence
    count: int = 0  # items at or below this node: lets a request prune branches it has excluded


class ItemTrie:
    """A prefix trie over the token-id sequences of item identifiers (each ending with EOS).

    `allowed(prefix)` lists the next tokens that keep the output on a path to some item; the
    generation loop may only pick among them, so every finished sequence is a catalog item."""

    def __init__(self, sequences: Mapping[str, Sequence[int]]) -> None:
        self._root = TrieNode()
        self._paths: dict[str, tuple[int, ...]] = {}
        self.max_len = 0
        for item_id, seq in sequences.items():
            if not seq:
                raise ModelError(f"item {item_id!r} has an empty identifier")
            path = tuple(seq)
            node = self._root
            node.count += 1
            for tok in path:
                node = node.children.setdefault(tok, TrieNode())
                node.count += 1
            if node.item_id is not None or node.children:
                raise ModelError(f"items {node.item_id!r} and {item_id!r} share the identifier {path}")
            node.item_id = item_id
            self._paths[item_id] = path
            self.max_len = max(self.max_len, len(path))

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._paths

    @property
    def items(self) -> list[str]:
        return list(self._paths)

    def path(self, item_id: str) -> tuple[int, ...]:
        return self._paths[item_id]

    def _node(self, prefix: Sequence[int]) -> TrieNode | None:
        node: TrieNode | None = self._root
        for tok in prefix:
            if node is None:
                return None
            node = node.children.get(tok)
        return node

    def excluded_counts(self, exclude: Iterable[str]) -> dict[int, int]:
        """Per-node count of excluded items below it (by node identity), for `allowed`."""
        counts: dict[int, int] = {}
        for item_id in exclude:
            path = self._paths.get(item_id)
            if path is None:
                continue
            node = self._root
            counts[id(node)] = counts.get(id(node), 0) + 1
            for tok in path:
                node = node.children[tok]
                counts[id(node)] = counts.get(id(node), 0) + 1
        return counts

    def allowed(self, prefix: Sequence[int], excluded: Mapping[int, int] | None = None) -> list[int]:
        """Tokens that may follow `prefix` and still lead to an item not excluded. `excluded` comes
        from `excluded_counts` (computed once per request, not per step)."""
        node = self._node(prefix)
        if node is None:
            return []
        if not excluded:
            return list(node.children)
        return [t for t, child in node.children.items() if child.count > excluded.get(id(child), 0)]

    @property
    def root(self) -> TrieNode:
        return self._root

    @staticmethod
    def next_tokens(node: TrieNode, excluded: Mapping[int, int] | None = None) -> list[tuple[int, TrieNode]]:
        """`allowed` from a node already reached: (token, child) pairs that still lead to an item
        not excluded."""
        if not excluded:
            return list(node.children.items())
        return [(t, child) for t, child in node.children.items() if child.count > excluded.get(id(child), 0)]

    @staticmethod
    def sole_item(node: TrieNode) -> str | None:
        """The item below `node` when it is the only one: its remaining tokens are then certain."""
        if node.count != 1:
            return None
        while node.item_id is None:
            node = next(iter(node.children.values()))
        return node.item_id

    def items_below(self, node: TrieNode, excluded: Mapping[int, int] | None = None) -> list[str]:
        """Every item at or below `node`, minus excluded ones (`excluded_counts`)."""
        out: list[str] = []
        stack = [node]
        while stack:
            here = stack.pop()
            if here.item_id is not None:
                out.append(here.item_id)
            stack.extend(child for _, child in self.next_tokens(here, excluded))
        return out

    def nodes(self, item_id: str) -> list[TrieNode]:
        """The nodes an item's path passes through, the root first and its own last node excluded:
        the node each of its tokens is chosen at."""
        node, out = self._root, []
        for tok in self._paths[item_id]:
            out.append(node)
            node = node.children[tok]
        return out

    def item_at(self, prefix: Sequence[int]) -> str | None:
        """The item a complete sequence names, or None while the sequence is unfinished."""
        node = self._node(prefix)
        return None if node is None else node.item_id


def build_trie(
    catalog: Catalog,
    scheme: SchemeName,
    encode: Callable[[str], Sequence[int]],
    *,
    available_only: bool = True,
    encode_many: Callable[[Sequence[str]], Sequence[Sequence[int]]] | None = None,
    codes: Mapping[str, tuple[int, ...]] | None = None,
) -> ItemTrie:
    """The trie over `encode(identifier)` of every (available) item that has an identifier
    (`codes`: under `semantic`). `encode` must return the token ids the model generates for that
    text, including the closing EOS; `encode_many`, when given, does the same for a list of texts in
    one call (one batched tokenizer call for a large catalog, instead of one per item)."""
    names = identifiers(catalog, scheme, codes)
    keep = set(catalog.available_ids) if available_only else set(names)
    ids = [item_id for item_id in names if item_id in keep]
    # One object per token id, shared by every path (a tokenizer returns fresh ints): at 10^6 items
    # that is most of the paths' memory. Encoded in chunks, so the lists it returns are short-lived.
    canon: dict[int, int] = {}
    seqs: dict[str, tuple[int, ...]] = {}
    chunk = 1 << 16
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        texts = [names[i] for i in part]
        encoded = encode_many(texts) if encode_many is not None else [encode(t) for t in texts]
        for item_id, seq in zip(part, encoded, strict=True):
            seqs[item_id] = tuple([canon.setdefault(t, t) for t in seq])
    # A tokenizer can map two different texts to one sequence (unknown characters become <unk>):
    # those items get their id appended so each still has a path of its own.
    seen: dict[tuple[int, ...], int] = {}
    for seq in seqs.values():
        seen[seq] = seen.get(seq, 0) + 1
    for item_id, seq in list(seqs.items()):
        if seen[seq] > 1:
            seqs[item_id] = tuple(encode(f"{names[item_id]} #{item_id}"))
    return ItemTrie(seqs)
