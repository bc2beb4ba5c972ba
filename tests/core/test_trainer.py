"""The train worker's timer rules: train only with enough fresh examples beyond the held-out ones
and a catalog; at start, announce the adapter in service only when it passes its manifest check."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import SecretStr

from streamrec.registry import CONFIG, MANIFEST, WEIGHTS, AdapterRegistry
from streamrec.settings import OnlineSettings
from streamrec.signing import check_signature
from streamrec.trainer import announcement_at_start, increment_due

KEY = SecretStr("a shared secret for tests")


def test_an_increment_waits_for_examples_beyond_the_holdout_and_for_a_catalog() -> None:
    online = OnlineSettings(min_new_examples=100, holdout=50)
    assert not increment_due(149, True, online)
    assert increment_due(150, True, online)
    assert not increment_due(10_000, False, online)


def adapter(tmp_path: Path, payload: bytes) -> Path:
    d = tmp_path / "out"
    d.mkdir(exist_ok=True)
    (d / WEIGHTS).write_bytes(payload)
    (d / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return d


def test_the_adapter_in_service_is_announced_at_start_only_when_it_checks_out(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "adapters")
    assert announcement_at_start(reg, KEY) is None  # nothing promoted yet
    m = reg.register(adapter(tmp_path, b"weights"))
    reg.promote(m.version)
    announcement = announcement_at_start(reg, KEY)
    assert announcement is not None and announcement.version == m.version
    check_signature(announcement, KEY)
    # Registered before every file was hashed: not announced (it must be re-registered first).
    (reg.path(m.version) / MANIFEST).write_text(m.model_dump_json(exclude={"files"}))
    assert announcement_at_start(reg, KEY) is None
    (reg.path(m.version) / MANIFEST).write_text(m.model_dump_json())
    (reg.path(m.version) / WEIGHTS).write_bytes(b"changed")
    assert announcement_at_start(reg, KEY) is None
