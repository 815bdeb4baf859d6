"""What eventpulse accepts from Kafka: topics, record schemas, decoding and dead letters.

Nothing here knows about Redis or Slack, so the decoder can be reused by any consumer.
"""
