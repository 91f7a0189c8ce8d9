"""The broker's durable tables: one embedded SQLite file under its state directory.

::

    engine / actor directory --put(table, key, record) / delete(table, key)--> SQLite (WAL)
    broker start --load(table)--> {key: record}   (brokerd/restart.py rebuilds from them)

A *table* is a name ("actors", "nodes", "jobs", "pgroups"); a *record* is a
dict of msgpack-able values (str, int, float, bool, bytes, lists, dicts)
stored under a bytes key. Records are msgpack, never pickle: the broker never
unpickles anything, from the wire or from disk.

Written only when a durable table changes (an actor registered, alive,
restarted or dead; a node joined or left; a job registered or gone; a
placement group created, placed, rescheduled or removed): never per task.
Each write is its own transaction; WAL with ``synchronous=NORMAL`` survives a
crash of the broker process (what kill -9 and systemd restarts are); a power
cut may lose the last writes, never corrupt the file.

The directory is created owner-only (0700) and the file owner-only (0600).
"""

from __future__ import annotations

import logging
import os
import sqlite3

import msgpack

log = logging.getLogger("zray.broker")

FILE_NAME = "broker.sqlite3"


class DurableStore:
    """Tables of msgpack records keyed by bytes, in ``<state_dir>/broker.sqlite3``."""

    def __init__(self, state_dir: str):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        st = os.stat(state_dir)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            os.chmod(state_dir, 0o700)  # ours, made private; someone else's raises here
        self.path = os.path.join(state_dir, FILE_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS records (tbl TEXT NOT NULL, "
                        "key BLOB NOT NULL, value BLOB NOT NULL, PRIMARY KEY (tbl, key))")
        for suffix in ("-wal", "-shm"):  # SQLite makes them with the umask's mode
            try:
                os.chmod(self.path + suffix, 0o600)
            except FileNotFoundError:
                pass
        self.writes = 0

    def put(self, table: str, key: bytes, record: dict) -> None:
        """Insert or replace one record."""
        value = msgpack.packb(record, use_bin_type=True)
        try:
            self.db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                            (table, bytes(key), value))
            self.writes += 1
        except sqlite3.Error:  # a full disk must not take the broker down
            log.exception("durable write to %s failed", table)

    def delete(self, table: str, key: bytes) -> None:
        try:
            self.db.execute("DELETE FROM records WHERE tbl = ? AND key = ?", (table, bytes(key)))
            self.writes += 1
        except sqlite3.Error:
            log.exception("durable delete from %s failed", table)

    def load(self, table: str) -> dict:
        """Every record of ``table``: {key: record}. A record that does not decode is
        skipped and logged."""
        out = {}
        for key, value in self.db.execute(
                "SELECT key, value FROM records WHERE tbl = ?", (table,)):
            try:
                rec = msgpack.unpackb(value, raw=False, strict_map_key=False)
            except Exception:
                log.warning("skipping an unreadable %s record %r", table, key[:16])
                continue
            if isinstance(rec, dict):
                out[bytes(key)] = rec
        return out

    def clear(self, table: str) -> None:
        self.db.execute("DELETE FROM records WHERE tbl = ?", (table,))

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass
