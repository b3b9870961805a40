"""Digests remembered by path, size, mtime and inode (flows, lineage recording) against fresh ones (audits)."""

from __future__ import annotations

import os

from rain_tasks.io.digest import file_digest, load_memo, tree_digests


def test_remembered_digests_follow_file_changes_and_audits_never_trust_them(tmp_path, monkeypatch):
    monkeypatch.setenv("RAIN_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    big, small = model / "weights.bin", model / "config.json"
    big.write_bytes(os.urandom(2 << 20))
    small.write_text("{}")
    fresh = tree_digests(model)
    assert tree_digests(model, remembered=True) == fresh
    memo = load_memo("digests")
    assert list(memo) == [str(big.resolve())]  # small files are hashed every time
    assert memo[str(big.resolve())][3] == fresh["weights.bin"]

    before = big.stat()
    with open(big, "r+b") as f:  # same size, same inode, new bytes and mtime
        f.write(b"\0" * 16)
    os.utime(big, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # a later mtime even on coarse clocks
    changed = file_digest(big)
    assert changed != fresh["weights.bin"]
    assert tree_digests(model, remembered=True)["weights.bin"] == changed

    recorded = big.stat()  # the identity the memo now holds for `changed`
    with open(big, "r+b") as f:
        f.write(b"\1" * 16)
    os.utime(big, ns=(recorded.st_atime_ns, recorded.st_mtime_ns))  # bytes changed behind an unchanged identity
    assert tree_digests(model, remembered=True)["weights.bin"] == changed  # trusted, as DVC trusts its state
    assert tree_digests(model)["weights.bin"] == file_digest(big) != changed  # what audits compute
