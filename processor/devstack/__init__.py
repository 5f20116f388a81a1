"""The local stack: a Kafka-protocol broker on loopback, sample events, the demo."""
