"""The lab: everything that measures or demonstrates and is not the service (offline evaluation and
baselines, the prequential protocol and replay, benchmarks, the demo, the simulator, the worker
runner). The service, model and Kafka wings never import it."""
