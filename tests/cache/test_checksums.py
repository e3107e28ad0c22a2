"""cache/checksums.py: a shard's sha256 remembered per file stat, so a check before use costs a stat."""

import json
import os

import pytest

import mner.cache.checksums
from mner.cache.checksums import MEMO_NAME, ChecksumMemo, file_sha256


@pytest.fixture
def counted(monkeypatch):
    """Counts the full reads (file_sha256 calls) the memo makes."""
    calls = []
    real = mner.cache.checksums.file_sha256

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(mner.cache.checksums, "file_sha256", counting)
    return calls


@pytest.fixture
def settled(monkeypatch):
    """Treat every file as older than the racy window (else a file written in this test is re-read)."""
    monkeypatch.setattr(mner.cache.checksums, "_RACY_NS", -(10**18))


def test_a_remembered_checksum_costs_no_read_until_the_file_changes(tmp_path, counted, settled):
    shard = tmp_path / "shard-00000.h5"
    shard.write_bytes(b"a" * 5000)
    want = file_sha256(shard)
    assert ChecksumMemo(tmp_path).sha256(shard) == want
    assert counted == ["shard-00000.h5"]
    entry = json.loads((tmp_path / MEMO_NAME).read_text())["shard-00000.h5"]
    st = os.stat(shard)
    assert entry == {"sha256": want, "stat": [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]}
    counted.clear()
    for _ in range(3):  # other readers, other processes: the memo file answers
        assert ChecksumMemo(tmp_path).sha256(shard) == want
    assert counted == []
    # Same size, mtime put back: the ctime still moves, so the change is seen.
    before = os.stat(shard)
    shard.write_bytes(b"b" * 5000)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert ChecksumMemo(tmp_path).sha256(shard) == file_sha256(shard) != want
    assert counted == ["shard-00000.h5"]


def test_a_file_changed_within_the_racy_window_is_not_remembered(tmp_path, counted):
    shard = tmp_path / "shard-00000.h5"
    shard.write_bytes(b"fresh")
    memo = ChecksumMemo(tmp_path)
    memo.sha256(shard)
    memo.sha256(shard)
    assert counted == ["shard-00000.h5", "shard-00000.h5"]
    assert not (tmp_path / MEMO_NAME).exists()


def test_a_wrong_or_unreadable_memo_never_gives_a_wrong_answer(tmp_path, counted, settled):
    shard = tmp_path / "shard-00000.h5"
    shard.write_bytes(b"data")
    want = file_sha256(shard)
    memo = ChecksumMemo(tmp_path)
    assert memo.matches(shard, want)
    # An entry that lies (a racing writer, a hand edit): a mismatch is confirmed by a fresh read.
    entries = json.loads((tmp_path / MEMO_NAME).read_text())
    entries["shard-00000.h5"]["sha256"] = "0" * 64
    (tmp_path / MEMO_NAME).write_text(json.dumps(entries))
    assert ChecksumMemo(tmp_path).matches(shard, want)
    assert not ChecksumMemo(tmp_path).matches(shard, "1" * 64)
    (tmp_path / MEMO_NAME).write_text("{half")
    assert ChecksumMemo(tmp_path).sha256(shard) == want


def test_a_read_only_cache_folder_still_checks(tmp_path, counted, settled, monkeypatch):
    shard = tmp_path / "shard-00000.h5"
    shard.write_bytes(b"data")

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(mner.cache.checksums, "write_atomic", refuse)
    memo = ChecksumMemo(tmp_path)
    assert memo.sha256(shard) == memo.sha256(shard) == file_sha256(shard)
    assert counted == ["shard-00000.h5"]  # remembered in this process
    assert not (tmp_path / MEMO_NAME).exists()
