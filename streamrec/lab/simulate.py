"""Deterministic synthetic shop traffic: a catalog with item text plus a click/purchase stream with
Zipf popularity, drifting user tastes, item series and a purchase funnel. Pure: no Kafka, no torch,
and no I/O apart from the explicit writers (`write_log`, `write_catalog`)."""

from __future__ import annotations

import bisect
import csv
import heapq
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import accumulate, pairwise
from pathlib import Path

from streamrec.events import CatalogItem, Event, EventType

__all__ = [
    "CATEGORIES",
    "SimConfig",
    "generate_events",
    "make_catalog",
    "write_catalog",
    "write_log",
]

# Category -> product nouns in "series order": a series walks a run of consecutive nouns
# (grinder -> beans -> filter), so the next item is predictable from the current one.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "coffee": ("grinder", "beans", "filter", "dripper", "mug", "kettle", "scale"),
    "running": ("shoes", "socks", "shorts", "shirt", "cap", "watch", "bottle"),
    "camping": ("tent", "sleeping bag", "mat", "stove", "lantern", "cookset", "chair"),
    "books": ("novel", "sequel", "prequel", "anthology", "guide", "cookbook", "atlas"),
    "gaming": ("console", "controller", "headset", "game", "charger", "stand", "case"),
    "baby": ("stroller", "car seat", "crib", "blanket", "bottle", "bib", "rattle"),
    "kitchen": ("pan", "lid", "knife", "board", "spatula", "pot", "whisk"),
    "garden": ("shovel", "gloves", "seeds", "pot", "hose", "sprinkler", "shears"),
    "photo": ("camera", "lens", "tripod", "bag", "memory card", "filter", "strap"),
    "fitness": ("mat", "dumbbells", "bands", "roller", "bench", "kettlebell", "towel"),
    "audio": ("speaker", "amplifier", "cable", "headphones", "turntable", "stand", "remote"),
    "pets": ("leash", "collar", "bowl", "food", "bed", "toy", "brush"),
    "office": ("desk", "chair", "lamp", "monitor", "keyboard", "mouse", "notebook"),
    "bath": ("towel", "robe", "soap", "shampoo", "sponge", "mirror", "mat"),
    "cycling": ("bike", "helmet", "lights", "lock", "pump", "gloves", "saddle"),
    "tea": ("teapot", "green tea", "black tea", "infuser", "cups", "honey", "tray"),
    "toys": ("puzzle", "blocks", "doll", "train set", "kite", "board game", "ball"),
    "beauty": ("cleanser", "toner", "serum", "moisturizer", "sunscreen", "mask", "brush"),
    "travel": ("suitcase", "backpack", "pillow", "adapter", "organizer", "wallet", "tag"),
    "music": ("guitar", "strings", "tuner", "capo", "picks", "amp", "songbook"),
}
_BRANDS = (
    "Acme", "Northwind", "Bluebird", "Everpeak", "Solace", "Kestrel", "Umbra", "Verdant", "Halcyon",
    "Ironwood", "Lumen", "Marlow", "Nimbus", "Orchid", "Pinecrest", "Quill", "Redfern", "Sable",
    "Tamarack", "Wren",
)  # fmt: skip
_ADJECTIVES = (
    "classic", "compact", "deluxe", "eco", "essential", "light", "modern", "pro", "rugged", "smart",
    "soft", "sport", "travel", "ultra", "vintage", "premium", "basic", "urban", "cozy", "bold",
)  # fmt: skip
_PITCHES = (
    "Built to last.", "Great value for everyday use.", "A customer favourite.", "Easy to clean.",
    "Ships in recycled packaging.", "Designed with care.", "Small, light and sturdy.",
)  # fmt: skip


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the simulator; the same config always yields the same catalog and stream."""

    users: int = 200
    items: int = 500
    categories: int = 12
    seed: int = 7
    start: datetime = datetime(2024, 1, 1, tzinfo=UTC)
    # Share of a user's taste that moves to one category (drawn from the global mix) each new session.
    drift: float = 0.08
    # Fraction of the stream (by event index) at which a global trend shift happens; None disables it.
    trend_shift_at: float | None = 0.5
    # How hard the trend shift reshuffles item popularity and boosts a few categories (0 = no change).
    trend_strength: float = 1.0
    # Share of series links ("after A comes B") rewired at the trend shift: new bundles, new lines.
    rewire: float = 0.25
    zipf: float = 1.0  # exponent of item popularity within a category
    follow: float = 0.45  # chance the next click follows the series of the last item
    purchase: float = 0.1  # chance a click is bought next in the same session
    repurchase: float = 0.03  # chance an already bought item may be bought again
    session_events: float = 7.0  # mean events per session (geometric)
    click_gap_s: float = 45.0  # mean seconds between events inside a session
    session_gap_s: float = 6 * 3600.0  # mean seconds between sessions of an average user
    unavailable: float = 0.02  # share of items out of stock (in the catalog, never in traffic)

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError("users must be >= 1")
        if not 1 <= self.categories <= len(CATEGORIES):
            raise ValueError(f"categories must be between 1 and {len(CATEGORIES)}")
        if self.items < 2 * self.categories:
            raise ValueError("items must be at least twice the number of categories")
        for name in ("drift", "rewire", "follow", "purchase", "repurchase", "unavailable"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if self.trend_strength < 0:
            raise ValueError("trend_strength must be >= 0")
        if self.session_events < 1 or self.click_gap_s <= 0 or self.session_gap_s <= 0:
            raise ValueError("session_events must be >= 1 and the gaps positive")
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware (UTC)")


@dataclass
class _World:
    """Everything fixed by the config: catalog, prices, popularity and series links."""

    catalog: list[CatalogItem]
    prices: list[float]
    by_cat: list[list[int]]  # category -> available item indices
    cat_cum: list[list[list[float]]]  # phase -> category -> cumulative popularity over by_cat
    cat_pop: list[list[float]]  # phase -> category popularity multiplier
    succ: list[list[int]]  # phase -> item index -> next item in its series (-1: unavailable)
    base_taste: list[float]  # Dirichlet concentration per category


@dataclass
class _User:
    uid: str
    taste: list[float]
    activity: float
    session: int = 0
    left: int = 0  # events left in the current session
    last: int = -1  # last clicked item index
    buy: int = -1  # item queued to be purchased next
    recent: list[int] = field(default_factory=list)  # recent clicks, for later purchases
    bought: set[int] = field(default_factory=set)
    sid: str = ""
    phase: int = -1  # trend phase `cum` was computed for
    cum: list[float] = field(default_factory=list)  # cumulative category weights: taste x trend


def _build_world(cfg: SimConfig) -> _World:
    rng = random.Random(f"catalog-{cfg.seed}")
    names = list(CATEGORIES)[: cfg.categories]
    n = cfg.items
    cat_of = [i % cfg.categories for i in range(n)]
    rng.shuffle(cat_of)
    avail = [True] * n
    left = Counter(cat_of)
    for i in rng.sample(range(n), round(n * cfg.unavailable)):
        if left[cat_of[i]] > 1:  # every category keeps an item to sell
            avail[i] = False
            left[cat_of[i]] -= 1

    titles: set[str] = set()
    items: list[CatalogItem | None] = [None] * n
    prices = [0.0] * n
    succ0 = [-1] * n
    by_cat: list[list[int]] = [[] for _ in names]
    for i in range(n):
        by_cat[cat_of[i]].append(i)
    for c, members in enumerate(by_cat):
        nouns = CATEGORIES[names[c]]
        order = members[:]
        rng.shuffle(order)
        # Cut the category into series of 2-5 items; each series is one brand walking the noun list.
        series: list[list[int]] = []
        pos = 0
        while pos < len(order):
            k = rng.randint(2, 5)
            series.append(order[pos : pos + k])
            pos += k
        for s in series:
            brand = rng.choice(_BRANDS)
            first = rng.randrange(len(nouns))
            for j, i in enumerate(s):
                noun = nouns[(first + j) % len(nouns)]
                adj = rng.choice(_ADJECTIVES)
                title = f"{brand} {adj.capitalize()} {noun.title()}"
                mark = 2
                while title in titles:  # titles must be unique: they can serve as item identifiers
                    title = f"{brand} {adj.capitalize()} {noun.title()} Mk {mark}"
                    mark += 1
                titles.add(title)
                prices[i] = round(rng.lognormvariate(math.log(10 + 7 * len(noun)), 0.5), 2)
                items[i] = CatalogItem(
                    item_id=_item_id(i),
                    title=title,
                    category=names[c],
                    description=f"{adj.capitalize()} {noun} by {brand}, from the {brand} {names[c]} line. "
                    + rng.choice(_PITCHES),
                    available=avail[i],
                )
        # The last item of a series leads to the first of another one (a complement), so every
        # available item has exactly one likely successor.
        chain = [[i for i in s if avail[i]] for s in series]
        chain = [s for s in chain if s]
        for k, s in enumerate(chain):
            for a, b in pairwise(s):
                succ0[a] = b
            succ0[s[-1]] = chain[(k + 1) % len(chain)][0] if len(chain) > 1 else s[0]

    by_cat = [[i for i in members if avail[i]] for members in by_cat]
    # Popularity: Zipf over a random rank inside each category, categories themselves Zipf-like.
    weights0 = [0.0] * n
    for members in by_cat:
        ranked = members[:]
        rng.shuffle(ranked)
        for r, i in enumerate(ranked):
            weights0[i] = 1.0 / (r + 1) ** cfg.zipf
    cat_rank = list(range(len(names)))
    rng.shuffle(cat_rank)
    cat_pop0 = [1.0 / (cat_rank[c] + 1) ** 0.6 for c in range(len(names))]

    # After the trend shift: items are re-ranked (noisy old rank, so some tail items rise to the
    # top while the Zipf shape stays the same), a few niche categories get hot, and some series
    # links point elsewhere, so a model frozen before the shift decays.
    strength = cfg.trend_strength
    weights1 = [0.0] * n
    for members in by_cat:
        score = {i: math.log(weights0[i]) + strength * 1.5 * rng.gauss(0.0, 1.0) for i in members}
        for r, i in enumerate(sorted(members, key=lambda i: -score[i])):
            weights1[i] = 1.0 / (r + 1) ** cfg.zipf
    niche = sorted(range(len(names)), key=lambda c: cat_rank[c])[len(names) // 2 :]
    hot = set(rng.sample(niche, max(1, len(names) // 4))) if strength > 0 else set()
    cat_pop1 = [p * (1.0 + 3.0 * strength if c in hot else 1.0) for c, p in enumerate(cat_pop0)]
    succ1 = succ0[:]
    for members in by_cat:
        if len(members) < 2:
            continue
        for i in members:
            if rng.random() < cfg.rewire * min(1.0, strength):
                succ1[i] = rng.choice([j for j in members if j != i] or members)

    def cums(weights: list[float]) -> list[list[float]]:
        return [list(accumulate(weights[i] for i in members)) for members in by_cat]

    total = sum(cat_pop0)
    return _World(
        catalog=[it for it in items if it is not None],
        prices=prices,
        by_cat=by_cat,
        cat_cum=[cums(weights0), cums(weights1)],
        cat_pop=[cat_pop0, cat_pop1],
        succ=[succ0, succ1],
        base_taste=[len(names) * 0.4 * p / total for p in cat_pop0],
    )


def _item_id(i: int) -> str:
    return f"i{i:04d}"


def _dirichlet(rng: random.Random, alpha: Sequence[float]) -> list[float]:
    draws = [rng.gammavariate(a, 1.0) for a in alpha]
    total = sum(draws) or 1.0
    return [d / total for d in draws]


def make_catalog(cfg: SimConfig) -> list[CatalogItem]:
    """The catalog of `cfg.items` items (ids i0000...), with title, category, description, availability."""
    return _build_world(cfg).catalog


def generate_events(cfg: SimConfig, count: int) -> Iterator[Event]:
    """Yield `count` events in arrival order (event time ascending, users interleaved).

    The trend shift sits at `cfg.trend_shift_at * count`, so a shorter stream is not a prefix of a
    longer one past that point."""
    if count < 0:
        raise ValueError("count must be >= 0")
    w = _build_world(cfg)
    rng = random.Random(f"events-{cfg.seed}")
    ncat = len(w.by_cat)
    shift = count if cfg.trend_shift_at is None else math.ceil(cfg.trend_shift_at * count)
    users = [
        _User(
            uid=f"u{u:04d}",
            taste=_dirichlet(rng, w.base_taste),
            # Heavy-tailed activity: a few users produce many of the events, as in real logs.
            activity=rng.lognormvariate(0.0, 0.8),
        )
        for u in range(cfg.users)
    ]
    # (next event time in ms since start, user index); the heap interleaves users in time order.
    heap = [(int(rng.expovariate(u.activity / cfg.session_gap_s) * 1000), k) for k, u in enumerate(users)]
    heapq.heapify(heap)
    # This loop is the hot path (>= 50k events/s wanted): locals, bisect instead of rng.choices,
    # and inlined exponential draws (-log(1 - U) * mean) keep it fast.
    rand, log, bis, push, pop = rng.random, math.log, bisect.bisect, heapq.heappush, heapq.heappop
    ids = [_item_id(i) for i in range(cfg.items)]
    drift_cum = list(accumulate(w.base_taste))
    cont = 1.0 - 1.0 / cfg.session_events
    log_cont = log(cont) if cont > 0 else 0.0
    click_ms, session_ms = cfg.click_gap_s * 1000, cfg.session_gap_s * 1000
    follow, skip, purchase, repurchase = cfg.follow, cfg.follow * 0.15, cfg.purchase, cfg.repurchase
    start, seed, d = cfg.start, cfg.seed, cfg.drift
    click, buy = EventType.CLICK, EventType.PURCHASE
    for n in range(count):
        phase = 0 if n < shift else 1
        succ, cat_cum, by_cat = w.succ[phase], w.cat_cum[phase], w.by_cat
        t_ms, k = pop(heap)
        u = users[k]
        if u.left == 0:
            u.session += 1
            u.sid = f"{u.uid}-s{u.session:04d}"
            u.left = 1 + int(log(1.0 - rand()) / log_cont) if log_cont else 1
            u.last = -1
            if d > 0:
                # Drift: a share `d` of the taste moves to one category drawn from the global mix;
                # repeated every session this is a slow random walk of interests.
                c = bis(drift_cum, rand() * drift_cum[-1], 0, ncat - 1)
                u.taste = [(1 - d) * x for x in u.taste]
                u.taste[c] += d
            if u.phase != phase or d > 0:
                pop_c = w.cat_pop[phase]
                u.cum = list(accumulate(u.taste[c] * pop_c[c] for c in range(ncat)))
                u.phase = phase
            # Abandoned carts: sometimes a session opens by buying something clicked earlier.
            if u.recent and rand() < purchase * 0.5:
                u.buy = u.recent[int(rand() * len(u.recent))]
        item = u.buy
        if item >= 0 and (item not in u.bought or rand() < repurchase):
            etype = buy
            u.bought.add(item)
            u.last = item  # the next click often goes to the bought item's complement
        else:
            etype = click
            r = rand()
            if u.last >= 0 and r < follow:
                item = succ[u.last]
                if r < skip:  # a skip ahead: gives longer-order models something to find
                    item = succ[item]
            else:
                cum = u.cum
                c = bis(cum, rand() * cum[-1], 0, ncat - 1)
                members, ccum = by_cat[c], cat_cum[c]
                hi = len(members) - 1
                item = members[bis(ccum, rand() * ccum[-1], 0, hi)]
                if item in u.bought:  # people rarely browse what they already own: one redraw
                    item = members[bis(ccum, rand() * ccum[-1], 0, hi)]
            u.last = item
            u.recent.append(item)
            if len(u.recent) > 10:
                del u.recent[0]
        u.buy = item if etype is click and rand() < purchase else -1
        yield Event(
            event_id=f"ev-{seed}-{n}",
            user_id=u.uid,
            item_id=ids[item],
            type=etype,
            ts=start + timedelta(milliseconds=t_ms),
            session_id=u.sid,
            quantity=None if etype is click else 1 + int(-log(1.0 - rand()) / 2.0),
            price=None if etype is click else w.prices[item],
        )
        u.left -= 1
        if u.left > 0 or u.buy >= 0:
            u.left = max(u.left, 1)  # a queued purchase keeps the session open for one more event
            gap = -log(1.0 - rand()) * click_ms
        else:
            gap = -log(1.0 - rand()) * session_ms / u.activity
        # At least one second between a user's events keeps per-user time strictly increasing.
        push(heap, (t_ms + 1000 + int(gap), k))


def write_log(events: Iterable[Event], path: Path) -> int:
    """Write the CSV event log `user_id,item_id,timestamp,type` (epoch seconds); return the row count."""
    rows = 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(("user_id", "item_id", "timestamp", "type"))
        for ev in events:
            out.writerow((ev.user_id, ev.item_id, f"{ev.ts.timestamp():.3f}", ev.type.value))
            rows += 1
    return rows


def write_catalog(items: Iterable[CatalogItem], path: Path) -> int:
    """Write the catalog as JSONL, one CatalogItem per line; return the line count."""
    lines = 0
    with path.open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(item.model_dump_json() + "\n")
            lines += 1
    return lines
