"""Offline uses of the archive: point-in-time training sets (and, later, consistency reports)."""
