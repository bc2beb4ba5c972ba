"""Loaders for historical logs: RecBole atomic files (.inter with a typed header, optional sibling
.item for item text), a CSV / JSONL event log (user_id,item_id,timestamp[,type]) and the sequence
format (`user item item ...`). They return plain values; nothing here trains or evaluates."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from streamrec.catalog import Catalog
from streamrec.errors import StreamrecError
from streamrec.events import CatalogItem
from streamrec.instructions import HistoryItem

Format = Literal["recbole", "csv", "seq"]
FORMATS: tuple[Format, ...] = ("recbole", "csv", "seq")


class DatasetError(StreamrecError):
    """A dataset file is missing or malformed. Check the path, the --format and the header."""


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One interaction of a historical log. `order` keeps the file order to break timestamp ties."""

    user_id: str
    item_id: str
    ts: float
    type: str = "click"
    order: int = 0


@dataclass(frozen=True)
class Dataset:
    name: str
    events: list[LogEvent]
    catalog: Catalog  # every item the log mentions, with text when the source has any

    @property
    def users(self) -> int:
        return len({e.user_id for e in self.events})


def _ts(value: str, where: str) -> float:
    value = value.strip()
    if not value:
        return 0.0
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DatasetError(f"{where}: timestamp {value!r} is neither a number nor ISO-8601") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _type(value: str | None) -> str:
    v = (value or "").strip().lower()
    return "purchase" if v in ("purchase", "buy", "order", "transaction") else "click"


def _complete(name: str, events: list[LogEvent], items: Iterable[CatalogItem]) -> Dataset:
    known = {item.item_id: item for item in items}
    for e in events:
        if e.item_id not in known:
            known[e.item_id] = CatalogItem(item_id=e.item_id, title=f"item {e.item_id}")
    if not events:
        raise DatasetError(f"{name}: no interactions")
    return Dataset(name=name, events=events, catalog=Catalog(known.values()))


def _atomic_rows(path: Path) -> Iterator[tuple[list[str], list[str]]]:
    """(header names without types, field values) per row of a RecBole atomic file."""
    with path.open(encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\n").split("\t")
        names = [h.split(":", 1)[0].strip() for h in header]
        for line in f:
            line = line.rstrip("\n")
            if line:
                yield names, line.split("\t")


def _pick(names: list[str], *candidates: str) -> int | None:
    for c in candidates:
        if c in names:
            return names.index(c)
    return None


def _field(row: list[str], idx: int | None) -> str:
    return row[idx] if idx is not None and idx < len(row) else ""


def load_recbole(path: str | Path) -> Dataset:
    """A RecBole `.inter` file; a sibling `.item` with the same stem supplies item text. Events
    without a timestamp keep their file order."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    events: list[LogEvent] = []
    for n, (names, row) in enumerate(_atomic_rows(p)):
        u, i = _pick(names, "user_id"), _pick(names, "item_id")
        if u is None or i is None:
            raise DatasetError(f"{p}: header needs user_id and item_id fields, got {names}")
        t = _pick(names, "timestamp", "time")
        k = _pick(names, "type", "event_type", "behavior_type")
        ts = _ts(_field(row, t), f"{p}:{n + 2}") if t is not None else float(n)
        events.append(LogEvent(_field(row, u), _field(row, i), ts, _type(_field(row, k)), n))
    return _complete(p.stem, events, _load_item_file(p.with_suffix(".item")))


def _load_item_file(path: Path) -> list[CatalogItem]:
    """Item text from a RecBole `.item`: a title-like field becomes the title, a class/genre/category
    field the category, the remaining text fields the description (token_seq fields are text)."""
    if not path.is_file():
        return []
    items: list[CatalogItem] = []
    for names, row in _atomic_rows(path):
        i = _pick(names, "item_id")
        if i is None:
            raise DatasetError(f"{path}: header needs an item_id field, got {names}")
        title_idx = next((n for n, f in enumerate(names) if "title" in f or f == "name"), None)
        cat_idx = next(
            (n for n, f in enumerate(names) if f in ("class", "genre", "genres", "category", "categories")), None
        )
        fields = {n: row[n].strip() if n < len(row) else "" for n in range(len(names))}
        title = fields.get(title_idx, "") if title_idx is not None else ""
        category = fields.get(cat_idx, "") if cat_idx is not None else ""
        rest = [f"{names[n]}: {v}" for n, v in fields.items() if n not in (i, title_idx, cat_idx) and v]
        item_id = fields[i]
        items.append(
            CatalogItem(
                item_id=item_id,
                title=title or f"item {item_id}",
                category=category or None,
                description="; ".join(rest) or None,
            )
        )
    return items


def load_csv(path: str | Path) -> Dataset:
    """A CSV (header `user_id,item_id,timestamp[,type]`) or JSON-lines event log (.jsonl/.json, the
    same keys; `ts` is accepted for the timestamp, as in streamrec events)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    events: list[LogEvent] = []
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    ts = rec.get("timestamp", rec.get("ts", n))
                    events.append(
                        LogEvent(
                            str(rec["user_id"]),
                            str(rec["item_id"]),
                            _ts(str(ts), f"{p}:{n + 1}"),
                            _type(rec.get("type")),
                            n,
                        )
                    )
                except (json.JSONDecodeError, KeyError, AttributeError) as exc:
                    raise DatasetError(f"{p}:{n + 1}: bad record ({exc})") from None
    else:
        with p.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            need = {"user_id", "item_id"}
            if not reader.fieldnames or not need <= set(reader.fieldnames):
                raise DatasetError(f"{p}: header must start user_id,item_id,timestamp[,type]; got {reader.fieldnames}")
            for n, rec in enumerate(reader):
                ts = rec.get("timestamp") or rec.get("ts") or str(n)
                events.append(
                    LogEvent(rec["user_id"], rec["item_id"], _ts(ts, f"{p}:{n + 2}"), _type(rec.get("type")), n)
                )
    return _complete(p.stem, events, [])


def load_sequences(path: str | Path) -> Dataset:
    """One user per line: `user item item ...` in time order (positions become timestamps)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    events: list[LogEvent] = []
    n = 0
    with p.open(encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            for pos, item in enumerate(parts[1:]):
                events.append(LogEvent(parts[0], item, float(pos), "click", n))
                n += 1
    return _complete(p.stem, events, [])


def load(path: str | Path, fmt: Format) -> Dataset:
    if fmt == "recbole":
        return load_recbole(path)
    if fmt == "csv":
        return load_csv(path)
    if fmt == "seq":
        return load_sequences(path)
    raise DatasetError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def write_recbole(dataset: Dataset, inter_path: str | Path) -> None:
    """Write a dataset as RecBole atomic files (`.inter`, and `.item` beside it)."""
    p = Path(inter_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\ttype:token\n")
        for e in dataset.events:
            f.write(f"{e.user_id}\t{e.item_id}\t{e.ts}\t{e.type}\n")
    with p.with_suffix(".item").open("w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq\tcategory:token_seq\tdescription:token_seq\n")
        for item in dataset.catalog:
            clean = [" ".join((v or "").split()) for v in (item.title, item.category, item.description)]
            f.write("\t".join([item.item_id, *clean]) + "\n")


# ---- the offline protocol's split: leave-one-out per user in time order (last interaction = test,
# second last = validation, the rest = train)


def sequences(events: Iterable[LogEvent]) -> dict[str, list[HistoryItem]]:
    """Each user's history in time order; equal timestamps keep the file order."""
    by_user: dict[str, list[LogEvent]] = {}
    for e in events:
        by_user.setdefault(e.user_id, []).append(e)
    return {
        u: [HistoryItem(e.item_id, e.type) for e in sorted(evs, key=lambda e: (e.ts, e.order))]
        for u, evs in by_user.items()
    }


@dataclass(frozen=True)
class Split:
    """train: every user's history except the held-out items; valid/test: the held-out item of
    each user with at least three interactions (shorter users only train)."""

    train: dict[str, list[HistoryItem]]
    valid: dict[str, HistoryItem]
    test: dict[str, HistoryItem]

    def history(self, user: str, stage: str) -> list[HistoryItem]:
        """What the model sees before predicting `stage` ('valid' or 'test') for `user`."""
        if stage == "valid":
            return self.train[user]
        if stage == "test":
            return [*self.train[user], self.valid[user]]
        raise ValueError(f"stage must be 'valid' or 'test', not {stage!r}")

    def targets(self, stage: str) -> dict[str, str]:
        held = self.valid if stage == "valid" else self.test
        return {u: h.item_id for u, h in held.items()}


def leave_one_out(events: Iterable[LogEvent]) -> Split:
    train: dict[str, list[HistoryItem]] = {}
    valid: dict[str, HistoryItem] = {}
    test: dict[str, HistoryItem] = {}
    for user, seq in sequences(events).items():
        if len(seq) >= 3:
            train[user], valid[user], test[user] = seq[:-2], seq[-2], seq[-1]
        else:
            train[user] = seq
    return Split(train=train, valid=valid, test=test)
