"""The inference worker's generation step: history updates in, Recommendation messages out. It owns
the Recommender and runs in the worker's generation thread, never on the event loop."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from streamrec.baselines import Blend
from streamrec.catalog import Catalog
from streamrec.errors import ModelError
from streamrec.events import AdapterAnnouncement, HistoryUpdate, Recommendation, RecommendedItem, utcnow
from streamrec.instructions import RecRequest
from streamrec.registry import BLEND, WEIGHTS, sha256_file
from streamrec.serving import model_weight, serve_list
from streamrec.settings import Settings

if TYPE_CHECKING:
    from streamrec.model import Recommender

log = logging.getLogger(__name__)

TINY = "tiny"


def tiny_dir(settings: Settings) -> Path:
    """Where `STREAMREC_MODEL__BASE=tiny` looks for a trained tiny model (the demo writes one)."""
    return settings.data_dir / "models" / TINY


def load_recommender(settings: Settings, catalog: Catalog) -> Recommender:
    """The configured model over `catalog`: a hub id or directory, or `tiny` (the trained tiny
    model under the data dir when there is one, else an untrained one built for this catalog)."""
    from streamrec.model import Recommender

    cfg = settings.model
    if cfg.base == TINY:
        trained = tiny_dir(settings)
        if (trained / "config.json").is_file():
            return Recommender.load(str(trained), cfg.device, catalog=catalog, task=cfg.task, use_blend=cfg.blend)
        log.warning("no trained tiny model in %s: serving an untrained one (run `streamrec demo` or train)", trained)
        return Recommender.build_tiny(catalog, device=cfg.device)
    return Recommender.load(
        cfg.base, cfg.device, scheme=cfg.scheme, catalog=catalog, task=cfg.task, use_blend=cfg.blend
    )


ADAPTER_WEIGHTS = WEIGHTS


def verified_adapter_dir(announcement: AdapterAnnouncement) -> Path:
    """The adapter directory of an announcement, once its weights (and its blend, when it brings one)
    match the announced sha256s."""
    folder = Path(announcement.uri.removeprefix("file://"))
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"adapter {announcement.version}: no weights at {weights}")
    actual = sha256_file(weights)
    if actual != announcement.sha256:
        raise ModelError(
            f"adapter {announcement.version}: sha256 mismatch (announced {announcement.sha256[:12]}, "
            f"found {actual[:12]}); refusing it"
        )
    if announcement.blend_sha256 is not None:
        blend = folder / BLEND
        found = sha256_file(blend) if blend.is_file() else "missing"
        if found != announcement.blend_sha256:
            raise ModelError(
                f"adapter {announcement.version}: blend sha256 mismatch (announced {announcement.blend_sha256[:12]}, "
                f"found {found[:12]}); refusing it"
            )
    return folder


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
        self.recommender: Recommender | None = None
        self.catalog = Catalog([])
        self._catalog_key: tuple[int, int] | None = None

    def set_catalog(self, catalog: Catalog, key: tuple[int, int]) -> None:
        """Use a new catalog from the next batch on (`key` identifies its content cheaply)."""
        if key == self._catalog_key:
            return
        self.catalog = catalog
        self._catalog_key = key
        if self.recommender is None:
            self.recommender = load_recommender(self.settings, catalog)
            log.info("model loaded: %s", self.recommender.version)
        else:
            self.recommender.set_catalog(catalog)

    def apply_adapter(self, announcement: AdapterAnnouncement) -> None:
        """Put an announced adapter in service, between two batches (this runs in the generation
        thread). Raises ModelError, leaving the adapter in service untouched, when it is missing,
        corrupt or does not fit the model."""
        if self.recommender is None:
            raise ModelError("no model loaded yet")
        folder = verified_adapter_dir(announcement)
        blend = adapter_blend(self.settings, folder, announcement.blend_sha256)
        self.recommender.load_adapter(str(folder), version=announcement.version, blend=blend)
        log.info("adapter %s in service", announcement.version)

    def generate(self, updates: Sequence[HistoryUpdate], trending: Mapping[str, float]) -> list[Recommendation]:
        if self.recommender is None:
            raise RuntimeError("no catalog yet: call set_catalog first")
        serve = self.settings.serve
        k = self.settings.model.top_k
        if serve.inject_delay_s:
            time.sleep(serve.inject_delay_s)
        requests = [RecRequest.from_events(u.events, exclude_seen=serve.exclude_seen) for u in updates]
        # The model only sees users it has something to say about; brand-new users get trending.
        modelled = [n for n, u in enumerate(updates) if model_weight(len(u.events), serve.cold_start_full_at) > 0]
        lists = self.recommender.recommend([requests[n] for n in modelled], k=k) if modelled else []
        model_lists = dict(zip(modelled, lists, strict=True))
        available = set(self.catalog.available_ids)
        version = self.recommender.version
        out = []
        for n, (update, request) in enumerate(zip(updates, requests, strict=True)):
            served = serve_list(
                model_lists.get(n, []),
                trending,
                history_len=len(update.events),
                full_at=serve.cold_start_full_at,
                k=k,
                available=available,
                exclude=request.exclude,
            )
            out.append(
                Recommendation(
                    rec_id=uuid.uuid4().hex,
                    user_id=update.user_id,
                    items=[RecommendedItem(item_id=s.item_id, score=s.score, reason=s.reason) for s in served],
                    model=version,
                    trigger_event_id=update.trigger_event_id,
                    event_ts=update.event_ts,
                    generated_at=utcnow(),
                )
            )
        return out
