"""`streamrec tail`'s line: the task and template that served a list, and why each item is there."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console

from streamrec.cli.stream import tail_line
from streamrec.events import ModelVersion, Recommendation, RecommendedItem

T0 = datetime(2024, 6, 1, tzinfo=UTC)


def printed(rec: Recommendation, titles: dict[str, str]) -> str:
    console = Console(width=400, record=True, color_system=None)
    console.print(tail_line(rec, titles, T0 + timedelta(milliseconds=250)))
    return console.export_text().strip()


def test_tail_shows_task_template_and_explanations() -> None:
    rec = Recommendation(
        rec_id="r",
        user_id="u[1]",
        items=[
            RecommendedItem(
                item_id="a",
                score=0.5,
                reason="model",
                explanation='because you bought "Orchid [Compact] Car Seat"',
                explained_by="knn",
                explanation_item_id="s",
            ),
            RecommendedItem(item_id="b", score=0.25, reason="trending", explanation="trending now"),
            RecommendedItem(item_id="c", score=0.1),
        ],
        model=ModelVersion(base="tiny", adapter="v3"),
        task="next_purchase",
        template="purchase-plain",
        event_ts=T0,
    )
    titles = {"a": "Stroller [red]", "b": "Bib"}
    assert printed(rec, titles) == (
        "u[1] [250 ms, tiny+v3, next_purchase: purchase-plain] "
        'Stroller [red] (0.50; because you bought "Orchid [Compact] Car Seat"), Bib (0.25; trending now), c (0.10)'
    )
    old = Recommendation(rec_id="r", user_id="u", items=[], model=ModelVersion(base="tiny"))
    assert printed(old, {}) == "u [-, tiny]"


def test_the_demo_shows_the_task_and_why(tmp_path: Path) -> None:
    from streamrec.lab.demo import Trainer, Watch, _view
    from streamrec.lab.traffic import SendStats

    rec = Recommendation(
        rec_id="r",
        user_id="u1",
        items=[
            RecommendedItem(item_id="a", score=0.5, reason="model", explanation='because you clicked "Bib"'),
            RecommendedItem(item_id="b", score=0.2, reason="trending"),  # written before explanations
        ],
        model=ModelVersion(base="tiny"),
        task="cold_start",
        template="cold-plain",
    )
    watch = Watch(latest={"u1": rec})
    trainer = Trainer(tmp_path / "increments.jsonl", tmp_path / "train.log")
    console = Console(width=300, record=True, color_system=None)
    console.print(_view(watch, SendStats(), 0.0, {"a": "Stroller"}, ["u1"], trainer, 100))
    row = next(line for line in console.export_text().splitlines() if "u1" in line)
    assert "cold_start" in row and 'Stroller (because you clicked "Bib")' in row and "b (trending)" in row
