"""shards: WebDataset shards of a sagepairs dataset: layout, atomic writer, verification, selection reader."""

from shards.layout import MEMBERS, sample_key, shard_name

__all__ = ["MEMBERS", "sample_key", "shard_name"]
