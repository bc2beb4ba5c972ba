"""The web port: faust's table and router views are off, /users/{id}/history asks for the bearer token
when one is set (a request forwarded to the worker owning the user too), /healthz and /metrics stay
open, and a worker binds loopback unless STREAMREC_WEB_HOST says otherwise."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from streamtest import send_raw, start_worker

from agents.app import faust_app
from streamrec.access import authorized
from streamrec.kafka.broker import die_with_parent, free_port
from streamrec.kafka.offsets import wait_caught_up
from streamrec.kafka.topics import create_topics
from streamrec.lab.runner import stop_process, wait_http
from streamrec.settings import Settings, to_env

TOKEN = SecretStr(f"web-{uuid.uuid4().hex}")
T0 = datetime(2024, 5, 1, tzinfo=UTC)
# faust's own variables for its web settings: a worker must not let them reopen what streamrec closes.
FAUST_WEB_ENV = {"WEB_BIND": "0.0.0.0", "APP_WEB_TABLES_ENABLED": "true", "APP_WEB_ROUTER_ENABLED": "true"}
CLOSED_PATHS = [
    "/table/",
    "/table/histories/",
    "/table/histories/{user}/",
    "/router/",
    "/router/histories/",
    "/router/histories/{user}/",
    "/router/topics",
    "/graph/",
    "/performance/",
    "/assignment/",
]


def get(url: str, authorization: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": authorization} if authorization is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def bearer(token: SecretStr = TOKEN) -> str:
    return f"Bearer {token.get_secret_value()}"


def event_messages(settings: Settings, users: list[str], per_user: int) -> list[tuple[str, str, bytes]]:
    out = []
    for n in range(per_user):
        for user in users:
            event = {
                "event_id": f"{user}-{n}",
                "user_id": user,
                "item_id": f"item-{n}",
                "type": "click",
                "ts": (T0 + timedelta(minutes=n)).isoformat(),
            }
            out.append((settings.topics.clicks, user, json.dumps(event).encode()))
    return out


def listening_addresses(port: int) -> set[str] | None:
    """Local addresses of the TCP sockets listening on `port`, from /proc/net (None off Linux)."""
    tables = [(Path("/proc/net/tcp"), socket.AF_INET), (Path("/proc/net/tcp6"), socket.AF_INET6)]
    if not tables[0][0].exists():
        return None
    found = set()
    for path, family in tables:
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(host)
                if sys.byteorder == "little":  # the kernel prints each 32-bit word in host order
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(socket.inet_ntop(family, raw))
    return found


def non_loopback_addresses() -> list[str]:
    """This machine's IPv4 addresses outside 127/8 (Linux interface ioctl; [] elsewhere)."""
    try:
        import fcntl
        import struct
    except ImportError:
        return []
    out = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
        address = socket.inet_ntoa(packed[20:24])
        if not address.startswith("127."):
            out.append(address)
    return out


def spawn_with_default_web_host(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """`streamrec worker ingest` configured by `settings` except STREAMREC_WEB_HOST (left to its
    default), with faust's own web variables set to reopen everything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")} | to_env(settings)
    del env["STREAMREC_WEB_HOST"]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamrec", "worker", "ingest", "--no-create"],
            env=env | FAUST_WEB_ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )


def test_bearer_token_check() -> None:
    for header in (None, "", "Bearer anything", "Basic abc"):
        assert authorized(header, None), "no token configured: every request passes"
    secret = TOKEN.get_secret_value()
    assert authorized(f"Bearer {secret}", TOKEN)
    assert authorized(f"bearer {secret}", TOKEN), "the scheme is case-insensitive (RFC 9110)"
    for header in (None, "", "Bearer", "Bearer ", f"Bearer {secret}x", f"Bearer {secret[:-1]}", f"Basic {secret}"):
        assert not authorized(header, TOKEN), header
    for header in (None, "", "Bearer", "Bearer "):
        assert not authorized(header, SecretStr("")), "an empty token admits nobody"


def test_faust_views_stay_off_whatever_fausts_environment_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (FAUST_WEB_ENV | {"APP_DEBUG": "true", "APP_WEB_METRICS_ENABLED": "true"}).items():
        monkeypatch.setenv(name, value)
    settings = Settings(data_dir=tmp_path, _env_file=None)
    app = faust_app(settings, "ingest")
    assert app.conf.web_bind == "127.0.0.1"
    assert app.conf.canonical_url.host == "127.0.0.1", "forwarded requests must reach the bound address"
    assert [bp for _, bp in app.web.blueprints._enabled] == ["faust.web.apps.production_index:blueprint"]
    wildcard = faust_app(settings.model_copy(update={"web_host": "0.0.0.0"}), "ingest")
    assert wildcard.conf.web_bind == "0.0.0.0"
    assert wildcard.conf.canonical_url.host == socket.gethostname()


@pytest.mark.kafka
@pytest.mark.slow
def test_worker_serves_only_its_views_on_loopback_and_asks_for_the_token(make_settings: Any, tmp_path: Path) -> None:
    settings = make_settings(web_token=TOKEN)
    create_topics(settings.kafka, settings.topics)
    user = "web-user"
    base = f"http://127.0.0.1:{settings.web_port}"
    proc = spawn_with_default_web_host(settings, tmp_path / "worker.log")
    try:
        wait_http(f"{base}/healthz", timeout=120, proc=proc)
        ends = send_raw(settings, event_messages(settings, [user], per_user=3))
        wait_caught_up(settings.kafka, settings.app_id, ends, timeout=180, proc=proc)
        history = f"{base}/users/{user}/history"

        status, body = get(history, bearer())
        assert status == 200
        assert [e["event_id"] for e in json.loads(body)["events"]] == [f"{user}-{n}" for n in range(3)]
        for header in (None, "Bearer wrong", f"Basic {TOKEN.get_secret_value()}", bearer(SecretStr("x"))):
            status, body = get(history, header)
            assert status == 401, header
            assert user.encode() not in body and b"item-" not in body
        assert get(f"{base}/users/nobody/history", bearer())[0] == 404
        assert get(f"{base}/users/nobody/history")[0] == 401, "a refused request learns nothing"

        for path in CLOSED_PATHS:
            status, body = get(base + path.format(user=user), bearer())
            assert status == 404, f"{path} answered {status}"
            assert b"item-" not in body and user.encode() not in body
        assert json.loads(get(f"{base}/")[1]) == {"status": "OK"}, "/ is faust's plain index, not statistics"

        assert get(f"{base}/healthz")[0] == 200
        status, body = get(f"{base}/metrics")
        assert status == 200 and b"streamrec_" in body

        listening = listening_addresses(settings.web_port)
        others = non_loopback_addresses()
        assert listening is not None or others, "no way to check the bound address on this machine"
        if listening is not None:
            assert listening == {"127.0.0.1"}
        for address in others:
            with pytest.raises(OSError):
                socket.create_connection((address, settings.web_port), timeout=2).close()
    finally:
        stop_process(proc)


@pytest.mark.kafka
@pytest.mark.slow
def test_a_forwarded_request_carries_the_token(make_settings: Any, tmp_path: Path) -> None:
    """Two ingest workers on one machine; the second starts with an empty state directory, so it can
    answer for a user of the first one's partitions only by forwarding the request (headers included)
    to it, and the first one checks the token again."""
    first = make_settings(web_token=TOKEN)
    second = first.model_copy(update={"web_port": free_port(), "data_dir": first.data_dir.with_name("second")})
    create_topics(first.kafka, first.topics)
    users = [f"u{n:02d}" for n in range(24)]
    procs = [start_worker("ingest", first, tmp_path / "first.log")]

    def answers(settings: Settings, authorization: str, timeout: float = 10) -> dict[str, int | None]:
        def one(user: str) -> int | None:
            url = f"http://127.0.0.1:{settings.web_port}/users/{user}/history"
            request = urllib.request.Request(url, headers={"Authorization": authorization})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                return None  # no answer in time

        with ThreadPoolExecutor(max_workers=len(users)) as pool:
            return dict(zip(users, pool.map(one, users), strict=True))

    try:
        ends = send_raw(first, event_messages(first, users, per_user=2))
        wait_caught_up(first.kafka, first.app_id, ends, timeout=180, proc=procs[0])
        procs.append(start_worker("ingest", second, tmp_path / "second.log"))
        deadline = time.monotonic() + 180
        while set(answers(second, bearer()).values()) != {200}:
            assert time.monotonic() < deadline, f"the second worker answers {answers(second, bearer())}"
            assert all(p.poll() is None for p in procs), "a worker exited"
            time.sleep(1)
        assert set(answers(first, bearer()).values()) == {200}

        # With the first worker frozen (still in the group: well within the session timeout), the second
        # refuses a wrong token for every user at once (nothing is forwarded), and answers its own users
        # but none of the others: those were forwarded.
        procs[0].send_signal(signal.SIGSTOP)
        try:
            refused = answers(second, "Bearer wrong", timeout=3)
            frozen = answers(second, bearer(), timeout=3)
        finally:
            procs[0].send_signal(signal.SIGCONT)
        assert set(refused.values()) == {401}, refused
        assert 200 in frozen.values() and None in frozen.values(), frozen
    finally:
        for proc in procs:
            stop_process(proc)
