"""The on-disk adapter registry with small fake adapters (bytes written here; no torch)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from streamrec.errors import ModelError
from streamrec.registry import (
    BLEND,
    CONFIG,
    CURRENT,
    WEIGHTS,
    AdapterCorrupt,
    AdapterExists,
    AdapterNotFound,
    AdapterRegistry,
    check_version,
    verify_dir,
)


def fake_adapter(tmp_path: Path, payload: bytes, name: str = "out") -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / WEIGHTS).write_bytes(payload)
    (d / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (d / "README.md").write_text("trained by a test")
    return d


@pytest.fixture
def reg(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


def test_register_copies_and_describes_the_adapter(tmp_path: Path, reg: AdapterRegistry) -> None:
    payload = b"\x00weights" * 300_000  # > one hashing chunk
    src = fake_adapter(tmp_path, payload)
    m = reg.register(src, parent=None, metrics={"HR@10": 0.25, "NDCG@10": 0.125}, base="tiny")
    assert m.version == "v0001"
    assert m.sha256 == hashlib.sha256(payload).hexdigest()
    assert m.metrics == {"HR@10": 0.25, "NDCG@10": 0.125} and m.base == "tiny" and m.parent is None
    d = reg.root / "v0001"
    assert (d / WEIGHTS).read_bytes() == payload
    assert (d / "README.md").read_text() == "trained by a test"
    assert json.loads((d / "manifest.json").read_text())["sha256"] == m.sha256
    # The source is untouched and no temporary directory is left behind.
    assert (src / WEIGHTS).read_bytes() == payload
    assert sorted(p.name for p in reg.root.iterdir()) == ["v0001"]
    assert reg.get("v0001") == m and reg.verify(m)


def test_versions_are_monotonic_and_listed_oldest_first(tmp_path: Path, reg: AdapterRegistry) -> None:
    assert reg.next_version() == "v0001" and reg.versions() == []
    src = fake_adapter(tmp_path, b"w")
    made = [reg.register(src, parent=None if n == 0 else f"v{n:04d}") for n in range(3)]
    assert [m.version for m in made] == ["v0001", "v0002", "v0003"]
    assert [m.version for m in reg.versions()] == ["v0001", "v0002", "v0003"]
    assert made[2].parent == "v0002"
    named = reg.register(src, version="v0010")
    assert named.version == "v0010" and reg.next_version() == "v0011"
    # A version removed by hand is not reused: the promotion log still remembers it.
    reg.promote("v0010")
    shutil.rmtree(reg.root / "v0010")
    assert reg.next_version() == "v0011"


def test_registering_an_existing_version_or_a_bad_name_is_refused(tmp_path: Path, reg: AdapterRegistry) -> None:
    src = fake_adapter(tmp_path, b"w")
    reg.register(src, version="v0001")
    with pytest.raises(AdapterExists):
        reg.register(src, version="v0001")
    for bad in ["../x", "a/b", "", "v1\n", ".hidden", "CURRENT", "current", "history.jsonl", "x" * 65]:
        with pytest.raises(ValueError):
            reg.register(src, version=bad)
    assert check_version("run-2024.01_a") == "run-2024.01_a"
    with pytest.raises(ValueError):
        reg.register(src, metrics={"HR@10": float("nan")})


def test_missing_files_are_refused_at_register(tmp_path: Path, reg: AdapterRegistry) -> None:
    src = fake_adapter(tmp_path, b"w")
    (src / CONFIG).unlink()
    with pytest.raises(AdapterCorrupt, match=CONFIG):
        reg.register(src)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=WEIGHTS):
        reg.register(empty)
    assert reg.versions() == []


def test_promote_rollback_and_current(tmp_path: Path, reg: AdapterRegistry) -> None:
    assert reg.current() is None
    assert reg.rollback() is None
    for n in range(3):
        reg.register(fake_adapter(tmp_path, f"w{n}".encode()))
    assert reg.promote("v0001").version == "v0001"
    assert reg.rollback() is None  # nothing earlier: CURRENT unchanged
    reg.promote("v0002")
    reg.promote("v0003")
    reg.promote("v0003")  # again: no-op
    assert reg.current() == reg.get("v0003")
    rolled = reg.rollback()
    assert rolled is not None and rolled.version == "v0002"
    rolled = reg.rollback()
    assert rolled is not None and rolled.version == "v0001"
    assert reg.rollback() is None
    assert (reg.root / CURRENT).read_text().strip() == "v0001"
    # After a rollback, a new promotion stacks on what is current.
    reg.promote("v0003")
    rolled = reg.rollback()
    assert rolled is not None and rolled.version == "v0001"
    actions = ["promote", "promote", "promote", "rollback", "rollback", "promote", "rollback"]
    assert [e["action"] for e in reg.history()] == actions


def test_current_survives_a_new_registry_object(tmp_path: Path, reg: AdapterRegistry) -> None:
    reg.register(fake_adapter(tmp_path, b"a"))
    reg.register(fake_adapter(tmp_path, b"b"))
    reg.promote("v0001")
    reg.promote("v0002")
    again = AdapterRegistry(reg.root)
    current = again.current()
    assert current is not None and current.version == "v0002"
    assert [m.version for m in again.versions()] == ["v0001", "v0002"]
    rolled = again.rollback()
    assert rolled is not None and rolled.version == "v0001"
    assert AdapterRegistry(reg.root).current() == reg.get("v0001")


def test_tampered_weights_are_refused(tmp_path: Path, reg: AdapterRegistry) -> None:
    good = reg.register(fake_adapter(tmp_path, b"good"))
    bad = reg.register(fake_adapter(tmp_path, b"fine"))
    reg.promote(good.version)
    (reg.root / bad.version / WEIGHTS).write_bytes(b"evil")
    assert not reg.verify(bad)
    assert not verify_dir(reg.root / bad.version, bad.sha256)
    with pytest.raises(AdapterCorrupt, match="sha256"):
        reg.promote(bad.version)
    current = reg.current()
    assert current is not None and current.version == good.version  # still serving the good one
    assert reg.verify(good) and verify_dir(reg.root / good.version, good.sha256)


def test_missing_files_are_refused_on_promote_and_rollback(tmp_path: Path, reg: AdapterRegistry) -> None:
    a = reg.register(fake_adapter(tmp_path, b"a"))
    b = reg.register(fake_adapter(tmp_path, b"b"))
    (reg.root / b.version / WEIGHTS).unlink()
    assert not reg.verify(b)
    with pytest.raises(AdapterCorrupt):
        reg.promote(b.version)
    with pytest.raises(AdapterNotFound):
        reg.promote("v0099")
    # Rolling back onto a damaged version is refused too; CURRENT stays.
    c = reg.register(fake_adapter(tmp_path, b"c"))
    reg.promote(a.version)
    reg.promote(c.version)
    (reg.root / a.version / CONFIG).unlink()
    with pytest.raises(AdapterCorrupt):
        reg.rollback()
    assert reg.current() == c


def test_current_naming_a_deleted_version_is_reported(tmp_path: Path, reg: AdapterRegistry) -> None:
    a = reg.register(fake_adapter(tmp_path, b"a"))
    reg.promote(a.version)
    shutil.rmtree(reg.root / a.version)
    with pytest.raises(AdapterNotFound, match=a.version):
        reg.current()


def test_announcement_points_at_the_verified_weights(tmp_path: Path, reg: AdapterRegistry) -> None:
    m = reg.register(fake_adapter(tmp_path, b"w"), parent="v0000", metrics={"HR@10": 0.5}, base="tiny")
    ann = reg.announcement(m)
    assert (ann.version, ann.sha256, ann.metrics, ann.parent, ann.base) == (
        m.version,
        m.sha256,
        {"HR@10": 0.5},
        "v0000",
        "tiny",
    )
    assert ann.created_at == m.created_at
    assert verify_dir(ann.uri, ann.sha256)


def test_leftovers_and_foreign_directories_are_not_versions(tmp_path: Path, reg: AdapterRegistry) -> None:
    reg.register(fake_adapter(tmp_path, b"a"))
    (reg.root / ".tmp-v0002-deadbeef").mkdir()  # a register that crashed mid-copy
    (reg.root / "notes").mkdir()  # no manifest
    assert [m.version for m in reg.versions()] == ["v0001"]
    assert reg.next_version() == "v0002"


def test_a_blend_shipped_with_an_adapter_is_under_the_manifest_and_the_announcement(
    tmp_path: Path, reg: AdapterRegistry
) -> None:
    from streamrec.generation import verified_adapter_dir

    plain = reg.register(fake_adapter(tmp_path, b"w0", name="plain"))
    src = fake_adapter(tmp_path, b"w1")
    (src / BLEND).write_bytes(b"neighbours")
    m = reg.register(src)
    assert plain.blend_sha256 is None
    assert m.blend_sha256 == hashlib.sha256(b"neighbours").hexdigest()
    ann = reg.announcement(m)
    assert ann.blend_sha256 == m.blend_sha256 and verify_dir(ann.uri, ann.sha256, ann.blend_sha256)
    assert verified_adapter_dir(ann) == reg.root / m.version
    reg.promote(m.version)

    # A tampered or missing blend is refused like tampered weights, by the registry and the worker.
    (reg.root / m.version / BLEND).write_bytes(b"evil neighbours")
    assert not reg.verify(m)
    with pytest.raises(ModelError, match="blend sha256 mismatch"):
        verified_adapter_dir(ann)
    with pytest.raises(AdapterCorrupt, match=BLEND):
        reg.promote(m.version)
    (reg.root / m.version / BLEND).unlink()
    with pytest.raises(AdapterCorrupt, match="missing"):
        reg.promote(m.version)
    with pytest.raises(ModelError, match="found missing"):
        verified_adapter_dir(ann)
