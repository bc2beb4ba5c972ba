"""The adapter registry: versioned LoRA adapters on disk (a data dir or a shared volume), each with a
manifest carrying the sha256 of its weights (and of the blend refitted with it, when there is one),
and the CURRENT pointer that promotion and rollback move. File I/O only: no torch, no Kafka;
announcing a promotion is the caller's job."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streamrec.errors import ModelError
from streamrec.events import AdapterAnnouncement, utcnow

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# The item-kNN / Markov blend an increment refitted on the feedback: served with the adapter.
BLEND = "blend.npz"
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
HISTORY = "history.jsonl"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NUMBERED = re.compile(r"v(\d+)")
# Names the registry itself uses at its root; compared case-insensitively for macOS/Windows volumes.
_RESERVED = {CURRENT.lower(), HISTORY.lower()}
_CHUNK = 1 << 20


class AdapterNotFound(ModelError):
    """The adapter version does not exist in the registry. Check `streamrec adapters list` and the
    registry path (a shared volume may not be mounted)."""


class AdapterCorrupt(ModelError):
    """The adapter's files are missing or its weights do not match the sha256 in its manifest. Do not
    serve it: register the adapter again from the trainer's output, or roll back."""


class AdapterExists(ModelError):
    """A version with this name is already registered; versions are immutable. Pick another name, or
    let the registry choose the next one."""


class Manifest(BaseModel):
    """manifest.json of one adapter version."""

    model_config = ConfigDict(frozen=True)

    version: str
    parent: str | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    blend_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    base: str | None = None


def check_version(version: str) -> str:
    """`version` if it is safe as a directory name, else ValueError."""
    if not _VERSION.fullmatch(version) or version.lower() in _RESERVED:
        raise ValueError(
            f"invalid adapter version {version!r}: use 1-64 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, and not {sorted(_RESERVED)}"
        )
    return version


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks so large weights never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_dir(directory: str | Path, sha256: str, blend_sha256: str | None = None) -> bool:
    """True when `directory` holds an adapter config and weights whose sha256 is `sha256`, and a
    blend whose sha256 is `blend_sha256` when one is expected. For inference workers checking an
    announcement before they load it."""
    d = Path(directory)
    try:
        if not (d / CONFIG).is_file() or sha256_file(d / WEIGHTS) != sha256:
            return False
        return blend_sha256 is None or sha256_file(d / BLEND) == blend_sha256
    except OSError:
        return False


def _fsync(path: Path) -> None:
    # Opened read-only: enough for fsync on files and directories, and copied files keep their
    # source's (maybe read-only) mode.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    # Readers (other workers, the CLI) must see the old file or the new one, never a torn write.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


class AdapterRegistry:
    """Layout under `root`:
        <version>/adapter_model.safetensors, adapter_config.json (+ whatever else peft saved)
        <version>/manifest.json   version, parent, sha256 of the weights, metrics, created_at, base
        CURRENT                   the promoted version's name (absent: none promoted)
        history.jsonl             one line per change of CURRENT: at, action, version, previous
    Versions are immutable once registered. Writers are expected to be one at a time (the trainer
    or an operator); there is no lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ---- versions -------------------------------------------------------------------------

    def path(self, version: str) -> Path:
        return self.root / check_version(version)

    def next_version(self) -> str:
        """'v0001', 'v0002', ...: one more than the highest vNNNN ever registered or promoted here."""
        numbers = [0]
        if self.root.is_dir():
            numbers += [int(m.group(1)) for p in self.root.iterdir() if (m := _NUMBERED.fullmatch(p.name))]
        for entry in self._history():
            for key in ("version", "previous"):
                m = _NUMBERED.fullmatch(str(entry.get(key) or ""))
                if m:
                    numbers.append(int(m.group(1)))
        return f"v{max(numbers) + 1:04d}"

    def register(
        self,
        src_dir: str | Path,
        version: str | None = None,
        parent: str | None = None,
        metrics: Mapping[str, float] | None = None,
        base: str | None = None,
    ) -> Manifest:
        """Copy an adapter directory (peft's save_pretrained output) in as `version` (default: the
        next one) and write its manifest. The copy is built under a hidden temporary name and
        renamed into place, so a crash never leaves a half-written version behind."""
        src = Path(src_dir)
        for name in (WEIGHTS, CONFIG):
            if not (src / name).is_file():
                raise AdapterCorrupt(f"cannot register {src}: {name} is missing")
        scores = {str(k): float(v) for k, v in (metrics or {}).items()}
        bad = [k for k, v in scores.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"metrics must be finite numbers: {bad}")
        version = check_version(self.next_version() if version is None else version)
        final = self.root / version
        if final.exists():
            raise AdapterExists(f"adapter {version} is already registered at {final}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{version}-{uuid.uuid4().hex}"
        try:
            shutil.copytree(src, tmp)  # follows symlinks: the registry holds real files
            for p in tmp.rglob("*"):
                if p.is_file():
                    _fsync(p)  # the rename below must not outrun the data
            # Hash the copy, not the source: the manifest must describe the bytes the registry holds.
            manifest = Manifest(
                version=version,
                parent=parent,
                sha256=sha256_file(tmp / WEIGHTS),
                blend_sha256=sha256_file(tmp / BLEND) if (tmp / BLEND).is_file() else None,
                metrics=scores,
                base=base,
            )
            _write_atomic(tmp / MANIFEST, manifest.model_dump_json(indent=2))
            try:
                os.rename(tmp, final)
            except OSError as exc:  # another writer registered the same version meanwhile
                raise AdapterExists(f"adapter {version} is already registered at {final}") from exc
            _fsync(self.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return manifest

    def get(self, version: str) -> Manifest:
        d = self.path(version)
        if not (d / MANIFEST).is_file():
            raise AdapterNotFound(f"adapter {version} is not registered under {self.root}")
        try:
            manifest = Manifest.model_validate_json((d / MANIFEST).read_bytes())
        except (OSError, ValidationError) as exc:
            raise AdapterCorrupt(f"adapter {version}: unreadable {d / MANIFEST}: {exc}") from exc
        if manifest.version != version:
            raise AdapterCorrupt(f"adapter directory {version} holds a manifest for {manifest.version}")
        return manifest

    def versions(self) -> list[Manifest]:
        """Every registered version, oldest first. Hidden temporaries and directories without a
        readable manifest (not made by `register`) are left out."""
        if not self.root.is_dir():
            return []
        found: list[Manifest] = []
        for p in self.root.iterdir():
            if p.is_dir() and _VERSION.fullmatch(p.name) and p.name.lower() not in _RESERVED:
                try:
                    found.append(self.get(p.name))
                except ModelError:
                    continue
        return sorted(found, key=lambda m: (m.created_at, m.version))

    def verify(self, manifest: Manifest) -> bool:
        """True when the version's config and weights are present and the sha256s match."""
        return verify_dir(self.path(manifest.version), manifest.sha256, manifest.blend_sha256)

    def _verified(self, version: str) -> Manifest:
        manifest = self.get(version)
        d = self.path(version)
        if not (d / WEIGHTS).is_file() or not (d / CONFIG).is_file():
            raise AdapterCorrupt(f"adapter {version}: {WEIGHTS} or {CONFIG} is missing in {d}")
        actual = sha256_file(d / WEIGHTS)
        if actual != manifest.sha256:
            raise AdapterCorrupt(f"adapter {version}: sha256 of {WEIGHTS} is {actual}, manifest says {manifest.sha256}")
        if manifest.blend_sha256 is not None:
            blend = sha256_file(d / BLEND) if (d / BLEND).is_file() else "missing"
            if blend != manifest.blend_sha256:
                raise AdapterCorrupt(
                    f"adapter {version}: sha256 of {BLEND} is {blend}, manifest says {manifest.blend_sha256}"
                )
        return manifest

    # ---- promotion ------------------------------------------------------------------------

    def current_version(self) -> str | None:
        try:
            name = (self.root / CURRENT).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return name or None

    def current(self) -> Manifest | None:
        """The promoted version's manifest, None when nothing was promoted. Raises AdapterNotFound
        when CURRENT names a version that is gone."""
        name = self.current_version()
        return None if name is None else self.get(name)

    def promote(self, version: str) -> Manifest:
        """Make `version` current after checking its weights against its manifest (AdapterNotFound,
        AdapterCorrupt otherwise). Promoting the current version again changes nothing."""
        manifest = self._verified(version)
        previous = self.current_version()
        if previous != version:
            self._move(version, previous, "promote")
        return manifest

    def rollback(self) -> Manifest | None:
        """Return to the version promoted before the current one (checked like `promote`), undoing
        promotions in reverse order: promote v1, v2, v3, then rollback twice gives v1. None, with
        CURRENT unchanged, when there is nothing earlier to return to."""
        stack = self._stack()
        if len(stack) < 2:
            return None
        target = stack[-2]
        manifest = self._verified(target)
        self._move(target, stack[-1], "rollback")
        return manifest

    def announcement(self, manifest: Manifest) -> AdapterAnnouncement:
        return AdapterAnnouncement(
            version=manifest.version,
            uri=str(self.path(manifest.version).resolve()),
            sha256=manifest.sha256,
            blend_sha256=manifest.blend_sha256,
            metrics=manifest.metrics,
            parent=manifest.parent,
            base=manifest.base,
            created_at=manifest.created_at,
        )

    def history(self) -> list[dict[str, Any]]:
        """The promotion log, oldest first."""
        return self._history()

    def _move(self, version: str, previous: str | None, action: str) -> None:
        # CURRENT first: it is what readers trust. If we crash before the log line, _stack() notices
        # that CURRENT differs from the log's top and treats it as promoted.
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.root / CURRENT, version + "\n")
        line = {"at": utcnow().isoformat(), "action": action, "version": version, "previous": previous}
        with open(self.root / HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _history(self) -> list[dict[str, Any]]:
        try:
            lines = (self.root / HISTORY).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries: list[dict[str, Any]] = []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-append
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def _stack(self) -> list[str]:
        """Promoted versions still to roll back through, the current one last."""
        stack: list[str] = []
        for entry in self._history():
            version = entry.get("version")
            if not isinstance(version, str):
                continue
            if entry.get("action") == "rollback":
                # Pop down to the version rolled back to.
                while stack and stack[-1] != version:
                    stack.pop()
                if not stack:
                    stack.append(version)
            else:
                stack.append(version)
        current = self.current_version()
        if current is not None and (not stack or stack[-1] != current):
            stack.append(current)
        return stack
