"""Task records and the webhook/upload outbox in PostgreSQL, shared by several front-ends (`--database`).

psycopg 3 with a psycopg_pool connection pool (the `postgres` extra: `pip install 'k5serve[postgres]'`);
imported only when `--database` is given. The schema is created and upgraded here (`MIGRATIONS`, one
`k5serve_schema` row with the version), under an advisory lock, so front-ends starting together never race.

What several front-ends need that one does not:
- `create` is an INSERT ... ON CONFLICT DO NOTHING: of two front-ends given the same taskUUID at the same
  moment, one inserts (and runs it), the other gets `conflictTaskUUID`.
- Each record carries its front-end (`owner`), and each front-end renews a heartbeat of its own
  (`k5serve_frontends`); `expire_stale` (every front-end's sweep) fails the tasks of a front-end that stopped
  renewing (it died), once, for every front-end to read, with their error webhooks. A database outage does
  not count against anyone (see `expire_stale`). A restarting front-end never touches other front-ends' tasks.
- Outbox rows are claimed with `FOR UPDATE SKIP LOCKED` plus a lease (`claimed_by`, `claimed_until`): one
  front-end delivers each; a claim left by a front-end that died is taken over when its lease runs out.
Leases and heartbeats use the database's clock, so front-ends' clocks need not agree; record expiry (TTL) is
the wall-clock time each front-end writes, as with SQLite.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from ..protocol.errors import SchemaError, StoreUnavailable
from .outbox import OutboxEntry, OutboxStore, origin_of
from .session_buffers import SessionBuffer
from .task_records import (
    COLUMNS,
    ERROR,
    JSON_COLUMNS,
    QUEUED,
    RUNNING,
    USAGE_DAYS,
    USAGE_SUMS,
    TaskRecord,
    TaskStore,
    Usage,
    check_fields,
    usage_totals,
    webhook_error,
)

log = logging.getLogger("k5serve.postgres")
T = TypeVar("T")

_NOW = "extract(epoch from clock_timestamp())"
_LOCK = 0x6B357365  # pg_advisory_xact_lock key for schema changes ("k5se")

MIGRATIONS: list[str] = [
    # 1: task records and the outbox
    """
    CREATE TABLE k5serve_tasks (
        task_uuid TEXT PRIMARY KEY,
        task_type TEXT NOT NULL,
        status TEXT NOT NULL,
        step INTEGER NOT NULL,
        total_steps INTEGER NOT NULL,
        expected_items INTEGER NOT NULL,
        items JSONB NOT NULL,
        errors JSONB NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        owner TEXT,                          -- the front-end running it (while queued or running)
        heartbeat_at DOUBLE PRECISION        -- database time of the owner's last heartbeat
    );
    CREATE INDEX k5serve_tasks_expiry ON k5serve_tasks (expires_at);
    CREATE INDEX k5serve_tasks_live ON k5serve_tasks (owner, heartbeat_at) WHERE status IN ('queued', 'running');
    CREATE TABLE k5serve_outbox (
        id BIGSERIAL PRIMARY KEY,
        kind TEXT NOT NULL,
        url TEXT NOT NULL,
        origin TEXT NOT NULL,                -- scheme://host:port of url: deliveries are capped per origin
        body BYTEA NOT NULL,
        content_type TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at DOUBLE PRECISION NOT NULL,
        task_uuid TEXT,
        claimed_by TEXT,
        claimed_until DOUBLE PRECISION       -- database time the claim lapses
    );
    CREATE INDEX k5serve_outbox_due ON k5serve_outbox (next_at);
    """,
    # 2: WebSocket sessions and the frames that wait for a client to come back (on any front-end)
    """
    CREATE TABLE k5serve_ws_sessions (
        session_uuid TEXT PRIMARY KEY,
        last_seen DOUBLE PRECISION NOT NULL  -- database time; renewed each second while a client is connected
    );
    CREATE TABLE k5serve_ws_frames (
        id BIGSERIAL PRIMARY KEY,
        session_uuid TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,   -- database time
        frame TEXT NOT NULL
    );
    CREATE INDEX k5serve_ws_frames_session ON k5serve_ws_frames (session_uuid);
    CREATE INDEX k5serve_ws_sessions_seen ON k5serve_ws_sessions (last_seen);
    """,
    # 3: front-ends' liveness apart from their tasks; each task's webhook for its error webhook if another
    # front-end fails it; each WebSocket session's key and the front-end whose socket holds it
    """
    CREATE TABLE k5serve_frontends (
        instance TEXT PRIMARY KEY,
        heartbeat_at DOUBLE PRECISION NOT NULL  -- database time of its last heartbeat
    );
    ALTER TABLE k5serve_tasks ADD COLUMN webhook_url TEXT;
    ALTER TABLE k5serve_ws_sessions ADD COLUMN owner TEXT;   -- a digest of the key that opened it
    ALTER TABLE k5serve_ws_sessions ADD COLUMN holder TEXT;  -- the front-end and socket attached to it
    """,
    # 4: who sent each task (the caller's name; `owner` is the front-end running it, since version 1). From this
    # version on, k5serve_ws_sessions.owner holds the caller's name too (`k5serve.context.Caller.name`)
    """
    ALTER TABLE k5serve_tasks ADD COLUMN caller TEXT;
    """,
    # 5: the usage ledger: one row per finished imageInference, kept longer than the records (USAGE_DAYS)
    """
    CREATE TABLE k5serve_usage (
        task_uuid TEXT PRIMARY KEY,
        caller TEXT,
        finished_at DOUBLE PRECISION NOT NULL,
        failed BOOLEAN NOT NULL,
        images INTEGER NOT NULL,
        seconds DOUBLE PRECISION NOT NULL,
        cost DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX k5serve_usage_time ON k5serve_usage (finished_at);
    """,
]


class Database:
    """The connection pool, the schema, and the database's state for /ready and /metrics.

    A failure to reach the server opens a circuit: until a probe (at most one a second, on a connection of its
    own) reaches the server again, calls fail at once with StoreUnavailable instead of each waiting for the
    pool's time-out, so that during an outage new tasks are refused quickly and no thread pool fills up with
    calls waiting for a connection. `up_since` says how long the database has been reachable without a break,
    which is what `PostgresTaskStore.expire_stale` needs before it may judge other front-ends gone."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 16, timeout: float = 3.0):
        # max_size: as many as the threads that make database calls (executors.SIZES["database"])
        self.errors = 0  # database errors seen (failed queries, unreachable server)
        self.probe_error: str | None = None  # why the server cannot be reached now (the circuit is open); None: it can
        self.up_since: float | None = time.monotonic()  # reachable without a break since then; None: not now
        self._probed_at = 0.0
        self._probe_lock = threading.Lock()
        self._url = url
        self._pool_args = {"min_size": min_size, "max_size": max_size, "timeout": timeout}
        self.pool = self._new_pool()
        try:
            self.pool.open(wait=True, timeout=timeout)
            self.version = self._migrate()
        except (PoolTimeout, psycopg.Error) as exc:
            self.pool.close()
            raise StoreUnavailable(f"the task database is unreachable ({_describe(exc)})") from None
        except SchemaError:
            self.pool.close()
            raise

    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(self._url, **self._pool_args, open=False, name="k5serve",
                              kwargs={"autocommit": True, "connect_timeout": max(1, int(self._pool_args["timeout"]))},
                              check=ConnectionPool.check_connection, reconnect_timeout=86400)

    def _renew_pool(self) -> None:
        """After an outage: a new pool that connects now. The old one's reconnection attempts back off without
        bound (1, 2, 4 ... s), so after a long outage it could take as long again to find the server back."""
        old, self.pool = self.pool, self._new_pool()
        self.pool.open(wait=False)
        threading.Thread(target=old.close, kwargs={"timeout": 1.0}, name="k5serve-pool-close", daemon=True).start()

    def _migrate(self) -> int:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS k5serve_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM k5serve_schema").fetchone()
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise SchemaError(f"the database's k5serve schema is version {version}, newer than this "
                                   f"k5serve knows ({len(MIGRATIONS)}); upgrade k5serve")
            for number in range(version + 1, len(MIGRATIONS) + 1):
                conn.execute(MIGRATIONS[number - 1])
                log.info("database schema upgraded to version %d", number)
            if row is None:
                conn.execute("INSERT INTO k5serve_schema (version) VALUES (%s)", (len(MIGRATIONS),))
            else:
                conn.execute("UPDATE k5serve_schema SET version = %s", (len(MIGRATIONS),))
        return len(MIGRATIONS)

    def run(self, sql: str, params: Any = (), *, fetch: str | None = None) -> Any:
        """One statement on a pooled connection -> its rows ("all"), first row ("one") or row count.
        Any database failure becomes StoreUnavailable (counted), so the caller fails its task clearly."""

        def one(conn: psycopg.Connection) -> Any:
            cur = conn.execute(sql, params)
            return cur.fetchall() if fetch == "all" else cur.fetchone() if fetch == "one" else cur.rowcount

        return self.transaction(one)

    def transaction(self, work: Callable[[psycopg.Connection], T]) -> T:
        """`work(connection)` in one transaction (all of it or nothing), with `run`'s errors."""
        if self.probe_error is not None:
            self.probe()  # (at most once a second) still away: fail now, without waiting for the pool
            if self.probe_error is not None:
                raise StoreUnavailable(self.probe_error)
        pool = self.pool
        try:
            with pool.connection() as conn, conn.transaction():
                return work(conn)
        except (psycopg.errors.TransactionRollback, psycopg.errors.QueryCanceled) as exc:
            self.errors += 1  # (OperationalErrors that say nothing about reaching the server)
            raise StoreUnavailable(f"the task database could not complete a statement ({_describe(exc)})") from None
        except PoolTimeout as exc:  # every connection busy, or none to be had: a probe tells which
            self.probe(max_age=0)
            if self.probe_error is None:
                self.errors += 1
                raise StoreUnavailable(f"the task database is busy ({_describe(exc)})") from None
            raise StoreUnavailable(self.probe_error) from None
        except (psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
            if pool is self.pool:  # (a call on a pool replaced since says nothing about now)
                self._unreachable(exc)
            raise StoreUnavailable(f"the task database is unreachable ({_describe(exc)})") from None
        except psycopg.Error as exc:
            self.errors += 1
            raise StoreUnavailable(f"the task database refused a statement ({_describe(exc)})") from None

    def _unreachable(self, exc: BaseException) -> None:
        self.errors += 1
        self.probe_error = f"the task database is unreachable ({_describe(exc)})"
        self.up_since = None

    def probe(self, max_age: float = 1.0) -> None:
        """Whether the server answers, on a connection of its own (the pool may be busy reconnecting), at most
        once per `max_age` seconds (other callers meanwhile keep the last answer): `probe_error` is None when it
        answered, and the circuit closes."""
        now = time.monotonic()
        if now - self._probed_at < max_age or not self._probe_lock.acquire(blocking=False):
            return
        try:
            self._probed_at = now
            with psycopg.connect(self._url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, OSError) as exc:
            self._unreachable(exc)
        else:
            if self.probe_error is not None:
                log.info("the task database is reachable again")
                self._renew_pool()
            self.probe_error = None
            if self.up_since is None:
                self.up_since = time.monotonic()
        finally:
            self._probe_lock.release()

    def check(self) -> str | None:
        """Probe now: None when the database answers, else why not."""
        self.probe(max_age=0)
        return self.probe_error

    def stats(self) -> dict[str, int]:
        s = self.pool.get_stats()
        return {"size": s.get("pool_size", 0), "available": s.get("pool_available", 0),
                "waiting": s.get("requests_waiting", 0), "errors": self.errors}

    def close(self) -> None:
        self.pool.close()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class PostgresTaskStore(TaskStore):
    def __init__(self, db: Database, owner: str, lease: float = 30.0):
        self.db = db
        self.owner = owner  # this front-end's id
        self.lease = lease  # seconds without a heartbeat after which another front-end fails its tasks

    def create(self, record: TaskRecord) -> bool:
        values = [Jsonb(getattr(record, c)) if c in JSON_COLUMNS else getattr(record, c) for c in COLUMNS]
        return self.db.run(
            f"INSERT INTO k5serve_tasks ({', '.join(COLUMNS)}, owner, heartbeat_at) "
            f"VALUES ({', '.join(['%s'] * len(COLUMNS))}, %s, {_NOW}) ON CONFLICT (task_uuid) DO NOTHING",
            (*values, self.owner)) == 1

    def get(self, task_uuid: str) -> TaskRecord | None:
        row = self.db.run(f"SELECT {', '.join(COLUMNS)} FROM k5serve_tasks WHERE task_uuid = %s AND "
                          "expires_at > %s", (task_uuid, time.time()), fetch="one")
        return TaskRecord(**dict(zip(COLUMNS, row, strict=True))) if row else None

    def update(self, task_uuid: str, **fields: Any) -> bool:
        check_fields(fields)
        sets = ", ".join(f"{k} = %s" for k in fields)
        values = [Jsonb(v) if k in JSON_COLUMNS else v for k, v in fields.items()]
        return self.db.run(f"UPDATE k5serve_tasks SET {sets} WHERE task_uuid = %s AND status IN (%s, %s)",
                           (*values, task_uuid, QUEUED, RUNNING)) == 1

    def progress(self, task_uuid: str, step: int, total: int) -> None:
        self.db.run("UPDATE k5serve_tasks SET status = %s, step = %s, total_steps = %s WHERE task_uuid = %s "
                    "AND status IN (%s, %s) AND step <= %s", (RUNNING, step, total, task_uuid, QUEUED, RUNNING, step))

    def delete(self, task_uuid: str) -> None:
        self.db.run("DELETE FROM k5serve_tasks WHERE task_uuid = %s", (task_uuid,))

    def recover(self, message: str) -> list[TaskRecord]:
        """Nothing to do at start-up: another front-end's tasks are not ours to fail, and ours from an earlier
        run (a different owner id) are failed by `expire_stale` once that run is judged gone."""
        return []

    def heartbeat(self) -> None:
        """This front-end is alive: its own row, in database time, and (for front-ends of schema version 2 still
        running during an upgrade, which read only that) each of its unfinished tasks."""

        def beat(conn: psycopg.Connection) -> None:
            conn.execute(f"INSERT INTO k5serve_frontends (instance, heartbeat_at) VALUES (%s, {_NOW}) ON CONFLICT "
                         "(instance) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at", (self.owner,))
            conn.execute(f"UPDATE k5serve_tasks SET heartbeat_at = {_NOW} WHERE owner = %s AND status IN (%s, %s)",
                         (self.owner, QUEUED, RUNNING))

        self.db.transaction(beat)

    def expire_stale(self, message: str) -> int:
        """Fail the tasks of front-ends gone for a lease, and queue their error webhooks in the same transaction
        (each once, whichever front-end gets there first).

        Gone means: no heartbeat (its own row, or the task's from its creation) for `lease` seconds of database
        time, counting no earlier than the database's own start (a database restart makes every front-end miss
        heartbeats). And this front-end judges only after it has itself reached the database without a break
        for a lease: after an outage every live front-end gets that long to heartbeat again."""
        up = self.db.up_since
        if up is None or time.monotonic() - up < self.lease:
            return 0

        def fail(conn: psycopg.Connection) -> int:
            rows = conn.execute(
                f"UPDATE k5serve_tasks t SET status = %s, errors = jsonb_build_array(jsonb_build_object("
                f"'code', 'inferenceError', 'message', %s::text, 'status', 'error', 'httpStatus', 500, "
                f"'taskType', t.task_type, 'taskUUID', t.task_uuid)) WHERE t.status IN (%s, %s) AND greatest("
                f"t.heartbeat_at, (SELECT f.heartbeat_at FROM k5serve_frontends f WHERE f.instance = t.owner), "
                f"extract(epoch from pg_postmaster_start_time())) < {_NOW} - %s "
                "RETURNING t.task_uuid, t.webhook_url, t.errors",
                (ERROR, message, QUEUED, RUNNING, self.lease)).fetchall()
            now = time.time()
            for task_uuid, url, errors in rows:
                if url:
                    body = json.dumps(webhook_error(errors[0])).encode()
                    conn.execute(_OUTBOX_ADD, ("webhook", url, origin_of(url), body, "application/json", now, now,
                                               task_uuid))
            return len(rows)

        return self.db.transaction(fail)

    def sweep(self) -> int:
        self.db.run(f"DELETE FROM k5serve_frontends WHERE heartbeat_at < {_NOW} - 86400")  # gone for a day
        self.db.run("DELETE FROM k5serve_usage WHERE finished_at < %s", (time.time() - USAGE_DAYS * 86400,))
        return self.db.run("DELETE FROM k5serve_tasks WHERE expires_at <= %s", (time.time(),))

    def add_usage(self, usage: Usage) -> None:
        self.db.run("INSERT INTO k5serve_usage VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (task_uuid) DO NOTHING",
                    (usage.task_uuid, usage.caller, usage.finished_at, usage.failed, usage.images, usage.seconds,
                     usage.cost))

    def usage(self, since: float, caller: str | None = None) -> dict[str, dict[str, float]]:
        where, params = ("finished_at >= %s", [since]) if caller is None else (
            "finished_at >= %s AND caller = %s", [since, caller])
        return usage_totals(self.db.run(f"SELECT caller, {USAGE_SUMS} FROM k5serve_usage WHERE {where} "
                                        "GROUP BY caller", params, fetch="all"))


_OUTBOX_ADD = ("INSERT INTO k5serve_outbox (kind, url, origin, body, content_type, created, next_at, task_uuid) "
               "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")


class PostgresOutboxStore(OutboxStore):
    """Outbox rows shared by every front-end; `claim` hands each due row to one of them for `lease` seconds
    (longer than one delivery attempt can take)."""

    poll_interval = 2.0  # other front-ends' rows become due without waking this one: look this often

    def __init__(self, db: Database, owner: str, lease: float = 60.0):
        self.db = db
        self.owner = owner
        self.lease = lease

    def add(self, kind: str, url: str, body: bytes, content_type: str, task_uuid: str | None) -> None:
        now = time.time()
        self.db.run(_OUTBOX_ADD,
                    (kind, url, origin_of(url), body, content_type, now, now, task_uuid))

    def claim(self, limit: int, exclude: set[int], busy: set[str], now: float) -> list[OutboxEntry]:
        # Rows this process delivers hold a live claim, so `exclude` needs no clause of its own.
        rows = self.db.run(
            f"UPDATE k5serve_outbox SET claimed_by = %s, claimed_until = {_NOW} + %s WHERE id IN ("
            f"SELECT id FROM k5serve_outbox WHERE next_at <= %s AND (claimed_until IS NULL OR claimed_until < "
            f"{_NOW}) AND NOT (origin = ANY(%s)) ORDER BY next_at LIMIT %s FOR UPDATE SKIP LOCKED) "
            "RETURNING id, kind, url, content_type, created, attempts, task_uuid, next_at",
            (self.owner, self.lease, now, list(busy), limit), fetch="all")
        return [OutboxEntry(*row[:7]) for row in sorted(rows, key=lambda r: r[7])]

    def release(self, ids: list[int]) -> None:
        if ids:
            self.db.run("UPDATE k5serve_outbox SET claimed_until = NULL WHERE id = ANY(%s) AND claimed_by = %s",
                        (ids, self.owner))

    def next_due(self, now: float) -> float | None:
        row = self.db.run("SELECT MIN(next_at) FROM k5serve_outbox WHERE next_at > %s", (now,),
                          fetch="one")
        return row[0] if row else None

    def body(self, id_: int) -> bytes:
        row = self.db.run("SELECT body FROM k5serve_outbox WHERE id = %s", (id_,), fetch="one")
        return bytes(row[0]) if row else b""

    def reschedule(self, id_: int, attempts: int, next_at: float) -> None:
        self.db.run("UPDATE k5serve_outbox SET attempts = %s, next_at = %s, claimed_until = NULL WHERE id = %s",
                    (attempts, next_at, id_))

    def remove(self, id_: int) -> None:
        self.db.run("DELETE FROM k5serve_outbox WHERE id = %s", (id_,))

    def pending(self) -> int:
        return self.db.run("SELECT COUNT(*) FROM k5serve_outbox", fetch="one")[0]


class PostgresSessionBuffer(SessionBuffer):
    """WebSocket sessions known to every front-end, and the result frames that finished while their client
    was away, so that a client reconnecting to any front-end with its connectionSessionUUID gets them."""

    def __init__(self, db: Database, max_frames: int = 256):
        self.db = db
        self.max_frames = max_frames  # per session: older frames go, as from a bounded deque

    def register(self, session_uuid: str, owner: str, holder: str) -> None:
        self.db.run(f"INSERT INTO k5serve_ws_sessions (session_uuid, last_seen, owner, holder) VALUES (%s, {_NOW}, "
                    f"%s, %s) ON CONFLICT (session_uuid) DO UPDATE SET last_seen = {_NOW}, owner = EXCLUDED.owner, "
                    "holder = EXCLUDED.holder", (session_uuid, owner, holder))

    def resume(self, session_uuid: str, owner: str, holder: str, window: float) -> bool:
        return self.db.run(f"UPDATE k5serve_ws_sessions SET holder = %s, last_seen = {_NOW} WHERE session_uuid = %s "
                           f"AND owner = %s AND last_seen > {_NOW} - %s RETURNING 1",
                           (holder, session_uuid, owner, window), fetch="one") is not None

    def holders(self, session_uuids: list[str]) -> dict[str, str | None]:
        rows = self.db.run("SELECT session_uuid, holder FROM k5serve_ws_sessions WHERE session_uuid = ANY(%s)",
                           (session_uuids,), fetch="all")
        return dict(rows)

    def push(self, session_uuid: str, frame: str) -> None:
        # One statement: the DELETE sees the rows from before the INSERT, so it keeps the newest max_frames - 1
        # of those, and the new one.
        self.db.run(
            f"WITH added AS (INSERT INTO k5serve_ws_frames (session_uuid, created, frame) VALUES (%s, {_NOW}, %s)) "
            "DELETE FROM k5serve_ws_frames WHERE session_uuid = %s AND id NOT IN (SELECT id FROM k5serve_ws_frames "
            "WHERE session_uuid = %s ORDER BY id DESC LIMIT %s)",
            (session_uuid, frame, session_uuid, session_uuid, max(0, self.max_frames - 1)))

    def take(self, session_uuids: list[str], window: float) -> dict[str, list[str]]:
        """The waiting frames of these sessions, oldest first, removed from the buffer; the sessions' last_seen
        is renewed in the same round trip (they are connected here)."""
        if not session_uuids:
            return {}
        rows = self.db.run(
            f"WITH seen AS (UPDATE k5serve_ws_sessions SET last_seen = {_NOW} WHERE session_uuid = ANY(%s)) "
            f"DELETE FROM k5serve_ws_frames WHERE session_uuid = ANY(%s) RETURNING id, session_uuid, frame, "
            f"created > {_NOW} - %s", (session_uuids, session_uuids, window), fetch="all")
        frames: dict[str, list[str]] = {}
        for _, session_uuid, frame, fresh in sorted(rows):
            if fresh:
                frames.setdefault(session_uuid, []).append(frame)
        return frames

    def sweep(self, window: float) -> None:
        self.db.run(f"DELETE FROM k5serve_ws_frames WHERE created < {_NOW} - %s", (window,))
        self.db.run(f"DELETE FROM k5serve_ws_sessions WHERE last_seen < {_NOW} - %s", (window,))
