"""Event relay: Kafka (Avro) -> per-vendor batches -> vendor HTTP APIs, with dead letters and metrics."""

__version__ = "0.1.0"
