"""The inference worker's generation step keeps one user's failure to that user: the others in the
batch are served exactly as they would be alone, and a fault that is nobody's is raised."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from walks import CATALOG_ITEMS, walk

from streamrec.catalog import Catalog
from streamrec.events import Event, HistoryUpdate
from streamrec.generation import Generator
from streamrec.instructions import RecRequest
from streamrec.settings import Settings

pytestmark = pytest.mark.model

POISON = "i13"
T0 = datetime(2024, 3, 1, tzinfo=UTC)


def update(user: str, items: list[str]) -> HistoryUpdate:
    events = [
        Event(event_id=f"{user}-{n}", user_id=user, item_id=item, type="click", ts=T0 + timedelta(seconds=n))
        for n, item in enumerate(items)
    ]
    return HistoryUpdate(user_id=user, events=events, trigger_event_id=events[-1].event_id, event_ts=events[-1].ts)


@pytest.fixture
def generator(walk_model: Path, tmp_path: Path) -> Generator:
    worker = Generator(Settings(data_dir=tmp_path, model={"base": str(walk_model)}))
    worker.set_catalog(Catalog(CATALOG_ITEMS), (1, 1))
    return worker


def poison(generator: Generator, always: bool = False) -> None:
    """Make the model fail on any batch that holds a history with POISON (or on every batch)."""
    assert generator.recommender is not None
    real = generator.recommender.recommend

    def recommend(requests: Sequence[RecRequest], *args: Any, **kwargs: Any) -> Any:
        if always or any(POISON in [h.item_id for h in r.history] for r in requests):
            raise RuntimeError("the model cannot take this history")
        return real(requests, *args, **kwargs)

    generator.recommender.recommend = recommend  # type: ignore[method-assign]


def items(rec: Any) -> list[tuple[str, float]]:
    return [(i.item_id, i.score) for i in rec.items]


def test_one_users_failure_stays_with_that_user(generator: Generator) -> None:
    batch = [update("a", walk(3, 6)), update("b", walk(11, 6)), update("c", walk(20, 6))]  # b holds i13
    alone = {u.user_id: items(generator.generate([u], {})[0]) for u in batch if u.user_id != "b"}
    poison(generator)
    served, failed = generator.generate_each(batch, {})
    assert [n for n, _ in served] == [0, 2]
    assert {batch[n].user_id: items(rec) for n, rec in served} == alone
    assert [(n, str(exc)) for n, exc in failed] == [(1, "the model cannot take this history")]


def test_a_lone_failing_user_is_returned_as_failed(generator: Generator) -> None:
    poison(generator)
    served, failed = generator.generate_each([update("b", walk(11, 6))], {})
    assert served == [] and [n for n, _ in failed] == [0]


def test_a_fault_that_is_nobodys_is_raised(generator: Generator) -> None:
    poison(generator, always=True)
    with pytest.raises(RuntimeError, match="cannot take"):
        generator.generate_each([update("a", walk(3, 6)), update("c", walk(20, 6))], {})
