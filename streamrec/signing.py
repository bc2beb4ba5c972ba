"""Signed adapter announcements: HMAC-SHA256 under a secret shared by the trainer, the CLI and every
inference worker, over the announcement without its signature as sorted-key compact JSON. A hash in
an announcement proves the files are the ones it names; only the signature proves who named them.
Pure: no I/O, no Kafka."""

from __future__ import annotations

import hashlib
import hmac
import json

from pydantic import SecretStr

from streamrec.errors import ConfigError, ModelError
from streamrec.events import AdapterAnnouncement


class AdapterUnsigned(ModelError):
    """An adapter announcement came without a signature while this worker has STREAMREC_ADAPTER_KEY.
    Set the same key on the trainer and wherever `streamrec adapters promote/rollback` runs, then
    promote the version again; if nobody of yours sent it, find who writes to the adapters topic."""


class AdapterBadSignature(ModelError):
    """An adapter announcement's signature does not match: the keys differ, or the announcement was
    forged or altered. Check that STREAMREC_ADAPTER_KEY is the same secret on the trainer, the CLI and
    every inference worker; if it is, restrict who may write to the adapters topic (Kafka ACLs)."""


def adapter_key(key: SecretStr | None) -> bytes | None:
    """The key's bytes, None when signing is off. An empty key would sign with no secret at all."""
    if key is None:
        return None
    raw = key.get_secret_value()
    if not raw.strip():
        raise ConfigError("STREAMREC_ADAPTER_KEY is set but empty: set a long random secret, or unset it")
    return raw.encode("utf-8")


def canonical(announcement: AdapterAnnouncement) -> bytes:
    """What is signed: every field but the signature, sorted keys, no spaces. Values go through the
    model's own JSON form, so a message parsed back from Kafka serialises to the same bytes."""
    fields = announcement.model_dump(mode="json", exclude={"signature"})
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signature(announcement: AdapterAnnouncement, key: bytes) -> str:
    return hmac.new(key, canonical(announcement), hashlib.sha256).hexdigest()


def sign(announcement: AdapterAnnouncement, key: SecretStr | None) -> AdapterAnnouncement:
    """The announcement with its signature; unchanged when no key is configured."""
    secret = adapter_key(key)
    if secret is None:
        return announcement
    return announcement.model_copy(update={"signature": signature(announcement, secret)})


def check_signature(announcement: AdapterAnnouncement, key: SecretStr | None) -> None:
    """Raise AdapterUnsigned / AdapterBadSignature unless the announcement is signed with `key`.
    Without a key nothing can be checked and every announcement passes."""
    secret = adapter_key(key)
    if secret is None:
        return
    if announcement.signature is None:
        raise AdapterUnsigned(f"adapter {announcement.version}: the announcement is not signed")
    if not hmac.compare_digest(signature(announcement, secret), announcement.signature):
        raise AdapterBadSignature(f"adapter {announcement.version}: the announcement's signature does not match")
