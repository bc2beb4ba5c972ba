"""The inference worker's generation step: history updates in, Recommendation messages out. It owns
the Recommender and runs in the worker's generation thread, never on the event loop."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from streamrec.catalog import Catalog, read_catalog
from streamrec.errors import InvalidMessage, ModelError
from streamrec.events import (
    AdapterAnnouncement,
    HistoryUpdate,
    ModelVersion,
    Recommendation,
    RecommendedItem,
    parse,
    utcnow,
)
from streamrec.instructions import RecRequest
from streamrec.metrics import ADAPTER_REJECTED, ADAPTER_SWAPS, MODEL_INFO
from streamrec.model.blend import Blend, Support, supports
from streamrec.registry import (
    BLEND,
    WEIGHTS,
    AdapterCorrupt,
    AdapterNotFound,
    AdapterOutsideRegistry,
    AnnouncementInvalid,
    announced_dir,
    announced_files,
    private_copy,
)
from streamrec.serving import Served, explain, model_weight, serve_list, serving_task, trigger_type
from streamrec.settings import ContractSettings, Settings, registry_root
from streamrec.signing import AdapterBadSignature, AdapterUnsigned, adapter_key, check_signature

if TYPE_CHECKING:
    from streamrec.model.recommender import Recommender

log = logging.getLogger(__name__)

TINY = "tiny"
T = TypeVar("T")


def tiny_dir(settings: Settings) -> Path:
    """Where `STREAMREC_MODEL__BASE=tiny` looks for a trained tiny model (the demo writes one)."""
    return settings.data_dir / "models" / TINY


def load_recommender(
    settings: Settings, catalog: Catalog, *, extend_items: bool = True, provisional_items: bool = False
) -> Recommender:
    """The configured model over `catalog`: a hub id or directory, or `tiny` (the trained tiny
    model under the data dir when there is one, else an untrained one built for this catalog, sized
    by the training settings). The templates file, when set, replaces the model directory's copy;
    beams, length penalty and batch size become the model's defaults. `extend_items`: whether catalog
    items new to the model get a token here (the trainer's role; see `Recommender.extends_items`);
    `provisional_items`: whether items no artifact names yet are served from provisional ids (the
    inference worker's; see `Recommender.provisional_items`)."""
    from streamrec.instructions import Instructions
    from streamrec.model.recommender import Recommender, TinyConfig

    cfg = settings.model
    instructions = Instructions.load(cfg.templates) if cfg.templates is not None else None
    base, scheme = cfg.base, cfg.scheme
    if cfg.base == TINY:
        trained = tiny_dir(settings)
        if not (trained / "config.json").is_file():
            log.warning(
                "no trained tiny model in %s: serving an untrained one (run `streamrec demo` or train)", trained
            )
            tiny = TinyConfig.from_settings(settings.train)
            rec = Recommender.build_tiny(catalog, instructions, config=tiny, device=cfg.device, dtype=cfg.dtype)
            rec.task, rec.num_beams, rec.batch_size = cfg.task, cfg.num_beams, cfg.batch_size
            rec.length_penalty, rec.exact_search = cfg.length_penalty, cfg.exact_search
            rec.extends_items = extend_items
            rec.provisional_items = provisional_items
            return rec
        base, scheme = str(trained), None  # the trained tiny model's own scheme
    rec = Recommender.load(
        base,
        cfg.device,
        scheme=scheme,
        instructions=instructions,
        catalog=catalog,
        task=cfg.task,
        use_blend=cfg.blend,
        num_beams=cfg.num_beams,
        batch_size=cfg.batch_size,
        dtype=cfg.dtype,
        extend_items=extend_items,
        provisional_items=provisional_items,
    )
    rec.length_penalty, rec.exact_search = cfg.length_penalty, cfg.exact_search
    return rec


ADAPTER_WEIGHTS = WEIGHTS


@contextmanager
def verified_adapter(settings: Settings, announcement: AdapterAnnouncement) -> Iterator[Path]:
    """A private copy of an announced adapter, once the announcement is signed with the configured
    key (when there is one), names its version's directory in this worker's registry, and every
    file of that directory matches its announced sha256; removed on exit. Cheapest checks first:
    nothing on disk is read for an announcement that fails its signature. The copy lives in the
    worker's own data dir, not the shared registry (and not /tmp, which a pod may not be able to write)."""
    check_signature(announcement, settings.adapter_key)
    folder = announced_dir(registry_root(settings), announcement)
    files = announced_files(announcement)
    with private_copy(folder, files, announcement.version, settings.data_dir / "adapter-copies") as copy:
        yield copy


# The `reason` label of streamrec_adapter_rejected_total, most specific class first.
_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (InvalidMessage, "invalid"),
    (AnnouncementInvalid, "invalid"),
    (AdapterUnsigned, "unsigned"),
    (AdapterBadSignature, "bad_signature"),
    (AdapterOutsideRegistry, "outside_registry"),
    (AdapterNotFound, "missing"),
    (AdapterCorrupt, "hash_mismatch"),
)


def refusal_reason(exc: BaseException) -> str:
    """Why an announcement was refused, as counted: one of invalid, unsigned, bad_signature,
    outside_registry, missing, hash_mismatch, or load (the files were right, loading them failed)."""
    return next((reason for kind, reason in _REFUSALS if isinstance(exc, kind)), "load")


class CatalogWatch:
    """When the inference worker re-reads its catalog mirror: before a model is loaded, then every
    `every_s` seconds. A catalog with nothing available is never put in service."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.read_at: float | None = None

    def to_apply(self, mirror: Mapping[bytes, bytes], loaded: bool, now: float) -> Catalog | None:
        """The catalog to hand the generator (it skips one whose fingerprint it has), or None."""
        if loaded and self.read_at is not None and now - self.read_at < self.every_s:
            return None
        self.read_at = now
        current = read_catalog(mirror)
        return current if current.available_ids else None


class AdapterWatch:
    """Which adapter announcement the inference worker acts on: each new one, once. Only the one
    handled last (served or refused) is remembered: a rollback announces an older version again,
    byte for byte, and must still be acted on."""

    def __init__(self) -> None:
        self.considered: bytes | None = None

    def to_apply(self, raw: bytes | None, serving: ModelVersion | None) -> AdapterAnnouncement | None:
        """The announcement to put in service; None when there is no new one or it names the adapter
        of `serving`. Raises InvalidMessage (`refusal_reason`: invalid) when it does not parse."""
        if raw is None or raw == self.considered:
            return None
        self.considered = raw
        announcement = parse(AdapterAnnouncement, raw)
        return None if announcement.version == (serving.adapter if serving else None) else announcement

    def served(self) -> None:
        ADAPTER_SWAPS.inc()

    def refused(self, exc: BaseException) -> str:
        """Count and log a refused announcement (the adapter in service stays); returns its reason."""
        reason = refusal_reason(exc)
        ADAPTER_REJECTED.labels(reason=reason).inc()
        log.error("adapter announcement refused (%s), keeping the adapter in service: %s", reason, exc)
        return reason


def newest_per_user(
    messages: Iterable[tuple[T, bytes | None]], limits: ContractSettings
) -> tuple[list[tuple[T, HistoryUpdate]], list[tuple[T, Exception]]]:
    """A micro-batch of (message, value) pairs as (message, update) pairs, the newest per user (one
    user's updates arrive in order: the last), and the messages that do not decode, with why."""
    newest: dict[str, tuple[T, HistoryUpdate]] = {}
    bad: list[tuple[T, Exception]] = []
    for message, value in messages:
        try:
            update = parse(HistoryUpdate, value, limits)
        except Exception as exc:  # whatever one message makes the decoder do, it is that message's
            bad.append((message, exc))
            continue
        newest[update.user_id] = (message, update)
    return list(newest.values()), bad


def served_by(rec: Recommendation) -> str:
    """The `kind` label of streamrec_recommendations_total: model when the model placed any item,
    else trending (a cold start served from popularity alone)."""
    return "model" if any(i.reason and "model" in i.reason for i in rec.items) else "trending"


def adapter_blend(settings: Settings, folder: Path, blend_sha256: str | None) -> Blend | None:
    """The blend an adapter version is served with: its own when it ships one (`blend_sha256`, already
    checked) and blending is on; None means the base model's. The inference worker and the trainer
    (scoring the adapter in service) follow this one rule, so the gate compares what is served."""
    if blend_sha256 is None or not settings.model.blend:
        return None
    try:
        return Blend.load(str(folder / BLEND))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the blend in {folder}: {exc}") from exc


class Generator:
    """Turns a batch of history updates into one Recommendation per user."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if adapter_key(settings.adapter_key) is None:  # an empty key fails here, at start
            log.warning(
                "STREAMREC_ADAPTER_KEY is not set: adapter announcements are not authenticated, and whoever "
                "can write to %s chooses which registered adapter is served",
                settings.topics.adapters,
            )
        self.recommender: Recommender | None = None
        self.catalog = Catalog([])
        self._catalog_key: tuple[int, int] | None = None
        self._titles: dict[str, str] = {}  # item id -> title, what explanations name
        self._available: frozenset[str] = frozenset()  # per catalog, not per batch: 10^6 ids

    @property
    def version(self) -> ModelVersion | None:
        """The base model and adapter in service; None before the first catalog."""
        return self.recommender.version if self.recommender is not None else None

    def set_catalog(self, catalog: Catalog, key: tuple[int, int]) -> None:
        """Use a new catalog from the next batch on (`key` identifies its content cheaply)."""
        if key == self._catalog_key:
            return
        self.catalog = catalog
        self._catalog_key = key
        self._titles = {item.item_id: item.title for item in catalog}
        self._available = frozenset(catalog.available_ids)
        if self.recommender is None:
            # Items new to the model are served from provisional ids until the artifact that names
            # them arrives: this worker's order of arrival is its own, and ids given here would not
            # be the trainer's.
            self.recommender = load_recommender(self.settings, catalog, extend_items=False, provisional_items=True)
            log.info("model loaded: %s", self.recommender.version)
            self._model_info()
        else:
            self.recommender.set_catalog(catalog)

    def _model_info(self) -> None:
        if (version := self.version) is not None:
            MODEL_INFO.info({"base": version.base, "adapter": version.adapter or ""})

    def apply_adapter(self, announcement: AdapterAnnouncement) -> None:
        """Put an announced adapter in service, between two batches (this runs in the generation
        thread). Raises ModelError (`refusal_reason` says which check failed), leaving the model and
        the adapter in service exactly as they were, when the announcement is unsigned or wrongly
        signed, points outside the registry, its files are not the announced ones, or it does not
        load or fit the model. Adapter and blend are read from a private copy of the checked files."""
        if self.recommender is None:
            raise ModelError("no model loaded yet")
        with verified_adapter(self.settings, announcement) as folder:
            blend = adapter_blend(self.settings, folder, announcement.blend_sha256)
            self.recommender.load_adapter(str(folder), version=announcement.version, blend=blend)
        log.info("adapter %s in service", announcement.version)
        self._model_info()

    def generate_each(
        self, updates: Sequence[HistoryUpdate], trending: Mapping[str, float]
    ) -> tuple[list[tuple[int, Recommendation]], list[tuple[int, Exception]]]:
        """`generate`, with one user's failure kept to that user: when the batch fails, each user is
        tried alone. Returns (index, recommendation) for the users served and (index, exception) for
        the ones that failed alone. When every one of several fails alone too, the fault is not
        theirs (the model, the device) and the batch's exception is raised."""
        try:
            return list(enumerate(self.generate(updates, trending))), []
        except Exception as exc:
            if len(updates) == 1:
                return [], [(0, exc)]
            log.warning("a batch of %d failed (%s: %s); trying each user alone", len(updates), type(exc).__name__, exc)
            failure = exc
        served: list[tuple[int, Recommendation]] = []
        failed: list[tuple[int, Exception]] = []
        for n, update in enumerate(updates):
            try:
                served.append((n, self.generate([update], trending)[0]))
            except Exception as alone:
                failed.append((n, alone))
        if not served:
            raise failure
        return served, failed

    def generate(self, updates: Sequence[HistoryUpdate], trending: Mapping[str, float]) -> list[Recommendation]:
        if self.recommender is None:
            raise RuntimeError("no catalog yet: call set_catalog first")
        serve = self.settings.serve
        k = self.settings.model.top_k
        if serve.inject_delay_s:
            time.sleep(serve.inject_delay_s)
        tasks = [
            serving_task(
                len(u.events),
                trigger_type(u),
                full_at=serve.cold_start_full_at,
                cold_start=serve.cold_start_task,
                purchase_task=serve.purchase_task,
                default=self.settings.model.task,
            )
            for u in updates
        ]
        requests = [
            RecRequest.from_events(u.events, task, exclude_seen=serve.exclude_seen)
            for u, task in zip(updates, tasks, strict=True)
        ]
        # The model only sees users it has something to say about; brand-new users get trending.
        # One batch holds every task: each request carries its own.
        modelled = [n for n, u in enumerate(updates) if model_weight(len(u.events), serve.cold_start_full_at) > 0]
        lists = self.recommender.recommend([requests[n] for n in modelled], k=k) if modelled else []
        model_lists = dict(zip(modelled, lists, strict=True))
        available = self._available
        version = self.recommender.version
        instructions, blend = self.recommender.instructions, self.recommender.blend
        out = []
        for n, (update, request, task) in enumerate(zip(updates, requests, tasks, strict=True)):
            served = serve_list(
                model_lists.get(n, []),
                trending,
                history_len=len(update.events),
                full_at=serve.cold_start_full_at,
                k=k,
                available=available,
                exclude=request.exclude,
            )
            history = [h.item_id for h in request.history]
            support = supports(blend, history, [s.item_id for s in served if s.reason != "trending"])
            out.append(
                Recommendation(
                    rec_id=uuid.uuid4().hex,
                    user_id=update.user_id,
                    items=[self._item(s, support.get(s.item_id), request) for s in served],
                    model=version,
                    task=task if n in model_lists else None,
                    template=instructions.serving_template(task).id if n in model_lists else None,
                    trigger_event_id=update.trigger_event_id,
                    event_ts=update.event_ts,
                    generated_at=utcnow(),
                )
            )
        return out

    def _item(self, served: Served, support: Support | None, request: RecRequest) -> RecommendedItem:
        why = explain(served, support, request.history, self._titles)
        return RecommendedItem(
            item_id=served.item_id,
            score=served.score,
            reason=served.reason,
            explanation=why.text if why else None,
            explained_by=why.by if why else None,
            explanation_item_id=why.item_id if why else None,
        )
