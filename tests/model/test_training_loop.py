"""The training loop's contract: an epoch budget with early stopping, the time cap as a cap that says
when it bound, a report that records what ran (epochs, best epoch, seed, settings, device), one log
line per epoch off a terminal, and the two pieces a step is built from: the item softmax loss and the
pooled dropout."""

from __future__ import annotations

from pathlib import Path

import pytest
from walks import cycle_log

from streamrec.datasets import leave_one_out
from streamrec.settings import TrainSettings

pytestmark = pytest.mark.model
torch = pytest.importorskip("torch")

from streamrec.instructions import HistoryItem, RecRequest  # noqa: E402
from streamrec.model.recommender import PooledDropout, Recommender, TinyConfig, Trainer, pool_dropout  # noqa: E402
from streamrec.model.training import train  # noqa: E402

TINY = TrainSettings(
    batch_size=32,
    lr=3e-3,
    d_model=32,
    d_ff=64,
    num_layers=1,
    num_heads=4,
    text_vocab=200,
    warmup=0.1,
    cold_start_share=0.0,
    eval_users=40,
)


def test_epoch_budget_report_and_one_line_per_epoch(tmp_path: Path) -> None:
    catalog, events = cycle_log(users=60, items=25, length=8, seed=3)
    lines: list[str] = []
    cfg = TINY.model_copy(update={"epochs": 3, "patience": 5, "seed": 11, "max_minutes": 30.0})
    _, report = train(leave_one_out(events), catalog, tmp_path / "m", cfg, device="cpu", log=lines.append)
    # Off a terminal (pytest captures stderr), no bar: one line per epoch plus the model and summary lines.
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 3, lines
    assert all("val HR@10" in line for line in epoch_lines)
    assert report.epochs == 3 and report.planned_epochs == 3 and 1 <= report.best_epoch <= 3
    assert report.stopped == "all 3 epochs" and not report.capped
    assert report.seed == 11 and report.settings["seed"] == 11 and report.settings["epochs"] == 3
    assert report.device == "cpu" and len(report.history) == 3
    assert "seed 11" in lines[-1] and "time cap" not in lines[-1]


def test_time_cap_stops_training_and_says_so(tmp_path: Path) -> None:
    catalog, events = cycle_log(users=60, items=25, length=8, seed=3)
    lines: list[str] = []
    # A cap far below one epoch: training ends after the first epoch, and the report and log say why.
    cfg = TINY.model_copy(update={"epochs": 50, "patience": 50, "max_minutes": 1e-4})
    _, report = train(leave_one_out(events), catalog, tmp_path / "m", cfg, device="cpu", log=lines.append)
    assert report.capped and report.epochs == 1 and report.planned_epochs == 50
    assert "time cap" in report.stopped
    assert any(line.startswith("stopped by the time cap") for line in lines), lines
    assert "(the time cap bound)" in lines[-1]


def _model() -> Recommender:
    catalog, _ = cycle_log(users=1, items=12, length=1)
    config = TinyConfig(d_model=32, d_ff=64, num_heads=4, text_vocab=200, dropout=0.0)
    return Recommender.build_tiny(catalog, config=config, device="cpu", seed=0)


def test_item_loss_is_a_softmax_over_the_item_tokens() -> None:
    rec = _model()
    requests = [RecRequest((HistoryItem("i1"), HistoryItem("i2"))), RecRequest((HistoryItem("i5"),))]
    inputs = rec.tokenize_inputs([rec.instruction(r) for r in requests])
    labels = rec.target_ids(["i3", "i6"])
    trainer = Trainer(rec, lr=1e-3, weight_decay=0.0, warmup_steps=1, total_steps=10, label_smoothing=0.1)
    # The model's item distribution at the first decoding step, before the step updates the weights.
    logp = torch.from_numpy(rec.item_log_probs(requests))
    trainer.train_mode(False)  # no dropout: the step's loss is a function of the weights alone
    got = trainer.step(inputs, labels)
    cols = [rec.single_token_items.index(i) for i in ("i3", "i6")]
    n = logp.shape[1]
    expected = torch.stack(
        [-(0.9 * logp[r, c] + 0.1 * logp[r].mean()) for r, c in enumerate(cols)]  # smoothing spreads 0.1 evenly
    ).mean()
    assert n == 12
    assert got == pytest.approx(expected.item(), rel=1e-4)


def test_pooled_dropout_drops_at_its_rate_and_keeps_the_expectation() -> None:
    pool = (torch.rand(1 << 16) >= 0.25).float() / 0.75
    drop = PooledDropout(0.25, pool).train()
    x = torch.ones(64, 100)
    a, b = drop(x), drop(x)
    assert 0.2 < float((a == 0).float().mean()) < 0.3
    assert float(a.mean()) == pytest.approx(1.0, abs=0.05)
    assert not torch.equal(a, b)  # another window of the pool each call
    assert torch.equal(drop.eval()(x), x)
    # Larger than the pool: falls back to ordinary dropout rather than repeating masks.
    big = torch.ones(1 << 17)
    assert 0.2 < float((drop.train()(big) == 0).float().mean()) < 0.3

    small = TinyConfig(d_model=16, d_ff=32, num_heads=2, text_vocab=150)
    rec = Recommender.build_tiny(cycle_log(users=1, items=5, length=1)[0], config=small, device="cpu")
    before = {k: v.clone() for k, v in rec.model.state_dict().items()}
    assert pool_dropout(rec.model, size=1 << 12) > 0
    assert not any(type(m) is torch.nn.Dropout for m in rec.model.modules())
    assert before.keys() == rec.model.state_dict().keys()  # nothing saved changes


def test_long_instructions_lose_their_oldest_items_first() -> None:
    rec = _model()
    rec.max_input_tokens = 24
    history = (*(HistoryItem(f"i{n % 12}") for n in range(40)), HistoryItem("i7"))
    ids = rec.tokenize_inputs([rec.instruction(RecRequest(history))])[0]
    text = rec.tokenizer.decode(ids)
    assert len(ids) == 24
    assert text.rstrip().endswith("</s>") and "<item_i7>" in text
    assert "next item" in text.lower()  # the question after the history survives
