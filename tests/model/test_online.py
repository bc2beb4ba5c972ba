"""Online increments with the tiny T5 on the CPU: feedback that follows the pattern the base model
knows is promoted, and the next increment continues it; an adapter trained on shuffled targets is
refused by the gate and leaves the adapter in service alone."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from walks import CATALOG_ITEMS, ITEMS, walk

from streamrec.catalog import Catalog
from streamrec.feedback import FeedbackExample, Mark, fresh_by_arrival, split_fresh_replay, user_sequences
from streamrec.instructions import HistoryItem
from streamrec.model.blend import Blend, ItemKNN, Markov
from streamrec.registry import BLEND, AdapterRegistry, sha256_file
from streamrec.settings import Settings, registry_root

pytestmark = pytest.mark.model
pytest.importorskip("torch")

from streamrec.online import Increment, advance, run_increment, score  # noqa: E402

T0 = datetime(2024, 1, 1, tzinfo=UTC)
CATALOG = Catalog(CATALOG_ITEMS)


@pytest.fixture
def base(walk_model: Path) -> Path:
    """The tiny model trained on the walk pattern (shared, read-only)."""
    return walk_model


def feedback(n: int, start_s: float, seed: int, prefix: str) -> list[FeedbackExample]:
    """`n` examples one second apart from `start_s`: a short walk, then the item that follows it."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        seq = walk(rng.randrange(ITEMS), rng.randint(3, 7))
        out.append(
            FeedbackExample(
                event_id=f"{prefix}{k}",
                user_id=f"user{k % 17}",
                history=tuple(HistoryItem(i, "click") for i in seq[:-1]),
                target=seq[-1],
                target_type="click",
                ts=T0 + timedelta(seconds=start_s + k),
            )
        )
    return out


def walkers(
    users: int, steps: int, start_s: float, seed: int, prefix: str, backwards: bool = False
) -> list[FeedbackExample]:
    """Users walking the pattern (or, `backwards`, against it) one step per second, interleaved: each
    example's target is the next item of its user's walk, so each user's targets are themselves a walk."""
    rng = random.Random(seed)
    seqs = [walk(rng.randrange(ITEMS), steps + 3) for _ in range(users)]
    seqs = [list(reversed(seq)) for seq in seqs] if backwards else seqs
    return [
        FeedbackExample(
            event_id=f"{prefix}{u}-{t}",
            user_id=f"{prefix}user{u}",
            history=tuple(HistoryItem(i, "click") for i in seqs[u][: t + 3]),
            target=seqs[u][t + 3],
            target_type="click",
            ts=T0 + timedelta(seconds=start_s + t * users + u),
        )
        for t in range(steps)
        for u in range(users)
    ]


def make_settings(tmp_path: Path, base: Path, **online: Any) -> Settings:
    small = {"holdout": 40, "gate_min_examples": 30, "batch_size": 16, "epochs": 2, "lr": 1e-3} | online
    return Settings(data_dir=tmp_path, model={"base": str(base), "device": "cpu"}, online=small)


def shuffled_targets(examples: list[FeedbackExample]) -> list[FeedbackExample]:
    targets = [e.target for e in examples]
    random.Random(1).shuffle(targets)
    return [e.model_copy(update={"target": t}) for e, t in zip(examples, targets, strict=True)]


def check_promoted(result: Increment, registry: AdapterRegistry, parent: str | None) -> str:
    assert result.decision.accepted, result.decision.reason
    assert result.manifest is not None and result.parent == parent
    version = result.manifest.version
    assert registry.current_version() == version
    manifest = registry.get(version)
    assert manifest.parent == parent and registry.verify(manifest)
    assert manifest.metrics == result.decision.candidate and manifest.base == "tiny"
    assert json.loads(json.dumps(result.as_dict()))["version"] == version
    return version


def fresh_after(arrived: list[FeedbackExample], mark: Mark) -> Callable[[FeedbackExample], bool]:
    """The trainer's rule, with `arrived` numbered 1.. in list order."""
    return fresh_by_arrival(enumerate(arrived, start=1), mark, None)


def test_increments_on_the_pattern_are_promoted_and_the_next_one_continues_the_first(
    tmp_path: Path, base: Path
) -> None:
    settings = make_settings(tmp_path, base)
    registry = AdapterRegistry(registry_root(settings))
    first = feedback(150, 0, seed=1, prefix="a")

    one = run_increment(settings, CATALOG, first, None, registry)
    v1 = check_promoted(one, registry, parent=None)
    assert (one.fresh, one.replay, one.holdout) == (110, 0, 40)
    assert one.through == first[109].ts  # the newest example trained on; the hold-out comes after
    assert one.decision.candidate["HR@10"] >= 0.8, one.decision.reason
    assert one.losses and all(loss == loss for loss in one.losses)

    # The next increment: the last hold-out plus new feedback are fresh, older examples replayed.
    both = first + feedback(150, 10_000, seed=2, prefix="b")
    mark = advance(Mark(), list(range(1, len(first) + 1)), one)  # arrival numbers 1..150
    assert mark == Mark(arrival=110, through=first[109].ts, fresh_total=110)
    two = run_increment(settings, CATALOG, both, fresh_after(both, mark), registry, seed=1)
    v2 = check_promoted(two, registry, parent=v1)
    assert v2 != v1 and [m.version for m in registry.versions()] == [v1, v2]
    assert (two.fresh, two.replay, two.holdout) == (150, 110, 40)
    holdout = split_fresh_replay(both, None, 0.5, 0, holdout=40).holdout
    served = score(served_model(base, registry, v1), holdout, exclude_seen=False)
    assert two.decision.current == pytest.approx(served), "the gate must compare with the adapter in service"
    assert [h["version"] for h in registry.history()] == [v1, v2]


def served_model(base: Path, registry: AdapterRegistry, version: str) -> Any:
    """The base model with a registered adapter, loaded the way an inference worker loads it."""
    from streamrec.model.recommender import Recommender

    rec = Recommender.load(str(base), "cpu", catalog=CATALOG)
    manifest = registry.get(version)
    own = Blend.load(str(registry.path(version) / BLEND)) if manifest.blend_sha256 is not None else None
    rec.load_adapter(str(registry.path(version)), version=version, blend=own)
    return rec


def test_an_adapter_trained_on_shuffled_targets_is_refused_and_nothing_changes(tmp_path: Path, base: Path) -> None:
    settings = make_settings(tmp_path, base)
    registry = AdapterRegistry(registry_root(settings))
    examples = feedback(120, 0, seed=3, prefix="a")
    v1 = check_promoted(run_increment(settings, CATALOG, examples, None, registry), registry, parent=None)
    before = sorted(p.name for p in registry.root.iterdir())
    history = registry.history()

    examples += feedback(200, 10_000, seed=4, prefix="b")
    hard = make_settings(tmp_path, base, lr=1e-2, epochs=3, max_train_examples=120)
    bad = run_increment(hard, CATALOG, examples, None, registry, seed=5, target_transform=shuffled_targets)

    assert not bad.decision.accepted and bad.manifest is None
    assert "worse than the adapter in service" in bad.decision.reason
    assert bad.parent == v1 and bad.holdout == 40
    assert bad.decision.candidate["HR@10"] < bad.decision.current["HR@10"] - 0.1, bad.decision.reason
    # Nothing registered, nothing promoted, no temporary left behind.
    assert registry.current_version() == v1
    assert [m.version for m in registry.versions()] == [v1]
    assert sorted(p.name for p in registry.root.iterdir()) == before
    assert registry.history() == history


def test_an_increment_refits_the_blend_ships_it_under_the_manifest_and_the_next_one_starts_from_it(
    tmp_path: Path, base: Path
) -> None:
    # The base model with a stale blend, fitted on walks the other way round: the stream has moved on.
    blended = tmp_path / "blended"
    shutil.copytree(base, blended)
    walks = {f"w{u}": [HistoryItem(i) for i in reversed(walk(u, 8))] for u in range(ITEMS)}
    start = Blend(ItemKNN(recent=3, window=2).fit(walks, CATALOG.ids), Markov().fit(walks, CATALOG.ids), 0.3, 0.2)
    start.save(str(blended / BLEND))
    # This test is about what ships, not about the gate (tested above): a loose tolerance.
    settings = make_settings(tmp_path / "data", blended, gate_tolerance=0.1)
    registry = AdapterRegistry(registry_root(settings))
    first = walkers(15, 10, 0, seed=6, prefix="a")

    one = run_increment(settings, CATALOG, first, None, registry)
    v1 = check_promoted(one, registry, parent=None)
    folder = registry.path(v1)
    assert registry.get(v1).blend_sha256 == sha256_file(folder / BLEND)
    # What shipped: the bootstrap's settings and weights, statistics refitted on every example but
    # the held-out ones; the gate scored the adapter and that blend together.
    shipped = Blend.load(str(folder / BLEND))
    held = {e.event_id for e in split_fresh_replay(first, None, 0.5, 0, holdout=40).holdout}
    expected = start.refit(user_sequences(e for e in first if e.event_id not in held), CATALOG.ids)
    assert (shipped.knn.recent, shipped.knn.window, shipped.w_knn, shipped.w_markov) == (3, 2, 0.3, 0.2)
    np.testing.assert_array_equal(shipped.knn.indices, expected.knn.indices)
    np.testing.assert_allclose(shipped.knn.weights, expected.knn.weights)
    assert not np.array_equal(shipped.knn.weights, start.knn.weights)
    holdout = [e for e in first if e.event_id in held]
    assert one.decision.candidate == pytest.approx(score(served_model(blended, registry, v1), holdout, False))

    # The next increment compares with v1 as served, its own blend included.
    both = first + walkers(15, 10, 10_000, seed=7, prefix="b")
    mark = advance(Mark(), list(range(1, len(first) + 1)), one)
    two = run_increment(settings, CATALOG, both, fresh_after(both, mark), registry, seed=1)
    holdout = split_fresh_replay(both, None, 0.5, 0, holdout=40).holdout
    assert two.decision.current == pytest.approx(score(served_model(blended, registry, v1), holdout, False))

    # Switched off, an increment ships no blend and the base model's is served with it.
    off = make_settings(tmp_path / "data", blended, gate_tolerance=0.1, refit_blend=False)
    three = run_increment(off, CATALOG, both, None, registry, seed=2)
    assert three.manifest is not None, three.decision.reason
    assert three.manifest.blend_sha256 is None and not (registry.path(three.manifest.version) / BLEND).exists()
    plain = served_model(blended, registry, three.manifest.version)
    assert plain.blend is plain.base_blend and plain.blend is not None

    # An inference worker swaps the blend with the adapter, and back to the base one on rollback.
    from streamrec.generation import Generator

    worker = Generator(settings)
    worker.set_catalog(CATALOG, (1, 1))
    served = worker.recommender
    assert served is not None and served.blend is served.base_blend
    worker.apply_adapter(registry.announcement(registry.get(v1)))
    assert served.blend is not None and served.blend is not served.base_blend
    np.testing.assert_array_equal(served.blend.knn.indices, shipped.knn.indices)
    worker.apply_adapter(registry.announcement(three.manifest))
    assert served.blend is served.base_blend and served.adapter_version == three.manifest.version


def test_an_increment_chooses_the_blend_weights_again_on_fresh_examples_its_statistics_never_saw(
    tmp_path: Path, base: Path
) -> None:
    # The model learned the walks forwards; users now walk them backwards. It is served as pure T5
    # (weights 0, 0); refitted on the stream, the blend's signals know the new pattern, and the
    # increment lets them in.
    blended = tmp_path / "blended"
    shutil.copytree(base, blended)
    forward = {f"w{u}": [HistoryItem(i) for i in walk(u, 8)] for u in range(ITEMS)}
    start = Blend(ItemKNN(recent=3, window=2).fit(forward, CATALOG.ids), Markov().fit(forward, CATALOG.ids), 0.0, 0.0)
    start.save(str(blended / BLEND))
    settings = make_settings(tmp_path / "data", blended, gate_tolerance=0.5, weights_examples=60)
    registry = AdapterRegistry(registry_root(settings))
    backwards = walkers(15, 11, 0, seed=3, prefix="b", backwards=True)
    one = run_increment(settings, CATALOG, backwards, None, registry)
    v1 = check_promoted(one, registry, parent=None)
    shipped = Blend.load(str(registry.path(v1) / BLEND))
    assert shipped.w_knn + shipped.w_markov > 0, (shipped.w_knn, shipped.w_markov)

    # By hand: the newest 60 trained-on examples, statistics from the other trained-on ones, the
    # model before the increment (the base: a fresh LoRA changes nothing until trained).
    from streamrec.generation import load_recommender
    from streamrec.instructions import RecRequest, excluded
    from streamrec.model.blend import blend_weights

    split = split_fresh_replay(backwards, None, 0.5, 0, holdout=40)
    tune = split.train[-60:]
    rest = [e for e in split.train if e not in tune]
    stats = start.refit(user_sequences(rest), CATALOG.ids)
    model = load_recommender(settings, CATALOG)
    requests = [RecRequest(e.history, excluded(e.history, settings.serve.exclude_seen)) for e in tune]
    w_knn, w_markov, _ = blend_weights(model, stats, requests, [e.target for e in tune])
    assert (shipped.w_knn, shipped.w_markov) == (w_knn, w_markov)
    expected = start.refit(user_sequences(split.train), CATALOG.ids)
    np.testing.assert_allclose(shipped.knn.weights, expected.knn.weights)
