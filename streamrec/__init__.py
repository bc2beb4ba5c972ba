"""streamrec: streaming recommendations on Kafka with Flan-T5 and online LoRA tuning."""

__version__ = "0.1.0"
