"""The Kafka wing: every Kafka client streamrec makes and its configuration, the embedded broker,
topics, compacted-topic readers and consumer-group offsets. Nothing outside it builds a client."""
