"""Windowed aggregates: their declaration, the batch combiner, Redis storage and the read client."""
