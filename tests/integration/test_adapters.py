"""Adapter hot-swap in the inference worker: a tampered or corrupt adapter is refused and the
worker keeps serving; a valid one is swapped in between batches while traffic flows, and no
recommendation is lost."""

from __future__ import annotations

import hashlib
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from streamtest import send_raw
from test_infer import as_raw, catalog, run_pipeline, send_and_finish, user_events, wait_for_final

from streamrec.catalog import Catalog
from streamrec.events import ADAPTER_KEY, AdapterAnnouncement, Recommendation
from streamrec.generation import ADAPTER_WEIGHTS
from streamrec.runner import stop_process
from streamrec.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.model, pytest.mark.slow]


def make_adapter(items: Any, out: Path) -> Path:
    """A LoRA adapter for the same tiny model the worker builds, with non-zero weights."""
    from peft import LoraConfig, get_peft_model

    from streamrec.model import Recommender

    rec = Recommender.build_tiny(Catalog(items), device="cpu")
    peft_model = get_peft_model(rec.model, LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    assert (out / ADAPTER_WEIGHTS).is_file()
    return out


def announce(settings: Settings, version: str, folder: Path, sha256: str) -> None:
    msg = AdapterAnnouncement(version=version, uri=str(folder), sha256=sha256, metrics={"HR@10": 0.1})
    send_raw(settings, [(settings.topics.adapters, ADAPTER_KEY.decode(), msg.model_dump_json().encode())])


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def recommendations(settings: Settings) -> list[Recommendation]:
    from streamrec.broker import read_topic

    return [
        Recommendation.model_validate_json(r.value) for r in read_topic(settings.kafka, settings.topics.recommendations)
    ]


def test_bad_adapters_are_refused_and_a_good_one_swaps_in_under_load(make_settings: Any, tmp_path: Path) -> None:
    items = catalog(40)
    good = make_adapter(items, tmp_path / "v0001")
    sha = hashlib.sha256((good / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    tampered = tmp_path / "v0002"
    shutil.copytree(good, tampered)
    with (tampered / ADAPTER_WEIGHTS).open("r+b") as f:  # one flipped byte in the weights
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    corrupt = tmp_path / "v0003"
    shutil.copytree(good, corrupt)
    (corrupt / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file")
    corrupt_sha = hashlib.sha256(b"not a safetensors file").hexdigest()

    settings, infer_settings, ingest, infer = run_pipeline(make_settings, tmp_path, serve={"batch_within_s": 0.05})
    port = infer_settings.web_port
    try:
        send_raw(settings, [(settings.topics.catalog, i.item_id, i.model_dump_json().encode()) for i in items])
        events = send_and_finish(settings, user_events(users=10, per_user=6, items=items, seed=3), items, ingest)
        wait_for_final(settings, {e["user_id"]: e["event_id"] for e in events}, infer)

        announce(settings, "v0002", tampered, sha)  # weights do not match the announced hash
        announce(settings, "v0003", corrupt, corrupt_sha)  # hash matches, file is garbage
        more = user_events(users=10, per_user=2, items=items, seed=4)
        events += send_and_finish(settings, more, items, ingest)
        wait_for_final(settings, {e["user_id"]: e["event_id"] for e in events}, infer)
        deadline = time.monotonic() + 60
        while metric(port, "streamrec_adapter_rejected_total") < 1:
            assert time.monotonic() < deadline, "the bad announcements were never considered"
            time.sleep(1)
        assert {r.model.adapter for r in recommendations(settings)} == {None}

        # The good adapter is announced while traffic keeps flowing.
        traffic = user_events(users=10, per_user=20, items=items, seed=5)
        raw = [as_raw(settings, e) for e in traffic]
        announce(settings, "v0001", good, sha)
        send_raw(settings, raw, rate=100)
        final = [dict(e, event_id=f"{e['event_id']}-last") for e in traffic[-10:]]
        send_raw(settings, [as_raw(settings, e) for e in final])
        wait_for_final(settings, {e["user_id"]: e["event_id"] for e in final}, infer)

        recs = recommendations(settings)
        assert {r.model.adapter for r in recs} <= {None, "v0001"}, "a refused adapter was served"
        assert metric(port, "streamrec_adapter_swaps_total") == 1
        assert metric(port, "streamrec_adapter_rejected_total") >= 1
        # Every user's final event got its recommendation, from the new adapter.
        last = {e["user_id"]: e["event_id"] for e in final}
        finals = [r for r in recs if r.trigger_event_id == last.get(r.user_id)]
        assert {r.user_id for r in finals} == set(last)
        assert {r.model.adapter for r in finals} == {"v0001"}
        assert infer.poll() is None
    finally:
        stop_process(infer)
        stop_process(ingest)


def test_promote_and_rollback_announce_on_the_adapters_topic(make_settings: Any, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from streamrec.broker import create_topics, read_topic
    from streamrec.registry import AdapterRegistry
    from streamrec.settings import registry_root, to_env

    settings = make_settings()
    create_topics(settings.kafka, settings.topics)
    registry = AdapterRegistry(registry_root(settings))
    first = make_adapter(catalog(20), tmp_path / "src1")
    v1 = registry.register(first, metrics={"HR@10": 0.2, "NDCG@10": 0.1})
    v2 = registry.register(first, parent=v1.version, metrics={"HR@10": 0.25, "NDCG@10": 0.12})
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")} | to_env(settings)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamrec", "adapters", *args], env=env, text=True, capture_output=True, timeout=120
        )

    assert cli("promote", v1.version).returncode == 0
    assert cli("promote", v2.version).returncode == 0
    listed = cli("list")
    assert v1.version in listed.stdout and v2.version in listed.stdout
    assert cli("rollback").returncode == 0
    announced = [
        AdapterAnnouncement.model_validate_json(r.value) for r in read_topic(settings.kafka, settings.topics.adapters)
    ]
    assert [a.version for a in announced] == [v1.version, v2.version, v1.version]
    assert announced[-1].sha256 == v1.sha256 and registry.current_version() == v1.version

    # A tampered version is refused at promotion: nothing is announced.
    weights = registry.path(v2.version) / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    refused = cli("promote", v2.version)
    assert refused.returncode != 0 and "sha256" in (refused.stdout + refused.stderr).lower()
    assert len(read_topic(settings.kafka, settings.topics.adapters)) == 3
