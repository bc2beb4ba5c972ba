"""Instruction templates: the editable file loads, renders behaviour and item text, and training
samples every template of a task while serving uses the configured one."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from streamrec.errors import ConfigError
from streamrec.events import Event, EventType
from streamrec.instructions import (
    HistoryItem,
    Instructions,
    RecRequest,
    training_pairs,
)

NAMES = {"1": "<item_1>", "2": "<item_2>", "3": "<item_3>"}
TEXTS = {"1": ("Toy Story", "Animation"), "2": ("Heat", "Crime"), "3": ("Alien", "")}
HISTORY = [HistoryItem("1", "click"), HistoryItem("2", "purchase"), HistoryItem("3", "click")]


def test_packaged_templates_cover_every_task() -> None:
    ins = Instructions.load()
    assert set(ins.templates) >= {"next_click", "next_purchase", "cold_start"}
    assert all(len(ts) >= 2 for ts in ins.templates.values())


def test_serving_renders_behaviour_with_types_and_item_text() -> None:
    text = Instructions.load().serve(HISTORY, "next_click", NAMES, TEXTS)
    # A click is the item alone (most events are clicks: a word each would double the history's
    # tokens); a purchase says so.
    assert "<item_1> <item_2> purchase <item_3>" in text and "click" not in text.split("History:")[1]
    assert text.index("<item_1>") < text.index("<item_2>") < text.index("<item_3>")  # oldest first
    assert "Alien (unknown)" in text  # the latest item's text; a missing category is said so
    assert "Toy Story" not in text  # only text_items = 1 item is written as text


def test_cold_start_uses_item_text_only() -> None:
    text = Instructions.load().serve(HISTORY, "cold_start", NAMES, TEXTS)
    assert "<item_" not in text
    assert "Toy Story (Animation)" in text and "Heat (Crime)" in text


def test_empty_history_and_unknown_items_still_render() -> None:
    ins = Instructions.load()
    assert "nothing yet" in ins.serve([], "next_click", NAMES, TEXTS)
    assert "History: zz9." in ins.serve([HistoryItem("zz9")], "next_click", NAMES, TEXTS)


def test_history_is_cut_to_the_most_recent_items(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        Instructions.load().source.read_text().replace("max_history = 10", "max_history = 2")  # type: ignore[union-attr]
    )
    text = Instructions.load(path).serve(HISTORY, "next_click", NAMES, TEXTS)
    assert "<item_1>" not in text and "<item_2>" in text and "<item_3>" in text


def test_an_edited_file_changes_what_is_served(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        """
[render]
item = "{title}/{type}"
[tasks.next_click]
serve = "b"
templates = [{id = "a", text = "A {history}"}, {id = "b", text = "B {history} ({n})"}]
[tasks.next_purchase]
templates = [{id = "p", text = "P {history}"}]
[tasks.cold_start]
templates = [{id = "c", text = "C {history_text}"}]
"""
    )
    ins = Instructions.load(path)
    assert ins.serve(HISTORY[:2], "next_click", NAMES, TEXTS) == "B Toy Story/click Heat/purchase (2)"


def test_purchases_can_be_written_apart_from_clicks(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(
        """
[render]
item = "{id}"
purchase_item = "{id} bought"
[tasks.next_click]
templates = [{id = "a", text = "A {history}"}]
[tasks.next_purchase]
templates = [{id = "p", text = "P {history}"}]
[tasks.cold_start]
templates = [{id = "c", text = "C {history_text}"}]
"""
    )
    ins = Instructions.load(path)
    assert ins.serve(HISTORY, "next_click", NAMES, TEXTS) == "A <item_1> <item_2> bought <item_3>"
    (tmp_path / "bad.toml").write_text(path.read_text().replace("{id} bought", "{id} {nope}"))
    with pytest.raises(ConfigError, match="purchase_item"):
        Instructions.load(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    "body",
    [
        '[tasks.next_click]\ntemplates = [{id = "a", text = "{nope}"}]',  # unknown placeholder
        '[tasks.next_click]\nserve = "zz"\ntemplates = [{id = "a", text = "x"}]',  # serves a missing template
        '[tasks.next_click]\ntemplates = [{id = "a", text = "x"}]',  # other tasks missing
        "not toml [",
    ],
)
def test_a_broken_templates_file_is_a_config_error(tmp_path: Path, body: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ConfigError):
        Instructions.load(path)


def test_training_samples_several_templates_and_follows_the_target_type() -> None:
    ins = Instructions.load()
    seqs = {"u": [HistoryItem(str(i % 3 + 1), "purchase" if i % 4 == 3 else "click") for i in range(40)]}
    pairs = training_pairs(seqs, ins, NAMES, TEXTS, random.Random(0))
    assert len(pairs) == 39  # every prefix of the sequence, not only the last item
    assert [p.target for p in pairs] == [h.item_id for h in seqs["u"][1:]]
    click_forms = {t.text.split("{")[0] for t in ins.templates["next_click"]}
    used = {form for p in pairs for form in click_forms if p.instruction.startswith(form)}
    assert len(used) >= 2  # instruction diversity
    purchase_targets = [p for p, h in zip(pairs, seqs["u"][1:], strict=True) if h.type == "purchase"]
    heads = tuple(t.text.split("{")[0] for t in ins.templates["next_purchase"])
    assert purchase_targets and all(p.instruction.startswith(heads) for p in purchase_targets)


def test_training_pairs_can_mix_in_cold_start_and_skip_unknown_targets() -> None:
    ins = Instructions.load()
    seqs = {"u": [HistoryItem(str(i % 3 + 1)) for i in range(30)]}
    pairs = training_pairs(seqs, ins, NAMES, TEXTS, random.Random(0), cold_start_share=1.0, targets={"1", "2"})
    assert pairs and all("<item_" not in p.instruction for p in pairs)
    assert {p.target for p in pairs} == {"1", "2"}


def test_request_from_events_orders_by_time_and_excludes_purchases() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def ev(n: int, item: str, kind: EventType, minutes: int) -> Event:
        return Event(event_id=str(n), user_id="u", item_id=item, type=kind, ts=t0 + timedelta(minutes=minutes))

    req = RecRequest.from_events([ev(1, "b", EventType.PURCHASE, 5), ev(2, "a", EventType.CLICK, 1)])
    assert [h.item_id for h in req.history] == ["a", "b"]
    assert req.exclude == frozenset({"b"})
