"""The train worker's side of online learning: when an increment is due, which adapter to announce
at start, and the increment step its training thread runs (streamrec/online.py holds the increment
itself). Nothing here sends: announcing on Kafka is the trainer agent's job."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import SecretStr

from streamrec.catalog import read_catalog
from streamrec.events import AdapterAnnouncement
from streamrec.feedback import Mark, fresh_by_arrival
from streamrec.online import Cursor, Increment, advance, append_increment, run_increment
from streamrec.registry import AdapterRegistry
from streamrec.settings import OnlineSettings, Settings, registry_root

if TYPE_CHECKING:
    from streamrec.feedback_store import ExampleStore

log = logging.getLogger(__name__)


def increment_due(fresh: int, has_catalog: bool, online: OnlineSettings) -> bool:
    """Train once there are `min_new_examples` fresh examples beyond the `holdout` the gate keeps
    out of training, and a catalog to train over; otherwise wait for the next tick."""
    return fresh >= online.min_new_examples + online.holdout and has_catalog


def announcement_at_start(registry: AdapterRegistry, key: SecretStr | None) -> AdapterAnnouncement | None:
    """The registry's CURRENT adapter, to announce once at start: a crash between a promotion and its
    announcement must not leave the inference workers on the previous adapter (they ignore an
    announcement of the version they already serve). None when nothing was promoted, or when the
    version fails its check against its manifest (logged: it is not announced)."""
    manifest = registry.current()
    if manifest is None:
        return None
    if not registry.verify(manifest):
        log.warning(
            "trainer: the adapter in service, %s, fails its check against its manifest (or was registered "
            "before every file was hashed: `streamrec adapters reregister`); not announced",
            manifest.version,
        )
        return None
    return registry.announcement(manifest, key)


class Trainer:
    """The increments of one train worker, over its feedback store: how far it has trained (the
    cursor, on disk) and the registry it promotes into. `increment` runs in the training thread,
    one at a time; the rest on the event loop."""

    def __init__(self, settings: Settings, store: ExampleStore) -> None:
        self.settings, self.store = settings, store
        self.registry = AdapterRegistry(registry_root(settings))
        self.cursor = Cursor(settings)
        self.seq = 0  # each increment's seed

    def increment(self, catalog: Mapping[bytes, bytes], mark: Mark) -> tuple[Increment, Mark]:
        """One increment over every stored example (`catalog`: the mirrored catalog topic), fresh
        meaning arrived after `mark`; returns it and the mark to record once it is done."""
        arrived = self.store.by_arrival()
        self.seq += 1
        result = run_increment(
            self.settings,
            read_catalog(catalog),
            [a.example for a in arrived],
            fresh_by_arrival(arrived, mark, self.settings.online.since),
            self.registry,
            seed=self.seq,
        )
        return result, advance(mark, [a.seq for a in arrived], result)

    def record(self, result: Increment, after: Mark) -> None:
        """Move the cursor past an increment and append it to the increments log."""
        self.cursor.set(after)
        append_increment(self.settings, result)
