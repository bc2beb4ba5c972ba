"""Model verbs: `train` bootstraps a model (or a LoRA increment) on a historical log; `eval` trains
or loads one and scores it against the baselines with the offline protocol, writing JSON and a PNG.
torch and transformers are imported inside the commands so `streamrec --help` stays fast."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from streamrec.cli.apps import app, bench_app

FORMAT_HELP = "recbole (.inter, optional sibling .item), csv (user_id,item_id,timestamp[,type]; .jsonl too) or seq"


def _threads() -> int:
    """Use every core this process may run on (2 on CI); torch's default can oversubscribe."""
    import torch

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return n


def _load(data: Path, fmt: str) -> Any:
    """The dataset, or a usage error naming what is wrong with the file or the format."""
    from streamrec.datasets import FORMATS, DatasetError, load

    if fmt not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    try:
        return load(data, fmt)
    except DatasetError as exc:
        raise typer.BadParameter(str(exc)) from None


def _train_settings(**overrides: Any) -> Any:
    from streamrec.settings import load_settings

    base = load_settings().train
    return base.model_copy(update={k: v for k, v in overrides.items() if v is not None})


BASE_HELP = "'tiny' (built here, trained from scratch), a hub id (google/flan-t5-small) or a model directory."
SCHEME_HELP = (
    "Item identifiers: item_token (one token per item), title or semantic (a few code tokens per item; "
    "default: STREAMREC_MODEL__SCHEME, else "
    "item_token for tiny and the base directory's own for a checkpoint, title for a plain hub one)."
)


def _scheme(flag: str | None) -> Any:
    """--scheme, else STREAMREC_MODEL__SCHEME; None leaves it to the base."""
    from streamrec.catalog import SCHEMES
    from streamrec.settings import load_settings

    if flag is not None and flag not in SCHEMES:
        raise typer.BadParameter(f"--scheme must be one of {', '.join(SCHEMES)}, not {flag!r}")
    return flag or load_settings().model.scheme


def _instructions(path: Path | None = None) -> Any:
    """The templates in `path`, else in STREAMREC_MODEL__TEMPLATES; None when neither is set (the
    packaged ones, or a model directory's own copy)."""
    from streamrec.instructions import Instructions
    from streamrec.settings import load_settings

    path = path or load_settings().model.templates
    return Instructions.load(path) if path else None


@app.command()
def train(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="The historical log."),
    fmt: str = typer.Option("recbole", "--format", help=FORMAT_HELP),
    out: Path = typer.Option(..., "--out", help="Directory for the model (or, with --lora, the adapter)."),
    base: str = typer.Option("tiny", "--base", help=BASE_HELP),
    scheme: str | None = typer.Option(None, "--scheme", help=SCHEME_HELP),
    lora: bool = typer.Option(False, "--lora", help="Train a LoRA increment on top of --base (a model directory)."),
    epochs: int | None = typer.Option(None, help="Most passes over the data (default: settings)."),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Training time cap (the epoch budget decides; default: settings)."
    ),
    seed: int | None = typer.Option(None, help="Random seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    templates: Path | None = typer.Option(
        None, help="Instruction templates file (default: STREAMREC_MODEL__TEMPLATES, else packaged)."
    ),
) -> None:
    """Bootstrap a recommender on a historical log: full training (from scratch for 'tiny', a
    fine-tune of a checkpoint otherwise), or a LoRA increment with --lora. Early-stops on validation
    NDCG@10 (each user's second-last item). Computes in STREAMREC_MODEL__DTYPE (fp32 weights)."""
    from streamrec.datasets import leave_one_out
    from streamrec.model.training import train as run_train
    from streamrec.settings import load_settings

    _threads()
    if lora and base == "tiny":
        raise typer.BadParameter("--lora needs --base DIR, a model written by `streamrec train`")
    if lora and scheme is not None:
        raise typer.BadParameter("--scheme does not go with --lora: an adapter keeps its base's item identifiers")
    chosen = None if lora else _scheme(scheme)
    dataset = _load(data, fmt)
    split = leave_one_out(dataset.events)
    cfg = _train_settings(epochs=epochs, max_minutes=max_minutes, seed=seed)
    typer.echo(
        f"{dataset.name}: {len(dataset.events):,} events, {dataset.users:,} users, {len(dataset.catalog):,} items"
    )
    run_train(
        split,
        dataset.catalog,
        out,
        cfg,
        base=base,
        lora=lora,
        instructions=_instructions(templates),
        scheme=chosen,
        device=device,
        dtype=load_settings().model.dtype,
        log=typer.echo,
    )


@app.command("eval")
def evaluate(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="The historical log."),
    fmt: str = typer.Option("recbole", "--format", help=FORMAT_HELP),
    out: Path = typer.Option(..., "--out", help="Report JSON; a PNG chart is written beside it."),
    model: Path | None = typer.Option(None, "--model", help="Evaluate this model directory instead of training."),
    base: str = typer.Option("tiny", "--base", help="What to train and evaluate (without --model): " + BASE_HELP),
    scheme: str | None = typer.Option(None, "--scheme", help=SCHEME_HELP),
    model_out: Path | None = typer.Option(
        None, "--model-out", help="Where the trained model goes (default: beside --out)."
    ),
    blend: bool = typer.Option(True, "--blend/--no-blend", help="Serve T5 blended with item-kNN/Markov signals."),
    epochs: int | None = typer.Option(None, help="Most passes over the data (default: settings)."),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Training time cap (the epoch budget decides; default: settings)."
    ),
    seed: int | None = typer.Option(None, help="Random seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Offline evaluation: leave-one-out in time order, full ranking, history excluded; HR@5/10,
    NDCG@5/10, MRR, coverage@10 for streamrec and the popularity, item-kNN and Markov baselines.
    Trains --base (tiny by default) on the log first, unless --model names a trained directory."""
    from streamrec.datasets import leave_one_out
    from streamrec.lab.offline import compare, plot
    from streamrec.model.recommender import Recommender, dtype_name, resolve_device
    from streamrec.model.training import train as run_train
    from streamrec.ranking import PROTOCOL
    from streamrec.settings import load_settings

    if model is not None and (base != "tiny" or scheme is not None):
        raise typer.BadParameter("--model evaluates a trained directory as it is: leave out --base and --scheme")
    chosen = _scheme(scheme)
    model_cfg = load_settings().model
    threads = _threads()
    dataset = _load(data, fmt)
    split = leave_one_out(dataset.events)
    typer.echo(
        f"{dataset.name}: {len(dataset.events):,} events, {dataset.users:,} users, {len(dataset.catalog):,} items"
    )
    started = time.monotonic()
    if model is None:
        cfg = _train_settings(epochs=epochs, max_minutes=max_minutes, seed=seed)
        target = model_out or out.with_name(out.stem + "-model")
        rec, trained = run_train(
            split,
            dataset.catalog,
            target,
            cfg,
            base=base,
            instructions=_instructions(),
            scheme=chosen,
            device=device,
            dtype=model_cfg.dtype,
            log=typer.echo,
        )
        train_seconds = time.monotonic() - started
        training: dict[str, Any] | None = dataclasses.asdict(trained)
    else:
        rec = Recommender.load(
            str(model), device, instructions=_instructions(), catalog=dataset.catalog, dtype=model_cfg.dtype
        )
        train_seconds = 0.0
        training = None
        target = model
    # The blend fitted here is saved with a model trained here, never into a --model directory.
    models = compare(
        rec,
        split,
        dataset.catalog,
        blend=blend,
        save_blend=target if model is None else None,
        blend_window=model_cfg.blend_window,
        blend_decay=model_cfg.blend_decay,
        log=typer.echo,
    )
    dev = resolve_device(device)
    report = {
        "dataset": dataset.name,
        "protocol": PROTOCOL,
        "users": len(split.test),
        "items": len(dataset.catalog),
        "interactions": len(dataset.events),
        "device": f"cuda ({_cuda_name()})" if dev.type == "cuda" else f"cpu ({threads} threads)",
        "dtype": dtype_name(rec.dtype),  # what the model computed in (a model trained here kept fp32 weights)
        "base": base if model is None else rec.base,
        "scheme": rec.scheme,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.monotonic() - started - train_seconds, 1),
        "model_dir": str(target),
        "training": training,  # epochs run, best epoch, seed, settings, whether the time cap bound
        "models": models,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    chart = plot(report, out.with_suffix(".png"))
    typer.echo(json.dumps(models, indent=2))
    typer.echo(f"wrote {out} and {chart}")


def _cuda_name() -> str:
    import torch

    return str(torch.cuda.get_device_name(0))


@app.command()
def replay(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="The historical log."),
    fmt: str = typer.Option("recbole", "--format", help=FORMAT_HELP),
    out: Path = typer.Option(..., "--out", help="Report JSON; a PNG of both curves is written beside it."),
    model: Path | None = typer.Option(None, "--model", help="A model bootstrapped earlier on the same cut."),
    bootstrap_share: float = typer.Option(0.5, "--bootstrap-share", help="Share of the log (in time) to bootstrap on."),
    windows: int = typer.Option(5, help="Windows the replayed part is scored in (time order)."),
    train_minutes: float = typer.Option(
        10.0, "--train-minutes", help="Bootstrap training time cap (the epoch budget decides)."
    ),
    mode: list[str] = typer.Option(["frozen", "online"], "--mode", help="Runs to make: frozen, online or both."),
    interval_s: float = typer.Option(5.0, "--interval-s", help="Trainer interval (online run)."),
    min_new: int = typer.Option(2500, "--min-new", help="New examples per increment (online run)."),
) -> None:
    """Prequential evaluation through the real stack (embedded broker, real workers): bootstrap on the
    first part of the log, then replay it all as events, once for a frozen model and once with the
    train worker learning online; HR@10 / NDCG@10 of the recommendation in force at each event."""
    from streamrec.lab import replay as replay_mod

    _threads()
    bad = sorted(set(mode) - set(replay_mod.MODES))
    if bad:
        raise typer.BadParameter(f"--mode must be frozen or online, not {bad}")
    dataset = _load(data, fmt)
    result = replay_mod.run(
        dataset,
        out,
        bootstrap_share=bootstrap_share,
        windows=windows,
        train_minutes=train_minutes,
        model=model,
        modes=tuple(m for m in replay_mod.MODES if m in mode),
        online={"interval_s": interval_s, "min_new_examples": min_new},
        log=typer.echo,
    )
    summary = {m: {"second_half": result[m]["second_half"], "all": result[m]["all"]} for m in mode}
    typer.echo(
        json.dumps({**summary, "adapters": result.get("adapters"), "ratio": result.get("online_vs_frozen")}, indent=2)
    )
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


@bench_app.command("levers")
def bench_levers(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="The historical log."),
    fmt: str = typer.Option("recbole", "--format", help=FORMAT_HELP),
    model: Path = typer.Option(..., "--model", exists=True, file_okay=False, help="A model bootstrapped on the cut."),
    out: Path = typer.Option(Path("bench-levers.json"), "--out", help="Where to write the JSON report."),
    bootstrap_share: float = typer.Option(0.5, "--bootstrap-share", help="Share of the log (in time) bootstrapped on."),
    every: int = typer.Option(2000, help="Events between two refits of the blend."),
    tune: int = typer.Option(2000, help="Newest events the blend's weights are chosen on before a refit."),
    retrain_minutes: float = typer.Option(
        0.0, "--retrain-minutes", help="Also fine-tune the T5 at the midpoint for this long (0: skip)."
    ),
) -> None:
    """Second-half HR@10 of the prequential protocol, in process, lever by lever: the frozen blend,
    its statistics refitted online, its weights too, and (optionally) a T5 retrained at the midpoint."""
    from streamrec.lab.bench.levers import run

    _threads()
    run(
        _load(data, fmt),
        model,
        out,
        bootstrap_share=bootstrap_share,
        every=every,
        tune=tune,
        retrain_minutes=retrain_minutes,
        log=typer.echo,
    )
