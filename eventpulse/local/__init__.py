"""The embedded default: a local broker and Redis, sample traffic, and the demo that uses them."""
