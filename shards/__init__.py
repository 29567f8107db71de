"""shards: WebDataset shards of a sagepairs dataset: layout, atomic writer, verification, selection reader.

``shards.read_selection(selection)`` reads a Selection by byte ranges (see shards/reader.py); it is imported on
first use, so ``import shards`` stays light for the writer and ``shards verify``.
"""

from shards.layout import MEMBERS, sample_key, shard_name

__all__ = ["MEMBERS", "sample_key", "shard_name", "read_selection"]


def __getattr__(name: str):
    if name == "read_selection":
        # Kept local: shards.reader costs 1.1-1.3 s on top of `import shards` (measured 2026-12-04), which the
        # writer and `shards verify` never need.
        from shards.reader import read_selection

        return read_selection
    raise AttributeError(f"module 'shards' has no attribute {name!r}")
