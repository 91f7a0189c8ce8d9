"""The broker's durable tables (brokerd/durable.py): a real SQLite file, owner-only,
msgpack records that survive closing and reopening, never pickle."""

import os
import stat

from brokerd.durable import DurableStore


def test_records_survive_reopen_and_files_are_private(tmp_path):
    state = tmp_path / "state"
    store = DurableStore(str(state))
    store.put("actors", b"a1", {"name": "keeper", "restarts": 2, "frames": [b"\x00\x01"]})
    store.put("actors", b"a2", {"name": "other"})
    store.put("nodes", b"n1", {"pid": 7, "total": {"CPU": 20000}})
    store.delete("actors", b"a2")
    store.put("pgroups", b"pg", {"bundles": [{"CPU": 1}]})  # any table name: generic
    store.close()

    again = DurableStore(str(state))
    try:
        assert again.load("actors") == {
            b"a1": {"name": "keeper", "restarts": 2, "frames": [b"\x00\x01"]}}
        assert again.load("nodes") == {b"n1": {"pid": 7, "total": {"CPU": 20000}}}
        assert again.load("pgroups") == {b"pg": {"bundles": [{"CPU": 1}]}}
        assert again.load("jobs") == {}
    finally:
        again.close()
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    for name in os.listdir(state):
        assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600, name


def test_an_unreadable_record_is_skipped_not_fatal(tmp_path):
    store = DurableStore(str(tmp_path / "s"))
    try:
        store.put("actors", b"good", {"x": 1})
        # A pickle in the file (someone else's bytes) is never unpickled: skipped.
        store.db.execute("INSERT INTO records VALUES (?, ?, ?)",
                         ("actors", b"bad", b"\x80\x04\x95garbage"))
        assert store.load("actors") == {b"good": {"x": 1}}
    finally:
        store.close()
