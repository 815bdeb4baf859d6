"""The offline twin's base: every valid record of the configured topics, exactly once, in parquet.

See docs/archive.md for the layout other languages read and the exactly-once design.
"""
