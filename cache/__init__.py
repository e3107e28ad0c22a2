"""Tokens on disk: dataset readers, what a cache holds (spec), the HDF5 shard layout, the manifest,
the fingerprint, the cache reader, verification, inspection and an extraction's dealings with its
folder (reuse, refuse, clear, background writes).

The only package that knows the HDF5 layout and the only one that imports h5py; see the "Cache"
section of docs/design.md.
"""

from mner.cache.conll import DatasetError, Post, Split, label_names, read_split
from mner.cache.datasets import DataSource, resolve_data
from mner.cache.fingerprint import (
    compute_fingerprint,
    describe_fingerprint_difference,
    fingerprint_diff,
    h5py_version,
)
from mner.cache.inspect import format_inspection, inspect_cache, show_record
from mner.cache.lifecycle import (
    ShardPlan,
    ShardSink,
    check_existing,
    check_folder,
    clear_cache,
    lock_folder,
    plan_shards,
)
from mner.cache.manifest import read_manifest, write_manifest
from mner.cache.reader import CacheReader
from mner.cache.rows import row_problems
from mner.cache.shards import ShardWriter, completed_shard, shard_path
from mner.cache.spec import SCHEMA_VERSION, STATUS_NAMES, Record, TokenSpec, empty_record
from mner.cache.verify import VerifyReport, verify_cache

__all__ = [
    "SCHEMA_VERSION",
    "STATUS_NAMES",
    "CacheReader",
    "DataSource",
    "DatasetError",
    "Post",
    "Record",
    "ShardPlan",
    "ShardSink",
    "ShardWriter",
    "Split",
    "TokenSpec",
    "VerifyReport",
    "check_existing",
    "check_folder",
    "clear_cache",
    "completed_shard",
    "compute_fingerprint",
    "describe_fingerprint_difference",
    "empty_record",
    "fingerprint_diff",
    "format_inspection",
    "h5py_version",
    "inspect_cache",
    "label_names",
    "lock_folder",
    "plan_shards",
    "read_manifest",
    "read_split",
    "resolve_data",
    "row_problems",
    "shard_path",
    "show_record",
    "verify_cache",
    "write_manifest",
]
