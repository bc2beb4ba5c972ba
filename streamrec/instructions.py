"""Instructions: the editable templates (templates/instructions.toml) that turn a user's history into
the text the model reads, and the sliding-window training pairs built from them. Pure: no torch,
no tokenizer; item names and texts come in as plain mappings."""

from __future__ import annotations

import random
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamrec.catalog import Catalog
from streamrec.errors import ConfigError
from streamrec.events import Event, EventType

DEFAULT_TEMPLATES = Path(__file__).with_name("templates") / "instructions.toml"
TASKS = ("next_click", "next_purchase", "cold_start")
_TEMPLATE_FIELDS = {"history", "history_text", "recent_text", "n"}
_ITEM_FIELDS = {"id", "type", "title", "category"}


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """One behaviour in a history: an item and whether it was a click or a purchase."""

    item_id: str
    type: str = EventType.CLICK.value


@dataclass(frozen=True, slots=True)
class RecRequest:
    """What the recommender needs for one user: the recent history (oldest first), the items never
    to recommend (those bought), and optionally the task (None: the configured serving task)."""

    history: tuple[HistoryItem, ...]
    exclude: frozenset[str] = frozenset()
    task: str | None = None

    @classmethod
    def from_events(cls, events: Iterable[Event], task: str | None = None, *, exclude_seen: bool = False) -> RecRequest:
        """From a user's events: ordered by event time, purchased items excluded (every item in
        the history with `exclude_seen`)."""
        ordered = sorted(events, key=lambda e: e.ts)
        history = tuple(HistoryItem(e.item_id, e.type.value) for e in ordered)
        return cls(history=history, exclude=excluded(history, exclude_seen), task=task)


def excluded(history: Iterable[HistoryItem], exclude_seen: bool) -> frozenset[str]:
    """The items never to recommend after `history`: the purchased ones, or all of them."""
    return frozenset(h.item_id for h in history if exclude_seen or h.type == EventType.PURCHASE.value)


@dataclass(frozen=True, slots=True)
class Template:
    id: str
    task: str
    text: str


@dataclass(frozen=True, slots=True)
class RenderRules:
    max_history: int = 10
    text_items: int = 1
    cold_items: int = 5
    item: str = "{id} {type}"
    purchase_item: str = ""  # how a purchase is written; empty: like any item
    item_text: str = "{title} ({category})"
    separator: str = " "
    text_separator: str = "; "
    empty: str = "nothing yet"


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def _check(text: str, allowed: set[str], where: str) -> None:
    unknown = _fields(text) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


@dataclass(frozen=True)
class Instructions:
    """The template set. `render` is deterministic; `sample` picks a random template of the task
    (instruction diversity in training); `serve` uses the task's configured template."""

    templates: Mapping[str, tuple[Template, ...]]
    serve_ids: Mapping[str, str]
    rules: RenderRules = field(default_factory=RenderRules)
    source: Path | None = None  # the file it was read from; a saved model keeps a copy

    @classmethod
    def load(cls, path: str | Path | None = None) -> Instructions:
        """Read and validate a templates file (default: the packaged one)."""
        p = Path(path) if path else DEFAULT_TEMPLATES
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read instruction templates {p}: {exc}") from exc
        loaded = cls.from_dict(data, where=str(p))
        return cls(loaded.templates, loaded.serve_ids, loaded.rules, source=p)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "templates") -> Instructions:
        render = dict(data.get("render", {}))
        unknown = set(render) - set(RenderRules.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{where}: unknown [render] key(s) {sorted(unknown)}")
        rules = RenderRules(**render)
        _check(rules.item, _ITEM_FIELDS, f"{where} [render].item")
        _check(rules.purchase_item, _ITEM_FIELDS, f"{where} [render].purchase_item")
        _check(rules.item_text, _ITEM_FIELDS - {"id", "type"}, f"{where} [render].item_text")
        templates: dict[str, tuple[Template, ...]] = {}
        serve: dict[str, str] = {}
        for task, spec in dict(data.get("tasks", {})).items():
            items = tuple(Template(str(t["id"]), task, str(t["text"])) for t in spec.get("templates", []))
            if not items:
                raise ConfigError(f"{where}: task {task!r} has no templates")
            for t in items:
                _check(t.text, _TEMPLATE_FIELDS, f"{where} template {t.id!r}")
            serve_id = str(spec.get("serve", items[0].id))
            if serve_id not in {t.id for t in items}:
                raise ConfigError(f"{where}: task {task!r} serves unknown template {serve_id!r}")
            templates[task] = items
            serve[task] = serve_id
        missing = [t for t in TASKS if t not in templates]
        if missing:
            raise ConfigError(f"{where}: missing task(s) {missing}")
        return cls(templates=templates, serve_ids=serve, rules=rules)

    def serving_template(self, task: str) -> Template:
        self._known(task)
        return next(t for t in self.templates[task] if t.id == self.serve_ids[task])

    def _known(self, task: str) -> None:
        if task not in self.templates:
            raise ConfigError(f"unknown task {task!r}; known: {sorted(self.templates)}")

    def render(
        self,
        template: Template,
        history: Sequence[HistoryItem],
        names: Mapping[str, str],
        texts: Mapping[str, tuple[str, str]],
    ) -> str:
        """The instruction for `history` (oldest first). `names`: item id -> identifier text under
        the model's scheme; `texts`: item id -> (title, category). Items missing from either are
        written by id, so a history that mentions an unknown item still renders."""
        r = self.rules
        recent = list(history)[-r.max_history :] if r.max_history > 0 else []

        def text_of(item_id: str) -> str:
            title, category = texts.get(item_id, (item_id, ""))
            return r.item_text.format(title=title, category=category or "unknown")

        purchase = EventType.PURCHASE.value
        parts = [
            (r.purchase_item if r.purchase_item and h.type == purchase else r.item).format(
                id=names.get(h.item_id, h.item_id),
                type=h.type,
                title=texts.get(h.item_id, (h.item_id, ""))[0],
                category=texts.get(h.item_id, ("", ""))[1] or "unknown",
            )
            for h in recent
        ]
        tail = recent[-r.text_items :] if r.text_items > 0 else []
        cold = recent[-r.cold_items :] if r.cold_items > 0 else []
        return template.text.format(
            history=r.separator.join(parts) or r.empty,
            history_text=r.text_separator.join(text_of(h.item_id) for h in cold) or r.empty,
            recent_text=r.text_separator.join(text_of(h.item_id) for h in tail) or r.empty,
            n=len(recent),
        )

    def serve(
        self,
        history: Sequence[HistoryItem],
        task: str,
        names: Mapping[str, str],
        texts: Mapping[str, tuple[str, str]],
    ) -> str:
        return self.render(self.serving_template(task), history, names, texts)

    def sample(
        self,
        history: Sequence[HistoryItem],
        task: str,
        names: Mapping[str, str],
        texts: Mapping[str, tuple[str, str]],
        rng: random.Random,
    ) -> str:
        self._known(task)
        return self.render(rng.choice(self.templates[task]), history, names, texts)


def item_texts(catalog: Catalog) -> dict[str, tuple[str, str]]:
    """item id -> (title, category), the text rendering needs."""
    return {item.item_id: (item.title, item.category or "") for item in catalog}


def task_for(target: HistoryItem) -> str:
    return "next_purchase" if target.type == EventType.PURCHASE.value else "next_click"


@dataclass(frozen=True, slots=True)
class TrainingPair:
    instruction: str
    target: str  # an item id


def training_pairs(
    sequences: Mapping[str, Sequence[HistoryItem]],
    instructions: Instructions,
    names: Mapping[str, str],
    texts: Mapping[str, tuple[str, str]],
    rng: random.Random,
    *,
    cold_start_share: float = 0.0,
    min_history: int = 1,
    targets: Iterable[str] | None = None,
) -> list[TrainingPair]:
    """Sliding windows over every user's sequence: each position with at least `min_history`
    items before it becomes one example (all prefixes, not only the last item), with a template
    sampled from the target's task; a `cold_start_share` of them use the text-only cold-start task.
    `targets` limits which items may be targets (e.g. those the model can name)."""
    allowed = None if targets is None else set(targets)
    pairs: list[TrainingPair] = []
    window = max(instructions.rules.max_history, 1)
    for seq in sequences.values():
        for t in range(max(min_history, 1), len(seq)):
            target = seq[t]
            if allowed is not None and target.item_id not in allowed:
                continue
            task = "cold_start" if rng.random() < cold_start_share else task_for(target)
            text = instructions.sample(seq[max(0, t - window) : t], task, names, texts, rng)
            pairs.append(TrainingPair(text, target.item_id))
    return pairs
