"""The inference worker with the ingest worker, a real broker and the real tiny T5 code path:
every active user gets valid recommendations, asked with the task their state calls for and
explained by items of their history; bad input and slow generation do not stop it."""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from streamtest import caught_up, send_raw, start_worker

from streamrec.events import CatalogItem, DeadLetter, Recommendation
from streamrec.instructions import Instructions
from streamrec.kafka.broker import free_port
from streamrec.kafka.topics import create_topics, read_topic
from streamrec.lab.runner import stop_process
from streamrec.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.model, pytest.mark.slow]

T0 = datetime(2024, 6, 1, tzinfo=UTC)


def catalog(n: int = 60) -> list[CatalogItem]:
    return [
        CatalogItem(item_id=f"it{i:03d}", title=f"thing {i}", category=f"cat{i % 5}", available=i % 7 != 3)
        for i in range(n)
    ]


def user_events(users: int, per_user: int, items: list[CatalogItem], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    sellable = [i.item_id for i in items if i.available]
    out = []
    for n in range(users * per_user):
        user = f"user{n % users}"
        kind = "purchase" if rng.random() < 0.2 else "click"
        out.append(
            {
                "event_id": f"e{seed}-{n}",
                "user_id": user,
                "item_id": rng.choice(sellable),
                "type": kind,
                "ts": (T0 + timedelta(seconds=n)).isoformat(),
            }
        )
    return out


def final_clicks(events: list[dict[str, Any]], items: list[CatalogItem]) -> list[dict[str, Any]]:
    """One last click per user, sent once everything before it is ingested: clicks and purchases
    may interleave in any order, so only these make each user's final trigger certain."""
    users = sorted({e["user_id"] for e in events})
    sellable = [i.item_id for i in items if i.available]
    start = len(events)
    return [
        {
            "event_id": f"final-{u}",
            "user_id": u,
            "item_id": sellable[n % len(sellable)],
            "type": "click",
            "ts": (T0 + timedelta(seconds=start + n)).isoformat(),
        }
        for n, u in enumerate(users)
    ]


def send_and_finish(
    settings: Settings,
    events: list[dict[str, Any]],
    items: list[CatalogItem],
    ingest: Any,
    extra: list[tuple[str, str, bytes]] = (),
) -> list[dict[str, Any]]:
    """Send `events` (plus `extra` raw messages), wait until ingested, then the final clicks."""
    raw = [as_raw(settings, e) for e in events]
    raw[100:100] = list(extra)
    ends = send_raw(settings, raw, rate=400)
    inputs = {settings.topics.clicks, settings.topics.purchases}
    caught_up(settings, settings.app_id, ingest, {tp: end for tp, end in ends.items() if tp.topic in inputs})
    finals = final_clicks(events, items)
    send_raw(settings, [as_raw(settings, e) for e in finals])
    return events + finals


def as_raw(settings: Settings, event: dict[str, Any]) -> tuple[str, str, bytes]:
    topic = settings.topics.clicks if event["type"] == "click" else settings.topics.purchases
    return topic, event["user_id"], json.dumps(event).encode()


def wait_for_final(settings: Settings, last: dict[str, str], proc: Any, timeout: float = 240) -> list[Recommendation]:
    """Read recommendations until every user has one triggered by their last event."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the inference worker died"
        recs = [
            Recommendation.model_validate_json(r.value)
            for r in read_topic(settings.kafka, settings.topics.recommendations, idle=0.5)
        ]
        done = {r.user_id for r in recs if r.trigger_event_id == last.get(r.user_id)}
        if done >= set(last):
            return recs
        assert time.monotonic() < deadline, f"{len(set(last) - done)} users still without a final recommendation"
        time.sleep(2)


def reasons_of(recs: Iterable[Recommendation]) -> set[str]:
    """The sources behind the recommended items (a reason like "trending+model" names two)."""
    return {part for r in recs for i in r.items if i.reason for part in i.reason.split("+")}


def check_rules(
    recs: list[Recommendation], items: list[CatalogItem], events: list[dict[str, Any]], k: int, base: str = "tiny"
) -> None:
    available = {i.item_id for i in items if i.available}
    bought: dict[str, set[str]] = {}
    for e in events:
        if e["type"] == "purchase":
            bought.setdefault(e["user_id"], set()).add(e["item_id"])
    order = {e["event_id"]: n for n, e in enumerate(events)}
    for rec in recs:
        ids = [i.item_id for i in rec.items]
        assert 0 < len(ids) <= k
        assert len(set(ids)) == len(ids), f"duplicates in {ids}"
        assert set(ids) <= available, f"unknown or unavailable items {set(ids) - available}"
        # Items bought up to the event that triggered this list are never recommended.
        upto = order[rec.trigger_event_id or ""]
        bought_then = {
            e["item_id"] for e in events[: upto + 1] if e["user_id"] == rec.user_id and e["type"] == "purchase"
        }
        assert not set(ids) & bought_then, f"recommended a purchased item to {rec.user_id}"
        assert rec.model.base == base and rec.event_ts is not None
        assert [i.score for i in rec.items] == sorted((i.score for i in rec.items), reverse=True)
    assert bought, "the test must include purchases"


def check_tasks_and_explanations(
    recs: list[Recommendation], items: list[CatalogItem], events: list[dict[str, Any]]
) -> None:
    """Each list says which task and template served it, the task the trigger calls for, and every item
    says why it is there: trending, or an item of the user's history, by its title."""
    templates = Instructions.load()
    titles = {i.item_id: i.title for i in items}
    trigger = {e["event_id"]: e for e in events}
    for rec in recs:
        kind = trigger[rec.trigger_event_id or ""]["type"]
        assert rec.task in {"cold_start", "next_purchase" if kind == "purchase" else "next_click"}, (kind, rec.task)
        assert rec.template == templates.serving_template(rec.task).id
        history = {e["item_id"] for e in events if e["user_id"] == rec.user_id}
        bought = {e["item_id"] for e in events if e["user_id"] == rec.user_id and e["type"] == "purchase"}
        for item in rec.items:
            if item.reason == "trending":
                assert item.explanation == "trending now" and item.explained_by == "trending"
                continue
            named = item.explanation_item_id
            assert named in history, f"{rec.user_id}'s {item.item_id} explained by {named}, not in the history"
            assert item.explained_by in {"knn", "markov", "recent"}
            assert item.explanation in {f'because you {verb} "{titles[named]}"' for verb in ("clicked", "bought")}
            if named not in bought:
                assert item.explanation == f'because you clicked "{titles[named]}"'


def run_pipeline(
    make_settings: Any, tmp_path: Path, model: dict[str, Any] | None = None, **overrides: Any
) -> tuple[Settings, Settings, Any, Any]:
    """Ingest and inference workers on fresh topics; `model` settings on top of the tiny model's."""
    settings = make_settings(model={"base": "tiny", "top_k": 5} | (model or {}), **overrides)
    create_topics(settings.kafka, settings.topics)
    infer_settings = settings.model_copy(update={"web_port": free_port()})
    ingest = start_worker("ingest", settings, tmp_path / "ingest.log")
    infer = start_worker("infer", infer_settings, tmp_path / "infer.log")
    return settings, infer_settings, ingest, infer


def test_every_active_user_gets_valid_recommendations_despite_bad_input(make_settings: Any, tmp_path: Path) -> None:
    items = catalog()
    settings, infer_settings, ingest, infer = run_pipeline(
        make_settings, tmp_path, serve={"cold_start_full_at": 3, "batch_within_s": 0.05}
    )
    try:
        topics = settings.topics
        good = [(topics.catalog, i.item_id, i.model_dump_json().encode()) for i in items]
        bad_catalog = [(topics.catalog, "broken", b"{not json"), (topics.catalog, "notitle", b'{"item_id": "notitle"}')]
        send_raw(settings, bad_catalog + good)
        # A malformed history update, as a buggy producer of the internal topic would write it.
        broken = (topics.history_updates, "user3", b'{"user_id": "user3", "events": "nope"}')
        events = send_and_finish(
            settings, user_events(users=30, per_user=8, items=items, seed=1), items, ingest, [broken]
        )
        recs = wait_for_final(settings, {e["user_id"]: e["event_id"] for e in events}, infer)
        check_rules(recs, items, events, k=5)
        assert "model" in reasons_of(recs)
        check_tasks_and_explanations(recs, items, events)
        finals = {e["event_id"] for e in events[-30:]}
        assert {r.task for r in recs if r.trigger_event_id in finals} == {"next_click"}  # 9 events, a click
        # A purchase that is the user's newest event is answered with the next-purchase task.
        bought = {
            "event_id": "last-purchase",
            "user_id": "user5",
            "item_id": next(i.item_id for i in items if i.available),
            "type": "purchase",
            "ts": (T0 + timedelta(seconds=5_000)).isoformat(),
        }
        send_raw(settings, [as_raw(settings, bought)])
        answered = wait_for_final(settings, {"user5": "last-purchase"}, infer)
        after = [r for r in answered if r.trigger_event_id == "last-purchase"]
        assert [(r.task, r.template) for r in after] == [("next_purchase", "purchase-plain")]
        events.append(bought)
        check_tasks_and_explanations(after, items, events)
        # A user new once trending snapshots exist gets trending items mixed in. (The traffic's own
        # first events may be answered before the ingest worker's first snapshot arrives: a race,
        # so the check is a newcomer, tried until the inference worker's mirror has caught up.)
        for attempt in range(10):
            cold = {
                "event_id": f"cold-{attempt}",
                "user_id": f"cold{attempt}",
                "item_id": next(i.item_id for i in items if i.available),
                "type": "click",
                "ts": (T0 + timedelta(seconds=10_000 + attempt)).isoformat(),
            }
            send_raw(settings, [as_raw(settings, cold)])
            answered = wait_for_final(settings, {cold["user_id"]: cold["event_id"]}, infer)
            newcomer = [r for r in answered if r.user_id == cold["user_id"]]
            # One event: the cold-start instruction, from that item's text, mixed with trending.
            assert [(r.task, r.template) for r in newcomer] == [("cold_start", "cold-plain")]
            check_tasks_and_explanations(newcomer, items, [*events, cold])
            if "trending" in reasons_of(newcomer):
                break
        else:
            pytest.fail("no newcomer got trending items mixed in")

        letters = [DeadLetter.model_validate_json(r.value) for r in read_topic(settings.kafka, topics.dlq)]
        assert sorted(d.raw_bytes() for d in letters) == sorted(
            [b"{not json", b'{"item_id": "notitle"}', b'{"user_id": "user3", "events": "nope"}']
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{infer_settings.web_port}/metrics") as resp:
            metrics = resp.read().decode()
        assert (
            "streamrec_freshness_seconds_count" in metrics and 'streamrec_model_info{adapter="",base="tiny"}' in metrics
        )
    finally:
        stop_process(infer)
        stop_process(ingest)


def test_generation_slower_than_the_session_timeout_keeps_the_group(make_settings: Any, tmp_path: Path) -> None:
    """Each generation takes longer than the session timeout: heartbeats must go on meanwhile, or
    the group would rebalance and the same history updates would be generated twice."""
    items = catalog(30)
    settings, infer_settings, ingest, infer = run_pipeline(
        make_settings,
        tmp_path,
        session_timeout_s=4.0,
        serve={"inject_delay_s": 6.0, "batch_within_s": 0.5, "batch_size": 5},
    )
    try:
        send_raw(settings, [(settings.topics.catalog, i.item_id, i.model_dump_json().encode()) for i in items])
        # The final clicks arrive while earlier generations are still running.
        events = send_and_finish(settings, user_events(users=12, per_user=3, items=items, seed=2), items, ingest)
        recs = wait_for_final(settings, {e["user_id"]: e["event_id"] for e in events}, infer)
        check_rules(recs, items, events, k=5)
        triggers = [(r.user_id, r.trigger_event_id) for r in recs]
        assert len(triggers) == len(set(triggers)), "a history update was generated twice: the group rebalanced"
        with urllib.request.urlopen(f"http://127.0.0.1:{infer_settings.web_port}/metrics") as resp:
            metrics = dict(
                line.split(" ") for line in resp.read().decode().splitlines() if line.startswith("streamrec_generation")
            )
        assert (
            float(metrics["streamrec_generation_seconds_sum"])
            >= 6.0 * float(metrics["streamrec_generation_seconds_count"])
            >= 12.0
        )
        log = (tmp_path / "infer.log").read_text()
        assert log.count("Setting newly assigned partitions") == 1, "the worker lost its partitions"
    finally:
        stop_process(infer)
        stop_process(ingest)
