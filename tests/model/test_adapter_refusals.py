"""An inference worker (the Generator, with the tiny T5 on the CPU) refuses every adapter it must not
serve, each for its own reason, and serves exactly what it served before: same parameters, same
scores, same version label. Every refused case is otherwise well formed, so only the intended check
can be what refuses it; the same adapter made right is served and changes the scores."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr
from walks import walk

from streamrec.errors import ModelError
from streamrec.events import AdapterAnnouncement, ModelVersion
from streamrec.instructions import HistoryItem, RecRequest
from streamrec.registry import CONFIG, MANIFEST, WEIGHTS, AdapterRegistry
from streamrec.settings import Settings, registry_root
from streamrec.signing import sign

pytestmark = pytest.mark.model
torch = pytest.importorskip("torch")

from test_online import CATALOG, feedback, make_settings  # noqa: E402

from streamrec.generation import Generator, refusal_reason  # noqa: E402
from streamrec.model.recommender import ITEM_TOKENS_FILE  # noqa: E402
from streamrec.online import run_increment  # noqa: E402

KEY = SecretStr("the trainer's and the workers' shared secret")
REQUESTS = [RecRequest(tuple(HistoryItem(i) for i in walk(start, 4))) for start in (0, 7, 13, 22)]


@pytest.fixture(scope="module")
def trained(walk_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real increment's adapter (LoRA on q/v plus the item tokens), as the trainer saved it: read-only."""
    settings = make_settings(tmp_path_factory.mktemp("trainer"), walk_model)
    registry = AdapterRegistry(registry_root(settings))
    result = run_increment(settings, CATALOG, feedback(150, 0, seed=1, prefix="a"), None, registry)
    assert result.manifest is not None, result.decision.reason
    return registry.path(result.manifest.version)


@dataclass
class Served:
    """What a worker serves: parameters (names, order, values, trainable flags), module layout, label
    and scores."""

    state: dict[str, Any]
    trainable: dict[str, bool]
    modules: list[tuple[str, str]]
    version: ModelVersion
    log_probs: np.ndarray[Any, Any]
    lists: list[list[tuple[str, float]]]


def served(worker: Generator) -> Served:
    rec = worker.recommender
    assert rec is not None
    return Served(
        {n: t.detach().clone() for n, t in rec.model.state_dict().items()},
        {n: p.requires_grad for n, p in rec.model.named_parameters()},
        [(n, type(m).__name__) for n, m in rec.model.named_modules()],
        rec.version,
        rec.item_log_probs(REQUESTS),
        [[(s.item_id, s.score) for s in lst] for lst in rec.recommend(REQUESTS, k=10)],
    )


def assert_same(now: Served, before: Served) -> None:
    assert list(now.state) == list(before.state)
    changed = [n for n in now.state if not torch.equal(now.state[n], before.state[n])]
    assert not changed, changed
    assert now.trainable == before.trainable and now.modules == before.modules
    assert now.version == before.version
    assert np.array_equal(now.log_probs, before.log_probs)  # exactly: no tolerance
    assert now.lists == before.lists


class Bench:
    """A registry of this test's own, an inference worker reading it, and the trained adapter's files."""

    def __init__(self, tmp_path: Path, base: Path, trained: Path, key: SecretStr | None = KEY) -> None:
        self.tmp, self.base, self.trained = tmp_path, base, trained
        self.registry = AdapterRegistry(tmp_path / "adapters")
        settings = Settings(
            data_dir=tmp_path / "worker",
            registry_dir=self.registry.root,
            model={"base": str(base), "device": "cpu"},
            adapter_key=key,
        )
        self.worker = Generator(settings)
        self.worker.set_catalog(CATALOG, (len(CATALOG), 0))

    def source(self, name: str) -> Path:
        """A fresh copy of the trained adapter's files, to change before registering."""
        out = self.tmp / "src" / name
        shutil.copytree(self.trained, out, ignore=shutil.ignore_patterns(MANIFEST))
        return out

    def register(self, src: Path) -> AdapterAnnouncement:
        """Registered with correct hashes, announced with a valid signature."""
        return self.registry.announcement(self.registry.register(src), KEY)

    def refused(self, announcement: AdapterAnnouncement) -> str:
        before = served(self.worker)
        with pytest.raises(ModelError) as caught:
            self.worker.apply_adapter(announcement)
        assert_same(served(self.worker), before)
        return refusal_reason(caught.value)

    def serve(self, announcement: AdapterAnnouncement) -> Served:
        before = served(self.worker)
        self.worker.apply_adapter(announcement)
        now = served(self.worker)
        assert now.version.adapter == announcement.version
        assert not np.array_equal(now.log_probs, before.log_probs), "the adapter changed nothing"
        return now


@pytest.fixture
def bench(tmp_path: Path, walk_model: Path, trained: Path) -> Bench:
    return Bench(tmp_path, walk_model, trained)


@pytest.fixture(params=["no adapter yet", "an adapter in service"])
def serving(request: pytest.FixtureRequest, bench: Bench) -> Bench:
    """The bench with nothing in service yet, or with the trained adapter already swapped in."""
    if request.param == "an adapter in service":
        bench.serve(bench.register(bench.source("in-service")))
    return bench


def rewritten_weights(path: Path) -> None:
    """One value changed in a safetensors file, written back as safetensors: it loads as well as before."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    # The encoder's: at the first decoding step the decoder's self-attention sees one position, so
    # its q and v cannot change a score.
    name = next(n for n in sorted(tensors) if "encoder" in n and ".v.lora_B" in n)
    tensors[name][0, 0] += 0.5
    save_file(tensors, str(path), metadata=metadata)
    assert set(load_file(str(path))) == set(tensors)


def test_a_signed_correctly_hashed_adapter_is_served_and_a_second_one_replaces_it(bench: Bench) -> None:
    first = bench.serve(bench.register(bench.source("first")))
    src = bench.source("second")
    rewritten_weights(src / WEIGHTS)
    second = bench.serve(bench.register(src))
    assert second.version.adapter != first.version.adapter
    assert not np.array_equal(second.log_probs, first.log_probs)


def test_weights_changed_after_registration_are_refused_though_they_load(serving: Bench) -> None:
    announcement = serving.register(serving.source("tampered"))
    weights = serving.registry.path(announcement.version) / WEIGHTS
    rewritten_weights(weights)  # a well-formed file: only its sha256 is wrong
    assert serving.refused(announcement) == "hash_mismatch"
    # The very same bytes, registered, are served: the hash was the only thing wrong.
    src = serving.source("tampered-registered")
    shutil.copyfile(weights, src / WEIGHTS)
    serving.serve(serving.register(src))


def test_a_config_edited_after_registration_is_refused(serving: Bench) -> None:
    announcement = serving.register(serving.source("config"))
    config = serving.registry.path(announcement.version) / CONFIG
    edited = json.loads(config.read_text()) | {"lora_alpha": 4000}  # the weights are untouched
    config.write_text(json.dumps(edited))
    assert announcement.sha256 == serving.registry.get(announcement.version).sha256
    assert serving.refused(announcement) == "hash_mismatch"
    # Registered as it is now, the edit is served, and it does change the rankings.
    src = serving.source("config-registered")
    shutil.copyfile(config, src / CONFIG)
    serving.serve(serving.register(src))


def test_a_valid_adapter_outside_the_registry_is_refused(serving: Bench) -> None:
    announcement = serving.register(serving.source("outside"))
    outside = serving.tmp / "elsewhere" / announcement.version
    shutil.copytree(serving.registry.path(announcement.version), outside)
    # Its correct hashes and a valid signature, pointing at the copy.
    elsewhere = sign(announcement.model_copy(update={"uri": str(outside), "signature": None}), KEY)
    assert serving.refused(elsewhere) == "outside_registry"
    # Or through a version directory in the registry that is a link out of it.
    os.symlink(outside, serving.registry.root / "v0900")
    linked = announcement.model_copy(update={"version": "v0900", "uri": str(serving.registry.root / "v0900")})
    assert serving.refused(sign(linked.model_copy(update={"signature": None}), KEY)) == "outside_registry"


def test_forged_and_missing_signatures_are_refused_when_a_key_is_set(serving: Bench) -> None:
    src = serving.source("signed")
    rewritten_weights(src / WEIGHTS)  # not the adapter in service, so serving it shows
    announcement = serving.register(src)
    unsigned = announcement.model_copy(update={"signature": None})
    assert serving.refused(sign(unsigned, SecretStr("someone else's key"))) == "bad_signature"
    assert serving.refused(announcement.model_copy(update={"metrics": {"HR@10": 1.0}})) == "bad_signature"
    assert serving.refused(unsigned) == "unsigned"
    serving.serve(announcement)  # the genuine one


def test_without_a_key_unsigned_announcements_are_served(tmp_path: Path, walk_model: Path, trained: Path) -> None:
    bench = Bench(tmp_path, walk_model, trained, key=None)
    announcement = bench.register(bench.source("unsigned")).model_copy(update={"signature": None})
    bench.serve(announcement)


@pytest.mark.parametrize("targets", ["the same modules", "more modules"])
def test_an_adapter_that_fails_to_load_leaves_the_model_as_it_was(serving: Bench, targets: str) -> None:
    src = serving.source("garbage")
    (src / WEIGHTS).write_bytes(b"\x00" * 64 + b"not a safetensors file")  # registered with its true hashes
    if targets == "more modules":  # peft injects layers into modules the adapter in service leaves alone
        config = json.loads((src / CONFIG).read_text())
        (src / CONFIG).write_text(json.dumps(config | {"target_modules": ["q", "k", "v", "o"]}))
    assert serving.refused(serving.register(src)) == "load"
    # The worker goes on: a good adapter swaps in after the failure and serves exactly what a
    # worker that never saw the failure serves with it.
    src = serving.source("after")
    rewritten_weights(src / WEIGHTS)
    good = serving.register(src)
    after = serving.serve(good)
    fresh = Bench(serving.tmp / "fresh", serving.base, serving.trained)
    clean = fresh.serve(fresh.register(src))
    assert np.array_equal(after.log_probs, clean.log_probs) and after.lists == clean.lists


def test_an_adapter_whose_item_mapping_does_not_extend_the_served_one_is_refused(serving: Bench) -> None:
    mapping = json.loads((serving.trained / ITEM_TOKENS_FILE).read_text())
    first, second = list(mapping)[:2]
    swapped = mapping | {first: mapping[second], second: mapping[first]}
    gap = mapping | {"n-new": max(mapping.values()) + 5}  # not the next id: another vocabulary's
    unknown = {k: v for k, v in mapping.items() if k != first}  # a served item it does not map
    for name, edited in (("swapped", swapped), ("gap", gap), ("unknown", unknown)):
        src = serving.source(name)
        (src / ITEM_TOKENS_FILE).write_text(json.dumps(edited))
        assert serving.refused(serving.register(src)) == "load", name
    # Without a mapping (made before adapters had one), rows of items new to the base are refused:
    # which item each belongs to is unknown.
    src = serving.source("unmapped")
    (src / ITEM_TOKENS_FILE).unlink()
    config = json.loads((src / CONFIG).read_text())
    rows = config["trainable_token_indices"]
    assert isinstance(rows, list)  # the tiny model: its head is its input embedding
    (src / CONFIG).write_text(json.dumps(config | {"trainable_token_indices": [*rows, max(mapping.values()) + 1]}))
    assert serving.refused(serving.register(src)) == "load"
    # A mapping that brings a new item, on weights that do not load: the token it added is taken out.
    rec = serving.worker.recommender
    assert rec is not None
    size = len(rec.tokenizer)
    src = serving.source("brings-one")
    (src / ITEM_TOKENS_FILE).write_text(json.dumps(mapping | {"n-new": size}))
    (src / WEIGHTS).write_bytes(b"\x00" * 64 + b"not a safetensors file")
    assert serving.refused(serving.register(src)) == "load"
    assert len(rec.tokenizer) == size and "n-new" not in rec.item_tokens
    # Rows of the base model's own tokens only: served, mapping or not.
    src = serving.source("legacy")
    (src / ITEM_TOKENS_FILE).unlink()
    rewritten_weights(src / WEIGHTS)
    serving.serve(serving.register(src))
