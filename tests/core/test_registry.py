"""The on-disk adapter registry with small fake adapters (bytes written here; no torch), and the
checks an inference worker runs on an announcement before loading anything."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from pydantic import SecretStr

from streamrec.errors import ConfigError, ModelError
from streamrec.events import AdapterAnnouncement, parse
from streamrec.registry import (
    BLEND,
    CONFIG,
    CURRENT,
    MANIFEST,
    WEIGHTS,
    AdapterCorrupt,
    AdapterExists,
    AdapterNotFound,
    AdapterOutsideRegistry,
    AdapterRegistry,
    AdapterUnhashed,
    AnnouncementInvalid,
    announced_dir,
    announced_files,
    check_version,
    private_copy,
    verify_dir,
)
from streamrec.settings import Settings
from streamrec.signing import AdapterBadSignature, AdapterUnsigned, canonical, check_signature, sign

KEY = SecretStr("a shared secret for tests")


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
    # Every file is hashed, the config and whatever else was saved too; the manifest itself is not.
    assert m.files == {
        WEIGHTS: m.sha256,
        CONFIG: hashlib.sha256((src / CONFIG).read_bytes()).hexdigest(),
        "README.md": hashlib.sha256(b"trained by a test").hexdigest(),
    }
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
    assert bad.files is not None and not verify_dir(reg.root / bad.version, bad.files)
    with pytest.raises(AdapterCorrupt, match="sha256"):
        reg.promote(bad.version)
    current = reg.current()
    assert current is not None and current.version == good.version  # still serving the good one
    assert good.files is not None and reg.verify(good) and verify_dir(reg.root / good.version, good.files)


def test_a_changed_config_or_a_missing_or_extra_file_is_refused(tmp_path: Path, reg: AdapterRegistry) -> None:
    made = [reg.register(fake_adapter(tmp_path, b"w")) for _ in range(4)]
    for m in made:
        assert reg.verify(m)
    config = reg.path(made[0].version) / CONFIG
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4000}))  # weights untouched
    (reg.path(made[1].version) / "README.md").unlink()
    (reg.path(made[2].version) / "extra.bin").write_bytes(b"not listed")
    (reg.path(made[3].version) / "sub").mkdir()
    (reg.path(made[3].version) / "sub" / "adapter_model.safetensors").write_bytes(b"w")
    problems = ["sha256 mismatch: adapter_config", "missing: README", "not listed: extra", "not listed: sub/"]
    for m, problem in zip(made, problems, strict=True):
        assert not reg.verify(m)
        with pytest.raises(AdapterCorrupt, match=problem):
            reg.promote(m.version)
    assert reg.current() is None


def legacy(reg: AdapterRegistry, tmp_path: Path, payload: bytes) -> str:
    """A version as registered before manifests hashed every file: weights and blend sha256 only."""
    m = reg.register(fake_adapter(tmp_path, payload))
    (reg.path(m.version) / MANIFEST).write_text(m.model_dump_json(exclude={"files"}))
    return m.version


def test_a_version_registered_before_every_file_was_hashed_is_listed_but_must_be_re_registered(
    tmp_path: Path, reg: AdapterRegistry
) -> None:
    old = legacy(reg, tmp_path, b"old")
    m = reg.get(old)
    assert m.files is None and [v.version for v in reg.versions()] == [old]
    assert not reg.verify(m)
    with pytest.raises(AdapterUnhashed, match=f"streamrec adapters reregister {old}"):
        reg.promote(old)
    with pytest.raises(AdapterUnhashed, match="reregister"):
        reg.announcement(m)
    assert reg.current() is None

    again = reg.reregister(old)
    assert again.files is not None and again.files[WEIGHTS] == m.sha256 and reg.get(old) == again
    assert reg.promote(old) == again and reg.announcement(again).files == again.files
    assert reg.reregister(old) == again  # already hashed: unchanged

    # What the old manifest did hash is checked before anything is vouched for.
    changed = legacy(reg, tmp_path, b"older")
    (reg.path(changed) / WEIGHTS).write_bytes(b"evil")
    with pytest.raises(AdapterCorrupt, match=WEIGHTS):
        reg.reregister(changed)
    assert reg.get(changed).files is None


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
    assert (ann.version, ann.sha256, ann.files, ann.metrics, ann.parent, ann.base) == (
        m.version,
        m.sha256,
        m.files,
        {"HR@10": 0.5},
        "v0000",
        "tiny",
    )
    assert ann.created_at == m.created_at and ann.signature is None
    assert ann.files is not None and verify_dir(ann.uri, ann.files)
    assert announced_dir(reg.root, ann) == (reg.root / m.version).resolve()


def test_leftovers_and_foreign_directories_are_not_versions(tmp_path: Path, reg: AdapterRegistry) -> None:
    reg.register(fake_adapter(tmp_path, b"a"))
    (reg.root / ".tmp-v0002-deadbeef").mkdir()  # a register that crashed mid-copy
    (reg.root / "notes").mkdir()  # no manifest
    assert [m.version for m in reg.versions()] == ["v0001"]
    assert reg.next_version() == "v0002"


def test_a_blend_shipped_with_an_adapter_is_under_the_manifest_and_the_announcement(
    tmp_path: Path, reg: AdapterRegistry
) -> None:
    from streamrec.generation import verified_adapter

    settings = Settings(data_dir=tmp_path, registry_dir=reg.root)
    plain = reg.register(fake_adapter(tmp_path, b"w0", name="plain"))
    src = fake_adapter(tmp_path, b"w1")
    (src / BLEND).write_bytes(b"neighbours")
    m = reg.register(src)
    assert plain.blend_sha256 is None and plain.files is not None and BLEND not in plain.files
    assert m.blend_sha256 == hashlib.sha256(b"neighbours").hexdigest()
    ann = reg.announcement(m)
    assert ann.blend_sha256 == m.blend_sha256 and ann.files is not None and ann.files[BLEND] == m.blend_sha256
    with verified_adapter(settings, ann) as copy:
        assert (copy / BLEND).read_bytes() == b"neighbours" and copy.parent.parent == tmp_path / "adapter-copies"
    assert list((tmp_path / "adapter-copies").iterdir()) == []  # removed once loaded
    reg.promote(m.version)

    # A tampered or missing blend is refused like tampered weights, by the registry and the worker.
    (reg.root / m.version / BLEND).write_bytes(b"evil neighbours")
    assert not reg.verify(m)
    with pytest.raises(AdapterCorrupt, match=f"sha256 mismatch: {BLEND}"), verified_adapter(settings, ann):
        pass
    with pytest.raises(AdapterCorrupt, match=BLEND):
        reg.promote(m.version)
    (reg.root / m.version / BLEND).unlink()
    with pytest.raises(AdapterCorrupt, match="missing"):
        reg.promote(m.version)
    with pytest.raises(AdapterCorrupt, match=f"missing: {BLEND}"), verified_adapter(settings, ann):
        pass
    # An announcement whose blend hash disagrees with its file list is not one a worker can check.
    forged = ann.model_copy(update={"blend_sha256": None})
    with pytest.raises(AnnouncementInvalid):
        announced_files(forged)


def test_signatures_survive_kafka_and_catch_any_change(tmp_path: Path, reg: AdapterRegistry) -> None:
    m = reg.register(fake_adapter(tmp_path, b"w"), metrics={"HR@10": 0.1 + 0.2, "NDCG@10": 1e-7}, base="tiny")
    ann = reg.announcement(m, KEY)
    assert ann.signature is not None and len(ann.signature) == 64
    assert sign(ann.model_copy(update={"signature": None}), KEY) == ann
    # Through the wire and back: the same canonical bytes, so the signature still holds.
    received = parse(AdapterAnnouncement, ann.model_dump_json().encode())
    assert canonical(received) == canonical(ann)
    check_signature(received, KEY)
    assert json.loads(canonical(ann)) == json.loads(ann.model_dump_json(exclude={"signature"}))
    assert b" " not in canonical(ann).replace(b"HR@10", b"").replace(b"NDCG@10", b"")

    changes = {
        "version": "v0002",
        "uri": "/elsewhere",
        "metrics": {"HR@10": 0.9},
        "files": {**(m.files or {}), CONFIG: "0" * 64},
        "created_at": m.created_at.replace(year=2000),
    }
    for field, value in changes.items():
        with pytest.raises(AdapterBadSignature):
            check_signature(received.model_copy(update={field: value}), KEY)
    with pytest.raises(AdapterBadSignature):
        check_signature(reg.announcement(m, SecretStr("another key")), KEY)
    with pytest.raises(AdapterUnsigned):
        check_signature(reg.announcement(m), KEY)
    # Without a key nothing is checked; with an empty one nothing could be.
    check_signature(reg.announcement(m), None)
    check_signature(reg.announcement(m, SecretStr("another key")), None)
    with pytest.raises(ConfigError, match="STREAMREC_ADAPTER_KEY"):
        reg.announcement(m, SecretStr(" "))


def test_an_announcement_is_only_read_from_its_own_version_in_the_registry(
    tmp_path: Path, reg: AdapterRegistry
) -> None:
    m = reg.register(fake_adapter(tmp_path, b"w"))
    ann = reg.announcement(m, KEY)
    assert announced_dir(reg.root, ann.model_copy(update={"uri": f"file://{ann.uri}"})) == Path(ann.uri)
    # The same valid files, copied elsewhere and announced there with their correct hashes.
    outside = tmp_path / "elsewhere" / m.version
    shutil.copytree(reg.path(m.version), outside)
    for uri in [str(outside), str(reg.root / m.version / ".." / ".." / "elsewhere" / m.version), str(reg.root)]:
        with pytest.raises(AdapterOutsideRegistry):
            announced_dir(reg.root, ann.model_copy(update={"uri": uri}))
    # A version directory that is a link leading out of the registry, named by its own uri.
    os.symlink(outside, reg.root / "v0009")
    with pytest.raises(AdapterOutsideRegistry, match="outside"):
        announced_dir(reg.root, ann.model_copy(update={"version": "v0009", "uri": str(reg.root / "v0009")}))
    for version in ["..", "../elsewhere", "CURRENT"]:
        with pytest.raises(AdapterOutsideRegistry):
            announced_dir(reg.root, ann.model_copy(update={"version": version}))
    with pytest.raises(AdapterNotFound, match="mounted"):
        announced_dir(reg.root, ann.model_copy(update={"version": "v0042", "uri": str(reg.root / "v0042")}))
    # Another registry root: the trainer's path is not this worker's.
    with pytest.raises(AdapterOutsideRegistry):
        announced_dir(tmp_path / "elsewhere", ann)


def test_the_worker_checks_and_loads_a_private_copy(tmp_path: Path, reg: AdapterRegistry) -> None:
    m = reg.register(fake_adapter(tmp_path, b"weights"))
    assert m.files is not None
    folder = reg.path(m.version)
    with private_copy(folder, m.files, m.version) as copy:
        assert oct(copy.parent.stat().st_mode & 0o777) == "0o700"
        assert sorted(p.name for p in copy.iterdir()) == sorted(m.files)
        # Whatever the registry's files become after the check, the copy is what was checked.
        (folder / WEIGHTS).write_bytes(b"swapped after the check")
        assert (copy / WEIGHTS).read_bytes() == b"weights"
    assert not copy.parent.exists()
    with pytest.raises(AdapterCorrupt, match=f"sha256 mismatch: {WEIGHTS}"), private_copy(folder, m.files, m.version):
        pass
    (folder / WEIGHTS).write_bytes(b"weights")
    # Links are refused, not followed, even to the right bytes.
    (folder / "README.md").unlink()
    (tmp_path / "readme").write_text("trained by a test")
    os.symlink(tmp_path / "readme", folder / "README.md")
    with pytest.raises(AdapterCorrupt, match="not a plain file"), private_copy(folder, m.files, m.version):
        pass
    assert not any(p.name.startswith(f"streamrec-{m.version}-") for p in Path(tempfile.gettempdir()).iterdir())


def test_refusals_are_told_apart_and_a_bad_signature_is_refused_before_any_file_is_read(
    tmp_path: Path, reg: AdapterRegistry
) -> None:
    from streamrec.errors import InvalidMessage
    from streamrec.generation import refusal_reason, verified_adapter

    settings = Settings(data_dir=tmp_path, registry_dir=reg.root, adapter_key=KEY)
    m = reg.register(fake_adapter(tmp_path, b"w"))
    good = reg.announcement(m, KEY)

    def refused(announcement: AdapterAnnouncement) -> str:
        with pytest.raises(ModelError) as caught, verified_adapter(settings, announcement):
            pass
        return refusal_reason(caught.value)

    nowhere = good.model_copy(update={"version": "v0404", "uri": str(reg.root / "v0404")})
    assert refused(sign(nowhere.model_copy(update={"signature": None}), SecretStr("x"))) == "bad_signature"
    assert refused(nowhere.model_copy(update={"signature": None})) == "unsigned"
    assert refused(sign(nowhere, KEY)) == "missing"
    outside = tmp_path / "out" / m.version
    shutil.copytree(reg.path(m.version), outside)
    assert refused(sign(good.model_copy(update={"uri": str(outside)}), KEY)) == "outside_registry"
    assert refused(sign(good.model_copy(update={"files": None}), KEY)) == "invalid"
    (reg.path(m.version) / CONFIG).write_text("{}")
    assert refused(good) == "hash_mismatch"
    assert refusal_reason(InvalidMessage("not JSON")) == "invalid"
    assert refusal_reason(ModelError("cannot load adapter")) == "load"
    assert refusal_reason(RuntimeError("anything else")) == "load"
