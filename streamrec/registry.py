"""The adapter registry: versioned LoRA adapters on disk (a data dir or a shared volume), each with a
manifest carrying the sha256 of every file of the version (weights, config, the blend refitted with
it, whatever peft saved), and the CURRENT pointer that promotion and rollback move. Also the checks
an inference worker runs on an announcement before it loads anything: the version's own directory
in its registry, every file as announced, read from a private copy. File I/O only: no torch, no
Kafka; sending an announcement is the caller's job."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from streamrec.errors import ModelError
from streamrec.events import AdapterAnnouncement, utcnow
from streamrec.signing import sign

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
_SHA256 = re.compile(r"[0-9a-f]{64}")


class AdapterNotFound(ModelError):
    """The adapter version does not exist in the registry. Check `streamrec adapters list` and the
    registry path (a shared volume may not be mounted)."""


class AdapterCorrupt(ModelError):
    """The adapter's files are not the ones its manifest or announcement lists: one is missing,
    changed (its sha256 differs) or not listed at all. Do not serve it: register the adapter again
    from the trainer's output, or roll back."""


class AdapterUnhashed(AdapterCorrupt):
    """The version was registered before manifests listed the sha256 of every file, so its config
    cannot be checked. Check its adapter_config.json, then `streamrec adapters reregister VERSION`
    (hashes its files as they are now) and promote it again; or promote a newer version."""


class AdapterOutsideRegistry(ModelError):
    """An announcement names a directory that is not its version's directory in this worker's
    registry (or the version directory leads outside the registry). Give the trainer and every
    inference worker the same STREAMREC_REGISTRY_DIR, on a volume mounted at the same path; an
    announcement pointing anywhere else is not served."""


class AnnouncementInvalid(ModelError):
    """An announcement does not describe an adapter the worker can check: no sha256 of its files
    (sent before announcements carried them), or hashes that contradict each other. Promote the
    version again with the current `streamrec adapters promote`."""


class AdapterExists(ModelError):
    """A version with this name is already registered; versions are immutable. Pick another name, or
    let the registry choose the next one."""


class Manifest(BaseModel):
    """manifest.json of one adapter version. `files` is None in manifests written before every file
    was hashed: such a version is listed but never promoted or served until re-registered."""

    model_config = ConfigDict(frozen=True)

    version: str
    parent: str | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Of the weights (also in `files`).")
    blend_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="Of the blend, if any.")
    files: dict[str, str] | None = Field(
        default=None, description="sha256 of every file but manifest.json, by path relative to the version."
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)
    base: str | None = None

    @model_validator(mode="after")
    def _files_agree(self) -> Manifest:
        if self.files is not None:
            check_listing(self.version, self.files, self.sha256, self.blend_sha256)
        return self


def check_listing(version: str, files: Mapping[str, str], sha256: str, blend_sha256: str | None) -> None:
    """ValueError unless `files` lists the config and the weights, and agrees with the weights' and
    the blend's own sha256 fields (a blend is served exactly when one is listed)."""
    if CONFIG not in files or files.get(WEIGHTS) != sha256 or files.get(BLEND) != blend_sha256:
        raise ValueError(
            f"adapter {version}: the file list must hold {CONFIG} and {WEIGHTS}, and agree with the sha256 of "
            f"the weights and of the blend"
        )
    bad = [name for name, digest in files.items() if not _SHA256.fullmatch(digest)]
    if bad:
        raise ValueError(f"adapter {version}: not a sha256 for {bad}")


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


def _regular_files(directory: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every file under `directory` but its manifest. Links and special
    files are refused, not followed: what is hashed must be what is loaded, and a fifo would hang."""
    for parent, dirs, names in os.walk(directory):
        here = Path(parent)
        for name in sorted(dirs):
            if (here / name).is_symlink():
                raise AdapterCorrupt(f"{here / name} is a link; a registered adapter holds plain files only")
        for name in sorted(names):
            path = here / name
            rel = path.relative_to(directory).as_posix()
            if rel == MANIFEST:
                continue
            if not stat.S_ISREG(path.lstat().st_mode):
                raise AdapterCorrupt(f"{path} is not a plain file; a registered adapter holds plain files only")
            yield rel, path


def hash_files(directory: str | Path) -> dict[str, str]:
    """sha256 of every file under `directory` but manifest.json, by relative posix path."""
    d = Path(directory)
    try:
        return {rel: sha256_file(path) for rel, path in _regular_files(d)}
    except OSError as exc:
        raise AdapterCorrupt(f"cannot read the adapter files in {d}: {exc}") from exc


def compare_files(version: str, found: Mapping[str, str], expected: Mapping[str, str]) -> None:
    """AdapterCorrupt naming every missing, changed or unlisted file, when `found` is not `expected`."""
    missing = sorted(expected.keys() - found.keys())
    changed = sorted(n for n in expected.keys() & found.keys() if found[n] != expected[n])
    extra = sorted(found.keys() - expected.keys())
    problems = [
        f"{label}: {', '.join(names)}"
        for label, names in (("missing", missing), ("sha256 mismatch", changed), ("not listed", extra))
        if names
    ]
    if problems:
        raise AdapterCorrupt(f"adapter {version}: files differ from the listed sha256s ({'; '.join(problems)})")


def verify_dir(directory: str | Path, files: Mapping[str, str]) -> bool:
    """True when `directory` holds exactly the files in `files`, each with its sha256."""
    try:
        compare_files(Path(directory).name, hash_files(directory), files)
    except AdapterCorrupt:
        return False
    return True


def announced_dir(root: str | Path, announcement: AdapterAnnouncement) -> Path:
    """The directory an announcement may be loaded from: its version's under `root`, symlinks
    resolved, and only when the announced uri is that same directory. Whatever a message says, a
    worker reads nothing outside its own registry."""
    try:
        version = check_version(announcement.version)
    except ValueError as exc:
        raise AdapterOutsideRegistry(f"adapter announcement: {exc}") from None
    registry = Path(root).resolve()
    folder = (registry / version).resolve()
    if folder.parent != registry:  # the version directory is a link leading elsewhere
        raise AdapterOutsideRegistry(f"adapter {version}: {registry / version} leads to {folder}, outside {registry}")
    claimed = Path(announcement.uri.removeprefix("file://")).resolve()
    if claimed != folder:
        raise AdapterOutsideRegistry(
            f"adapter {version}: announced at {announcement.uri}, but this worker's registry holds it at {folder}"
        )
    if not folder.is_dir():
        raise AdapterNotFound(f"adapter {version} is not in {registry} (is the registry volume mounted here?)")
    return folder


def announced_files(announcement: AdapterAnnouncement) -> dict[str, str]:
    """The announcement's file list, once it is there and agrees with its own weights and blend hashes."""
    if announcement.files is None:
        raise AnnouncementInvalid(f"adapter {announcement.version}: the announcement lists no file sha256s")
    try:
        check_listing(announcement.version, announcement.files, announcement.sha256, announcement.blend_sha256)
    except ValueError as exc:
        raise AnnouncementInvalid(str(exc)) from None
    return dict(announcement.files)


@contextmanager
def private_copy(
    directory: str | Path, files: Mapping[str, str], version: str, workdir: str | Path | None = None
) -> Iterator[Path]:
    """A copy of the adapter in a fresh private temporary directory (under `workdir`, default the
    system's), checked against `files`, removed on exit. Load from the copy: nothing another process
    writes to the registry after the check can reach the model (checking the shared files, then
    loading them, would leave that gap)."""
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"streamrec-{version}-", dir=workdir))  # mode 0700
    try:
        copy = tmp / "adapter"
        try:
            copy.mkdir()
            for rel, path in _regular_files(Path(directory)):
                (copy / rel).parent.mkdir(parents=True, exist_ok=True)
                _copy_plain(path, copy / rel)
        except OSError as exc:
            raise AdapterCorrupt(f"adapter {version}: cannot copy its files from {directory}: {exc}") from exc
        # The copies are hashed, not the originals; an unlisted file is refused too (peft reads more
        # than the weights and the config).
        compare_files(version, hash_files(copy), files)
        yield copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_plain(src: Path, dst: Path) -> None:
    # O_NOFOLLOW and O_NONBLOCK: a file swapped for a link or a fifo after the listing is refused,
    # not followed or waited on.
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterCorrupt(f"{src} is not a plain file")
        with open(fd, "rb", closefd=False) as f, open(dst, "xb") as out:
            shutil.copyfileobj(f, out, _CHUNK)
    finally:
        os.close(fd)


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
        <version>/manifest.json   version, parent, sha256 of every other file, metrics, created_at, base
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
            files = hash_files(tmp)
            manifest = Manifest(
                version=version,
                parent=parent,
                sha256=files[WEIGHTS],
                blend_sha256=files.get(BLEND),
                files=files,
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
        """True when the version holds exactly the files its manifest lists, each with its sha256
        (False for a manifest that lists none: registered before every file was hashed)."""
        return manifest.files is not None and verify_dir(self.path(manifest.version), manifest.files)

    def _verified(self, version: str) -> Manifest:
        manifest = self.get(version)
        if manifest.files is None:
            raise AdapterUnhashed(
                f"adapter {version} was registered before manifests hashed every file: check its {CONFIG}, "
                f"then re-register it (`streamrec adapters reregister {version}`)"
            )
        compare_files(version, hash_files(self.path(version)), manifest.files)
        return manifest

    def reregister(self, version: str) -> Manifest:
        """Give a version registered before manifests hashed every file the sha256 of each of its
        files as they are now, after checking the hashes its old manifest does hold (the weights',
        the blend's). The config had none: whoever re-registers vouches for it. A version that lists
        its files already is returned unchanged."""
        manifest = self.get(version)
        if manifest.files is not None:
            return manifest
        d = self.path(version)
        files = hash_files(d)
        old = {WEIGHTS: manifest.sha256} | ({BLEND: manifest.blend_sha256} if manifest.blend_sha256 else {})
        compare_files(version, {n: files.get(n, "missing") for n in old}, old)
        if BLEND in files and manifest.blend_sha256 is None:
            raise AdapterCorrupt(f"adapter {version}: {BLEND} appeared after registration")
        try:
            upgraded = Manifest.model_validate(manifest.model_dump() | {"files": files})
        except ValidationError as exc:
            raise AdapterCorrupt(f"adapter {version}: cannot re-register: {exc}") from exc
        _write_atomic(d / MANIFEST, upgraded.model_dump_json(indent=2))
        return upgraded

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
        """Make `version` current after checking every file against its manifest (AdapterNotFound,
        AdapterCorrupt, AdapterUnhashed otherwise). Promoting the current version again changes nothing."""
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

    def announcement(self, manifest: Manifest, key: SecretStr | None = None) -> AdapterAnnouncement:
        """What tells the inference workers to serve `manifest`'s version: its place, the sha256 of
        every file, signed with `key` when one is configured."""
        if manifest.files is None:
            raise AdapterUnhashed(
                f"adapter {manifest.version} lists no file sha256s: `streamrec adapters reregister "
                f"{manifest.version}` first"
            )
        message = AdapterAnnouncement(
            version=manifest.version,
            uri=str(self.path(manifest.version).resolve()),
            sha256=manifest.sha256,
            blend_sha256=manifest.blend_sha256,
            files=manifest.files,
            metrics=manifest.metrics,
            parent=manifest.parent,
            base=manifest.base,
            created_at=manifest.created_at,
        )
        return sign(message, key)

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
