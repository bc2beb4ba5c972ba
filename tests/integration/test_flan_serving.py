"""The inference worker serving a Flan-shaped hub directory (tests/flan_walks.py) with titles, on the
broker: every user gets valid catalog items decoded from Flan's Unigram tokens, and a LoRA adapter
announced on the adapters topic is swapped in while the worker keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from streamtest import send_raw
from test_adapters import announce, recommendations
from test_infer import (
    as_raw,
    catalog,
    check_rules,
    reasons_of,
    run_pipeline,
    send_and_finish,
    user_events,
    wait_for_final,
)

from streamrec.lab.runner import stop_process

pytestmark = [pytest.mark.kafka, pytest.mark.model, pytest.mark.slow]


def flan_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter (non-zero weights) on the Flan-shaped base, saved by peft as a trainer saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False)).save_pretrained(out)
    return out


def test_the_worker_serves_titles_from_a_flan_checkpoint_and_swaps_in_an_adapter(
    make_settings: Any, tmp_path: Path, flan_checkpoint: Path
) -> None:
    from streamrec.registry import AdapterRegistry
    from streamrec.settings import registry_root

    items = catalog(30)  # titles "thing N", some unavailable
    base = str(flan_checkpoint)
    # No scheme: a plain hub directory is served with titles. One torch thread: the workers share the cores.
    model = {"base": base, "device": "cpu", "num_beams": 4, "threads": 1}
    settings, _, ingest, infer = run_pipeline(
        make_settings, tmp_path, model=model, serve={"batch_within_s": 0.05, "cold_start_full_at": 2}
    )
    try:
        send_raw(settings, [(settings.topics.catalog, i.item_id, i.model_dump_json().encode()) for i in items])
        events = send_and_finish(settings, user_events(users=12, per_user=4, items=items, seed=7), items, ingest)
        recs = wait_for_final(settings, {e["user_id"]: e["event_id"] for e in events}, infer)
        check_rules(recs, items, events, k=5, base=base)
        assert "model" in reasons_of(recs)
        assert {r.model.adapter for r in recs} == {None}

        registry = AdapterRegistry(registry_root(settings))
        manifest = registry.register(flan_adapter(flan_checkpoint, tmp_path / "adapter"), base=base)
        announce(settings, registry.announcement(manifest))
        # The worker looks at the newest announcement when a batch comes: traffic until one is served.
        sent = list(events)
        for seed in range(100, 130):
            more = user_events(users=4, per_user=1, items=items, seed=seed)
            sent += more
            send_raw(settings, [as_raw(settings, e) for e in more])
            answered = wait_for_final(settings, {e["user_id"]: e["event_id"] for e in more}, infer)
            triggers = {e["event_id"] for e in more}
            if any(r.model.adapter == manifest.version for r in answered if r.trigger_event_id in triggers):
                break
        else:
            pytest.fail("the announced adapter was never served")
        served = [r for r in recommendations(settings) if r.model.adapter == manifest.version]
        check_rules(served, items, sent, k=5, base=base)
        assert infer.poll() is None
    finally:
        stop_process(infer)
        stop_process(ingest)
