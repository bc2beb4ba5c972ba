"""The simulator must be deterministic, consistent with its catalog, and realistic enough that
sequence models beat popularity and a model frozen before drift falls behind."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pytest

from streamrec.events import CatalogItem, Event, EventType
from streamrec.lab.simulate import SimConfig, generate_events, make_catalog, write_catalog, write_log

COUNT = 20_000
CFG = SimConfig()
# Same world without taste drift or trend shift: the yardstick for "drift exists".
STILL = dataclasses.replace(CFG, drift=0.0, trend_shift_at=None)


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return list(generate_events(CFG, COUNT))


@pytest.fixture(scope="module")
def catalog() -> list[CatalogItem]:
    return make_catalog(CFG)


def _clicks(events: Sequence[Event]) -> list[Event]:
    return [e for e in events if e.type is EventType.CLICK]


def _hit_rates(train: Sequence[Event], test: Sequence[Event], k: int = 10) -> tuple[float, float]:
    """HR@k of a first-order Markov model (last click -> next click) and of popularity."""
    last: dict[str, str] = {}
    trans: defaultdict[str, Counter[str]] = defaultdict(Counter)
    pop: Counter[str] = Counter()
    for e in _clicks(train):
        pop[e.item_id] += 1
        if e.user_id in last:
            trans[last[e.user_id]][e.item_id] += 1
        last[e.user_id] = e.item_id
    top = [i for i, _ in pop.most_common(k)]
    markov_hits = pop_hits = n = 0
    for e in _clicks(test):
        prev = last.get(e.user_id)
        if prev is not None:
            ranked = [i for i, _ in trans[prev].most_common(k)]
            ranked += [i for i in top if i not in ranked][: k - len(ranked)]
            markov_hits += e.item_id in ranked
            pop_hits += e.item_id in top
            n += 1
        last[e.user_id] = e.item_id
    return markov_hits / n, pop_hits / n


def _first_last_quarter_tv(cfg: SimConfig, events: Sequence[Event], min_events: int = 20) -> float:
    """Mean total-variation distance between a user's category mix in the first and last quarter."""
    category = {item.item_id: item.category for item in make_catalog(cfg)}
    q = len(events) // 4

    def mix(part: Sequence[Event]) -> defaultdict[str, Counter[str | None]]:
        out: defaultdict[str, Counter[str | None]] = defaultdict(Counter)
        for e in part:
            out[e.user_id][category[e.item_id]] += 1
        return out

    first, last = mix(events[:q]), mix(events[-q:])
    tvs = []
    for user, a in first.items():
        b = last.get(user, Counter())
        na, nb = a.total(), b.total()
        if na >= min_events and nb >= min_events:
            tvs.append(0.5 * sum(abs(a[c] / na - b[c] / nb) for c in a.keys() | b.keys()))
    assert len(tvs) >= 20, "too few active users to measure drift"
    return sum(tvs) / len(tvs)


def test_same_seed_same_stream_other_seed_other_stream(events: list[Event]) -> None:
    again = list(generate_events(CFG, COUNT))
    assert again == events
    assert make_catalog(CFG) == make_catalog(CFG)
    other = list(generate_events(dataclasses.replace(CFG, seed=8), 200))
    assert [e.item_id for e in other] != [e.item_id for e in events[:200]]
    assert sum(1 for _ in generate_events(CFG, 0)) == 0


def test_catalog_has_text_categories_and_a_few_unavailable_items(catalog: list[CatalogItem]) -> None:
    assert [c.item_id for c in catalog] == [f"i{i:04d}" for i in range(CFG.items)]
    assert len({c.title for c in catalog}) == len(catalog), "titles must be unique identifiers"
    assert len({c.category for c in catalog}) == CFG.categories
    assert all(c.description and len(c.title.split()) >= 3 for c in catalog)
    unavailable = sum(not c.available for c in catalog)
    assert 0 < unavailable < len(catalog) * 0.05


def test_events_reference_available_catalog_items_with_unique_ids(
    events: list[Event], catalog: list[CatalogItem]
) -> None:
    available = {c.item_id for c in catalog if c.available}
    assert {e.item_id for e in events} <= available
    assert len({e.event_id for e in events}) == len(events)
    assert events[0].event_id == f"ev-{CFG.seed}-0"
    assert {e.user_id for e in events} <= {f"u{u:04d}" for u in range(CFG.users)}
    assert len({e.user_id for e in events}) > CFG.users * 0.9


def test_time_moves_forward_per_user_and_users_interleave(events: list[Event]) -> None:
    assert events[0].ts >= CFG.start
    assert all(e.ts.tzinfo is UTC for e in events)
    assert all(a.ts <= b.ts for a, b in pairwise(events))
    last: dict[str, datetime] = {}
    switches = 0
    for prev, e in pairwise(events):
        switches += prev.user_id != e.user_id
    for e in events:
        assert e.user_id not in last or last[e.user_id] < e.ts
        last[e.user_id] = e.ts
    assert switches > len(events) * 0.5


def test_sessions_are_bursts_separated_by_gaps(events: list[Event]) -> None:
    by_session: defaultdict[str, list[Event]] = defaultdict(list)
    for e in events:
        assert e.session_id is not None and e.session_id.startswith(e.user_id)
        by_session[e.session_id].append(e)
    mean_len = len(events) / len(by_session)
    assert 3 < mean_len < 15
    inside = [(b.ts - a.ts).total_seconds() for evs in by_session.values() for a, b in pairwise(evs)]
    starts: defaultdict[str, list[datetime]] = defaultdict(list)
    for evs in by_session.values():
        starts[evs[0].user_id].append(evs[0].ts)
    between = [(b - a).total_seconds() for s in starts.values() for a, b in pairwise(s)]
    assert sorted(inside)[len(inside) // 2] * 20 < sorted(between)[len(between) // 2]


def test_popularity_is_skewed(events: list[Event]) -> None:
    counts = Counter(e.item_id for e in events)
    top = sum(n for _, n in counts.most_common(CFG.items // 10))
    assert top / len(events) > 0.3


def test_purchases_are_a_minority_and_follow_a_click_of_the_same_item(events: list[Event]) -> None:
    purchases = [e for e in events if e.type is EventType.PURCHASE]
    assert 0.02 < len(purchases) / len(events) < 0.2
    clicked: set[tuple[str, str]] = set()
    bought: Counter[tuple[str, str]] = Counter()
    for e in events:
        key = (e.user_id, e.item_id)
        if e.type is EventType.CLICK:
            assert e.quantity is None and e.price is None
            clicked.add(key)
        else:
            assert key in clicked, f"{e.event_id} buys an item its user never clicked"
            assert e.quantity is not None and e.quantity >= 1
            assert e.price is not None and e.price > 0
            bought[key] += 1
    repeats = sum(n - 1 for n in bought.values())
    assert repeats < len(purchases) * 0.05


def test_a_first_order_markov_model_beats_popularity(events: list[Event]) -> None:
    cut = int(len(events) * 0.8)
    markov, popularity = _hit_rates(events[:cut], events[cut:])
    assert markov > popularity + 0.15
    assert markov > 1.5 * popularity
    assert markov < 0.9, "the next item must not be trivially predictable"


def test_tastes_drift_and_a_frozen_model_falls_behind(events: list[Event]) -> None:
    still = list(generate_events(STILL, COUNT))
    assert _first_last_quarter_tv(CFG, events) > _first_last_quarter_tv(STILL, still) + 0.1

    # Trained before the trend shift (at 50%), the Markov model is worse at the end of the stream.
    def decay(stream: list[Event]) -> float:
        n = len(stream)
        early, _ = _hit_rates(stream[: int(0.4 * n)], stream[int(0.4 * n) : int(0.5 * n)])
        late, _ = _hit_rates(stream[: int(0.4 * n)], stream[int(0.9 * n) :])
        return early - late

    assert decay(events) > decay(still) + 0.05


def test_write_log_and_catalog(tmp_path: Path, events: list[Event], catalog: list[CatalogItem]) -> None:
    log = tmp_path / "events.csv"
    assert write_log(events[:500], log) == 500
    with log.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["user_id", "item_id", "timestamp", "type"]
    assert len(rows) == 500
    for row, e in zip(rows, events, strict=False):
        assert (row["user_id"], row["item_id"], row["type"]) == (e.user_id, e.item_id, e.type.value)
        assert float(row["timestamp"]) == pytest.approx(e.ts.timestamp(), abs=1e-3)

    path = tmp_path / "catalog.jsonl"
    assert write_catalog(catalog, path) == len(catalog)
    lines = path.read_text().splitlines()
    assert [CatalogItem.model_validate(json.loads(line)) for line in lines] == catalog


@pytest.mark.parametrize(
    "overrides",
    [
        {"users": 0},
        {"categories": 0},
        {"categories": 99},
        {"items": 5},
        {"drift": 1.5},
        {"follow": -0.1},
        {"start": datetime(2024, 1, 1)},
    ],
)
def test_bad_config_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SimConfig(**overrides)  # type: ignore[arg-type]


def test_small_and_large_worlds_work() -> None:
    tiny = SimConfig(users=3, items=4, categories=2, seed=1)
    evs = list(generate_events(tiny, 300))
    assert len(evs) == 300
    assert {e.item_id for e in evs} <= {c.item_id for c in make_catalog(tiny)}
    big = SimConfig(users=50, items=5000, categories=20)
    assert len({c.title for c in make_catalog(big)}) == 5000
