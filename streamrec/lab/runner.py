"""Start workers as child processes and watch their progress: used by the demo, the benchmarks
and the tests, which must be able to kill a worker the way an operating system would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from streamrec.errors import StreamrecError
from streamrec.kafka.broker import die_with_parent
from streamrec.settings import KafkaSettings, Settings, to_env


def spawn_worker(
    role: str, settings: Settings, log: Path | None = None, profile: Path | None = None
) -> subprocess.Popen[bytes]:
    """`streamrec worker ROLE` in a child process configured by `settings`."""
    return spawn_module(["streamrec", "worker", role, "--no-create"], settings, log=log, profile=profile)


def spawn_module(
    args: list[str], settings: Settings, log: Path | None = None, profile: Path | None = None
) -> subprocess.Popen[bytes]:
    """`python -m ARGS` in a child process configured by `settings`; under cProfile when `profile`
    names where to write its statistics (written when the process stops on SIGTERM)."""
    out: IO[bytes] | int = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")} | to_env(settings)
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
    try:
        return subprocess.Popen(
            [sys.executable, *profiler, "-m", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal goes to the parent, which stops children cleanly
            preexec_fn=die_with_parent,
        )
    finally:
        if not isinstance(out, int):
            out.close()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until `url` answers (any HTTP status), failing early if `proc` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StreamrecError(f"worker exited with code {proc.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise StreamrecError(f"{url} did not answer within {timeout:.0f}s")


@contextlib.contextmanager
def local_stack(base: Settings, say: Callable[[str], None] = print) -> Iterator[Settings]:
    """Settings for a pipeline on this machine: the configured broker when
    STREAMREC_KAFKA__BOOTSTRAP_SERVERS is set, else an embedded one (and a fresh temporary data
    directory, since local state from an earlier broker would not match a new one)."""
    from streamrec.kafka.broker import EmbeddedBroker
    from streamrec.kafka.topics import create_topics

    with contextlib.ExitStack() as stack:
        if "STREAMREC_KAFKA__BOOTSTRAP_SERVERS" in os.environ:
            kafka, data_dir = base.kafka, base.data_dir
        else:
            broker = stack.enter_context(EmbeddedBroker())
            say(f"embedded broker on {broker.bootstrap_servers} (memory storage)")
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="streamrec-")))
        settings = base.model_copy(update={"kafka": kafka, "data_dir": data_dir, "rebalance_timeout_s": 3.0})
        created = create_topics(kafka, settings.topics)
        say(f"topics ready ({len(created)} created)")
        yield settings


@contextlib.contextmanager
def running_workers(
    settings: Settings, roles: Iterable[str], say: Callable[[str], None] = print, profile: Path | None = None
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Start one worker per role (each on a free web port), wait until each answers, and stop them
    all on exit, whatever happens. `profile`: a directory for each worker's cProfile statistics."""
    from streamrec.kafka.broker import free_port

    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for role in roles:
            role_settings = settings.model_copy(update={"web_port": free_port()})
            say(f"starting the {role} worker (log: {logs / role}.log)")
            stats = profile / f"{role}.prof" if profile is not None else None
            proc = spawn_worker(role, role_settings, log=logs / f"{role}.log", profile=stats)
            workers[role] = (proc, role_settings.web_port)
        for proc, port in workers.values():
            wait_http(f"http://127.0.0.1:{port}/healthz", timeout=180, proc=proc)
        yield {role: proc for role, (proc, _) in workers.items()}
    finally:
        for proc, _ in workers.values():
            stop_process(proc)
