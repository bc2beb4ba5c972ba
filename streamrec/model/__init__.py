"""The model wing: loading and saving models and tokenizers, the recommender's batch API and
decoding, the served blend, and the training loop. The only place that imports torch,
transformers or peft (imported by the modules that need them, never by this package)."""
