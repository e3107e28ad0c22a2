"""Tokens on disk: dataset readers, the HDF5 shard layout, the cache reader, verification and inspection.

The only package that knows the HDF5 layout; see the "Cache" section of docs/design.md.
"""

from mner.cache.datasets import DatasetError, DataSource, Post, Split, label_names, read_split, resolve_data
from mner.cache.inspect import format_inspection, inspect_cache, show_record
from mner.cache.reader import CacheReader
from mner.cache.shards import (
    SCHEMA_VERSION,
    STATUS_NAMES,
    Record,
    ShardWriter,
    TokenSpec,
    completed_shard,
    compute_fingerprint,
    empty_record,
    read_manifest,
    shard_path,
    write_manifest,
)
from mner.cache.verify import VerifyReport, verify_cache

__all__ = [
    "SCHEMA_VERSION",
    "STATUS_NAMES",
    "CacheReader",
    "DataSource",
    "DatasetError",
    "Post",
    "Record",
    "ShardWriter",
    "Split",
    "TokenSpec",
    "VerifyReport",
    "completed_shard",
    "compute_fingerprint",
    "empty_record",
    "format_inspection",
    "inspect_cache",
    "label_names",
    "read_manifest",
    "read_split",
    "resolve_data",
    "shard_path",
    "show_record",
    "verify_cache",
    "write_manifest",
]
