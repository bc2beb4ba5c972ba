"""Feedback: the pure rules that join recommendations with the events that follow them into training
examples, and how the stored examples are split for an online increment. No Kafka, no disk, no
torch: the feedback agent calls these and stores the values they return."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, model_validator

from streamrec.events import Event, Recommendation
from streamrec.history import UserState, apply_event
from streamrec.instructions import HistoryItem

DEFAULT_KEEP = 5  # recommendations remembered per user


class FeedbackExample(BaseModel):
    """One training example: what the user had done (`history`, oldest first), what they chose next
    (`target`), and the recommendation list in force at that moment, if any (`recommended`, ranked;
    `taken` is the part of it the user took: the target when it was recommended, else nothing).
    `event_id` is the target event's id: unique, so it is the example's key."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    user_id: str
    history: tuple[HistoryItem, ...]
    target: str
    target_type: str
    ts: datetime
    rec_id: str | None = None
    recommended: tuple[str, ...] = ()
    taken: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _taken_was_recommended(self) -> FeedbackExample:
        if not set(self.taken) <= set(self.recommended):
            raise ValueError(f"taken {list(self.taken)} is not a subset of recommended {list(self.recommended)}")
        return self

    @property
    def ignored(self) -> tuple[str, ...]:
        """The recommended items the user did not take, in rank order."""
        return tuple(i for i in self.recommended if i not in self.taken)

    @property
    def outcome(self) -> str:
        """taken (the user chose a recommended item), ignored (a list was in force, the user chose
        another item) or none (no list was in force)."""
        return "taken" if self.taken else "ignored" if self.recommended else "none"

    @property
    def target_item(self) -> HistoryItem:
        return HistoryItem(self.target, self.target_type)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> FeedbackExample:
        return cls.model_validate_json(raw)


class PendingRec(BaseModel):
    """A recommendation remembered for joining. `at` is in event time (see PendingRecs)."""

    model_config = ConfigDict(frozen=True)

    rec_id: str
    at: datetime
    items: tuple[str, ...]
    trigger_event_id: str | None = None


class Joined(NamedTuple):
    pending: PendingRecs
    examples: list[FeedbackExample]


class PendingRecs(BaseModel):
    """The recommendations in force for one user (the newest `keep`, oldest first).

    Joining rule for an event E with `history_before` (the user's history just before E):
    1. If E.rec_id names a remembered recommendation R, R is the list in force (no horizon check:
       the client said so). Otherwise (no rec_id, or one no longer remembered):
    2. among the recommendations R with E.ts - horizon_s <= R.at <= E.ts, not triggered by E itself,
       the most recent whose items include E.item_id is the list in force; if none includes it, the
       most recent of them is (the user ignored it); if there are none, no list is in force.
    The result is one example whose target is E's item, `recommended` = the list in force (empty when
    none), `taken` = (E.item_id,) if it is in that list else (). The only exception: an event with an
    empty history and no list in force yields no example (nothing to learn from).

    A recommendation's time `at` is its trigger's event time (`event_ts`), else `generated_at`: the
    join runs in event time, so a replayed log joins exactly like live traffic."""

    model_config = ConfigDict(frozen=True)

    recs: tuple[PendingRec, ...] = ()

    def add_recommendation(self, rec: Recommendation, *, keep: int = DEFAULT_KEEP) -> PendingRecs:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        if any(r.rec_id == rec.rec_id for r in self.recs):
            return self  # redelivered after a restart
        entry = PendingRec(
            rec_id=rec.rec_id,
            at=rec.event_ts or rec.generated_at,
            items=tuple(i.item_id for i in rec.items),
            trigger_event_id=rec.trigger_event_id,
        )
        # Recommendations can arrive out of order (several inference workers), so keep them sorted.
        recs = sorted((*self.recs, entry), key=lambda r: (r.at, r.rec_id))
        return PendingRecs(recs=tuple(recs[-keep:]))

    def in_force(self, event: Event, horizon_s: float) -> tuple[PendingRec | None, bool]:
        """The list in force for `event` under the rule above, and whether the event's item is in it."""
        if event.rec_id is not None:
            named = next((r for r in self.recs if r.rec_id == event.rec_id), None)
            if named is not None:
                return named, event.item_id in named.items
        ts = event.ts.timestamp()
        window = [
            r for r in self.recs if ts - horizon_s <= r.at.timestamp() <= ts and r.trigger_event_id != event.event_id
        ]
        for r in reversed(window):
            if event.item_id in r.items:
                return r, True
        return (window[-1], False) if window else (None, False)

    def on_event(self, event: Event, history_before: Sequence[HistoryItem], horizon_s: float) -> Joined:
        """(pending after the event, examples): see the class docstring for the rule. Recommendations
        are kept after being taken, since one list can lead to several clicks."""
        if horizon_s < 0:
            raise ValueError("horizon_s must not be negative")
        rec, taken = self.in_force(event, horizon_s)
        if rec is None and not history_before:
            return Joined(self, [])
        example = FeedbackExample(
            event_id=event.event_id,
            user_id=event.user_id,
            history=tuple(history_before),
            target=event.item_id,
            target_type=event.type.value,
            ts=event.ts,
            rec_id=None if rec is None else rec.rec_id,
            recommended=() if rec is None else rec.items,
            taken=(event.item_id,) if taken else (),
        )
        return Joined(self, [example])

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> PendingRecs:
        return cls.model_validate_json(raw)


def example_order(example: FeedbackExample) -> tuple[float, str]:
    return (example.ts.timestamp(), example.event_id)


def user_sequences(examples: Iterable[FeedbackExample]) -> dict[str, list[HistoryItem]]:
    """Per user, what they chose, oldest first: one item per example (its target), so the sequences
    are the stream the store has kept, whatever each example's rolling history had forgotten."""
    sequences: dict[str, list[HistoryItem]] = {}
    for e in sorted(examples, key=example_order):
        sequences.setdefault(e.user_id, []).append(e.target_item)
    return sequences


class TrainSplit(NamedTuple):
    train: list[FeedbackExample]
    holdout: list[FeedbackExample]


def split_fresh_replay(
    examples: Sequence[FeedbackExample],
    fresh: Callable[[FeedbackExample], bool] | None,
    replay_share: float,
    rng: random.Random | int,
    *,
    holdout: int,
) -> TrainSplit:
    """Split for one online increment. `examples` are in ARRIVAL order (the order the examples were
    stored, which is event-time order only when nothing came late).

    holdout: the `holdout` most recent arrivals, kept for the gate and never trained on; they come
    after everything trained on, so the next increment's fresh examples start with them.
    train: every other example `fresh` accepts (all of them when `fresh` is None) plus a uniform
    sample of the rest (replay) sized so that replay makes up `replay_share` of the training set
    (0.5: as many old as fresh), or fewer when not enough old ones exist. Both lists are in event-time
    order; shuffle for training. Deterministic for a given `rng` state or seed."""
    if not 0.0 <= replay_share < 1.0:
        raise ValueError("replay_share must be in [0, 1)")
    if holdout < 0:
        raise ValueError("holdout must not be negative")
    examples = list(examples)
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    cut = len(examples) - min(holdout, len(examples))
    rest, held = examples[:cut], examples[cut:]
    if fresh is None:
        old, new = [], rest
    else:
        old = [e for e in rest if not fresh(e)]
        new = [e for e in rest if fresh(e)]
    wanted = round(len(new) * replay_share / (1.0 - replay_share))
    replay = rng.sample(old, min(wanted, len(old)))
    return TrainSplit(train=sorted([*replay, *new], key=example_order), holdout=sorted(held, key=example_order))


class Mark(NamedTuple):
    """How far the trainer has consumed the feedback store: `arrival`, the arrival number it has
    trained through (None before the first increment that recorded one); `through`, the newest event
    time trained on; `fresh_total`, how many fresh examples it has consumed in all."""

    arrival: int | None = None
    through: datetime | None = None
    fresh_total: int = 0


def is_fresh(seq: int, example: FeedbackExample, mark: Mark, floor: datetime | None) -> bool:
    """Fresh: arrived after the mark (or, with no arrival number recorded yet, newer in event time
    than the mark), and newer than `floor` (examples before it only ever serve as replay)."""
    if floor is not None and example.ts <= floor:
        return False
    if mark.arrival is not None:
        return seq > mark.arrival
    return mark.through is None or example.ts > mark.through


def fresh_by_arrival(
    arrived: Iterable[tuple[int, FeedbackExample]], mark: Mark, floor: datetime | None
) -> Callable[[FeedbackExample], bool]:
    """`is_fresh` for the examples of `arrived` ((arrival number, example) pairs), by example."""
    seq = {example.event_id: n for n, example in arrived}
    return lambda e: is_fresh(seq[e.event_id], e, mark, floor)


class FeedbackUser(BaseModel):
    """What the feedback agent keeps per user, in one table value so a crash restores both together:
    the rolling history with its dedup memory (the same rules as the ingest worker's) and the
    recommendations still in force."""

    model_config = ConfigDict(frozen=True)

    state: UserState = UserState()
    pending: PendingRecs = PendingRecs()

    def on_recommendation(self, rec: Recommendation, *, keep: int = DEFAULT_KEEP) -> FeedbackUser:
        pending = self.pending.add_recommendation(rec, keep=keep)
        return self if pending is self.pending else FeedbackUser(state=self.state, pending=pending)

    def on_event(
        self, event: Event, *, max_events: int, dedup_window: int, horizon_s: float, history_items: int
    ) -> tuple[FeedbackUser, list[FeedbackExample]]:
        """The user after `event` and the examples it makes: none for a duplicate (a redelivery after
        a restart counts once). The example's history is what came before the event in EVENT time
        (the newest `history_items` of it), so a late event is joined where it belongs."""
        if self.state.remembers(event.event_id):
            return self, []
        key = (event.ts.timestamp(), event.event_id)
        before = [e for e in self.state.events if (e.ts.timestamp(), e.event_id) < key][-history_items:]
        history = [HistoryItem(e.item_id, e.type.value) for e in before]
        joined = self.pending.on_event(event, history, horizon_s)
        state, _, _ = apply_event(self.state, event, max_events=max_events, dedup_window=dedup_window)
        return FeedbackUser(state=state, pending=joined.pending), joined.examples

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> FeedbackUser:
        return cls.model_validate_json(raw)
