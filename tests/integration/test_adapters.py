"""Adapter hot-swap in the inference worker: a tampered, corrupt, unsigned or misplaced adapter is
refused, each for its own reason, and the worker keeps serving; a valid, signed one is swapped in
between batches while traffic flows, and no recommendation is lost. The CLI signs what it announces."""

from __future__ import annotations

import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from streamtest import send_raw
from test_infer import as_raw, catalog, run_pipeline, send_and_finish, user_events, wait_for_final

from streamrec.catalog import Catalog
from streamrec.events import ADAPTER_KEY, AdapterAnnouncement, Recommendation
from streamrec.generation import ADAPTER_WEIGHTS
from streamrec.lab.runner import stop_process
from streamrec.settings import Settings
from streamrec.signing import check_signature, sign

pytestmark = [pytest.mark.kafka, pytest.mark.model, pytest.mark.slow]

KEY = SecretStr("shared by the trainer, the CLI and every inference worker")


def make_adapter(items: Any, out: Path) -> Path:
    """A LoRA adapter for the same tiny model the worker builds, with non-zero weights."""
    from peft import LoraConfig, get_peft_model

    from streamrec.model.recommender import Recommender

    rec = Recommender.build_tiny(Catalog(items), device="cpu")
    peft_model = get_peft_model(rec.model, LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    assert (out / ADAPTER_WEIGHTS).is_file()
    return out


def announce(settings: Settings, msg: AdapterAnnouncement) -> None:
    send_raw(settings, [(settings.topics.adapters, ADAPTER_KEY.decode(), msg.model_dump_json().encode())])


def rewrite_one_weight(path: Path) -> None:
    """One value changed, saved as safetensors again: a file that loads, with another sha256."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def recommendations(settings: Settings) -> list[Recommendation]:
    from streamrec.kafka.topics import read_topic

    return [
        Recommendation.model_validate_json(r.value) for r in read_topic(settings.kafka, settings.topics.recommendations)
    ]


def test_bad_adapters_are_refused_and_a_good_one_swaps_in_under_load(make_settings: Any, tmp_path: Path) -> None:
    from streamrec.registry import AdapterRegistry
    from streamrec.settings import registry_root

    items = catalog(40)
    settings, infer_settings, ingest, infer = run_pipeline(
        make_settings, tmp_path, serve={"batch_within_s": 0.05}, adapter_key=KEY
    )
    registry = AdapterRegistry(registry_root(settings))
    trained = make_adapter(items, tmp_path / "trained")
    good = registry.announcement(registry.register(trained), KEY)
    tampered = registry.announcement(registry.register(trained), KEY)
    rewrite_one_weight(registry.path(tampered.version) / ADAPTER_WEIGHTS)  # loads, but not the announced hash
    corrupt_src = tmp_path / "corrupt"
    shutil.copytree(trained, corrupt_src)
    (corrupt_src / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file")
    corrupt = registry.announcement(registry.register(corrupt_src), KEY)  # hashes and signature right
    outside = tmp_path / "elsewhere" / good.version
    shutil.copytree(registry.path(good.version), outside)
    bad = {
        "hash_mismatch": tampered,
        "load": corrupt,
        "unsigned": good.model_copy(update={"signature": None}),
        "outside_registry": sign(good.model_copy(update={"uri": str(outside), "signature": None}), KEY),
    }
    port = infer_settings.web_port
    try:
        send_raw(settings, [(settings.topics.catalog, i.item_id, i.model_dump_json().encode()) for i in items])
        events = send_and_finish(settings, user_events(users=10, per_user=6, items=items, seed=3), items, ingest)
        wait_for_final(settings, {e["user_id"]: e["event_id"] for e in events}, infer)

        # One at a time, each until the worker has counted it: the topic is compacted, and a worker
        # only acts on the newest announcement when a batch comes (fresh events make one).
        seeds = iter(range(100, 1000))
        for reason, announcement in bad.items():
            announce(settings, announcement)
            deadline = time.monotonic() + 60
            while metric(port, f'streamrec_adapter_rejected_total{{reason="{reason}"}}') < 1:
                assert time.monotonic() < deadline, f"the {reason} announcement was never refused"
                nudge = user_events(users=3, per_user=1, items=items, seed=next(seeds))
                send_raw(settings, [as_raw(settings, e) for e in nudge])
                time.sleep(1)
        assert metric(port, "streamrec_adapter_rejected_total") == len(bad)
        assert {r.model.adapter for r in recommendations(settings)} == {None}
        refusals = [line for line in (tmp_path / "infer.log").read_text().splitlines() if "refused (" in line]
        assert sorted(line.split("refused (")[1].split(")")[0] for line in refusals) == sorted(bad), refusals

        # The good adapter is announced while traffic keeps flowing.
        traffic = user_events(users=10, per_user=20, items=items, seed=5)
        raw = [as_raw(settings, e) for e in traffic]
        announce(settings, good)
        send_raw(settings, raw, rate=100)
        final = [dict(e, event_id=f"{e['event_id']}-last") for e in traffic[-10:]]
        send_raw(settings, [as_raw(settings, e) for e in final])
        wait_for_final(settings, {e["user_id"]: e["event_id"] for e in final}, infer)

        recs = recommendations(settings)
        assert {r.model.adapter for r in recs} <= {None, good.version}, "a refused adapter was served"
        assert metric(port, "streamrec_adapter_swaps_total") == 1
        assert metric(port, "streamrec_adapter_rejected_total") == len(bad)
        # Every user's final event got its recommendation, from the new adapter.
        last = {e["user_id"]: e["event_id"] for e in final}
        finals = [r for r in recs if r.trigger_event_id == last.get(r.user_id)]
        assert {r.user_id for r in finals} == set(last)
        assert {r.model.adapter for r in finals} == {good.version}
        assert infer.poll() is None
    finally:
        stop_process(infer)
        stop_process(ingest)


def test_promote_and_rollback_announce_on_the_adapters_topic(make_settings: Any, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from streamrec.kafka.topics import create_topics, read_topic
    from streamrec.registry import AdapterRegistry
    from streamrec.settings import registry_root, to_env

    settings = make_settings(adapter_key=KEY)
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
    assert announced[-1].files == v1.files
    for a in announced:  # signed with the key in the environment
        check_signature(a, KEY)

    # A tampered version is refused at promotion: nothing is announced.
    weights = registry.path(v2.version) / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    refused = cli("promote", v2.version)
    assert refused.returncode != 0 and "sha256" in (refused.stdout + refused.stderr).lower()
    assert len(read_topic(settings.kafka, settings.topics.adapters)) == 3

    # A version registered before every file was hashed is listed, refused until re-registered.
    v3 = registry.register(first)
    (registry.path(v3.version) / "manifest.json").write_text(v3.model_dump_json(exclude={"files"}))
    assert v3.version in cli("list").stdout
    refused = cli("promote", v3.version)
    assert refused.returncode != 0 and "reregister" in (refused.stdout + refused.stderr)
    assert cli("reregister", v3.version).returncode == 0
    assert cli("promote", v3.version).returncode == 0
    last = AdapterAnnouncement.model_validate_json(read_topic(settings.kafka, settings.topics.adapters)[-1].value)
    assert last.version == v3.version and last.files == v3.files
    check_signature(last, KEY)
