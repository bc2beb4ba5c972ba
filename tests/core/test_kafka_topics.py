"""Per-run topic names: every topic streamrec uses gets the run's tag, so runs on one broker never
share a topic (the trending topic included)."""

from __future__ import annotations

from streamrec.kafka.topics import tagged_topics, topic_specs
from streamrec.settings import TopicSettings


def test_every_topic_gets_the_tag() -> None:
    base = TopicSettings(partitions=3)
    tagged = tagged_topics(base, "run-1")
    assert set(topic_specs(tagged)) == {f"{name}.run-1" for name in topic_specs(base)}
    assert tagged.trending == "streamrec.trending.run-1"
    assert (tagged.partitions, tagged.replication_factor) == (3, 1)


def test_two_runs_share_no_topic() -> None:
    base = TopicSettings()
    assert not set(topic_specs(tagged_topics(base, "a"))) & set(topic_specs(tagged_topics(base, "b")))
