"""The request context: who calls (`Caller`), the request id from a W3C traceparent, and the task records'
`caller` column, added to a SQLite file written by an older version (PostgreSQL's migration is tested in
test_postgres.py; the context reaching records and log lines through a real server in test_ops.py)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time

import pytest
from k5serve.server.store.task_records import SQLiteTaskStore, TaskRecord
from k5serve.server.tenants import Tenants
from k5serve.server.transport.auth import Authenticator

from k5serve.context import ANONYMOUS, Caller, request_id

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize("header, kept", [
    (f"00-{TRACE}-00f067aa0ba902b7-01", True),
    (f" 00-{TRACE}-00f067aa0ba902b7-00 ", True),
    (f"01-{TRACE}-00f067aa0ba902b7-01-future", True),  # a later version may add fields
    (f"00-{TRACE}-00f067aa0ba902b7-01-extra", False),  # version 00 may not
    (f"ff-{TRACE}-00f067aa0ba902b7-01", False),
    (f"00-{'0' * 32}-00f067aa0ba902b7-01", False),
    (f"00-{TRACE}-{'0' * 16}-01", False),
    (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", False),
    ("00-abc-def-01", False),
    ("", False),
    (None, False),
])
def test_the_request_id_is_a_valid_traceparents_trace_id_or_new(header, kept):
    found = request_id(header)
    assert (found == TRACE) is kept
    assert len(found) == 32 and all(c in "0123456789abcdef" for c in found)
    if not kept:
        assert request_id(header) != found  # a new one each time


def test_callers_are_named_from_the_key_never_by_it():
    keys = ("first-key-long-enough", "second-key-long-enough")
    auth = Authenticator(Tenants(keys))
    first = auth.identify(keys[0])
    assert first == Caller("key-" + hashlib.sha256(keys[0].encode()).hexdigest()[:16], operator=True)
    assert keys[0] not in repr(first) and first != auth.identify(keys[1])
    assert auth.identify(keys[0]) == first  # stable
    assert auth.identify("wrong") is None and auth.identify(None) is None and auth.identify("") is None
    assert Authenticator(Tenants(())).identify("anything") is ANONYMOUS and ANONYMOUS.operator


def test_an_older_sqlite_file_gains_the_caller_column(tmp_path):
    path = tmp_path / "tasks.sqlite3"
    now = time.time()
    with sqlite3.connect(path) as db:  # the table as the version before this one wrote it
        db.execute("CREATE TABLE tasks (task_uuid TEXT PRIMARY KEY, task_type TEXT NOT NULL, status TEXT NOT NULL, "
                   "step INTEGER NOT NULL, total_steps INTEGER NOT NULL, expected_items INTEGER NOT NULL, "
                   "items TEXT NOT NULL, errors TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, "
                   "webhook_url TEXT)")
        db.execute("INSERT INTO tasks VALUES ('old', 'imageInference', 'success', 4, 4, 1, ?, '[]', ?, ?, NULL)",
                   (json.dumps([{"imageUUID": "x"}]), now, now + 60))
    store = SQLiteTaskStore(path)
    try:
        old = store.get("old")
        assert old is not None and old.caller is None and old.items == [{"imageUUID": "x"}]
        assert store.create(TaskRecord("new", "imageInference", created_at=now, expires_at=now + 60, caller="key-1"))
        assert store.get("new").caller == "key-1"
        with pytest.raises(ValueError):
            store.update("new", caller="someone-else")  # who sent a task never changes
    finally:
        store.close()
    again = SQLiteTaskStore(path)  # opening it again adds nothing and loses nothing
    try:
        assert again.get("new").caller == "key-1" and again.get("old").caller is None
    finally:
        again.close()
