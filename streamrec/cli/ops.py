"""Operations verbs: `topics create` makes streamrec's topics on any Kafka (the compose stack's
one-shot service, or an operator whose workers run with --no-create). Creating is idempotent:
topics that exist are left as they are, whatever their partition count."""

from __future__ import annotations

import typer

from streamrec.cli.apps import app

topics_app = typer.Typer(help="Kafka topics streamrec uses.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")


@topics_app.command("create")
def topics_create(
    partitions: int | None = typer.Option(
        None, min=1, help="Partitions of the event topics (default: STREAMREC_TOPICS__PARTITIONS)."
    ),
    replication_factor: int | None = typer.Option(
        None, min=1, help="Replicas of every topic (default: STREAMREC_TOPICS__REPLICATION_FACTOR)."
    ),
    timeout: float = typer.Option(60.0, min=1, help="Seconds to keep trying to reach the brokers."),
) -> None:
    """Create the topics that do not exist yet; existing ones are kept unchanged."""
    from streamrec.kafka.topics import create_topics, topic_specs
    from streamrec.settings import load_settings

    settings = load_settings()
    overrides = {"partitions": partitions, "replication_factor": replication_factor}
    topics = settings.topics.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    created = create_topics(settings.kafka, topics, timeout=timeout)
    for name in topic_specs(topics):
        typer.echo(f"{name}: {'created' if name in created else 'exists'}")
