"""The store's tables as SQL, and how records become rows and rows records again.

Rows are encoded by the writer process (see ``_writer``): JSON columns with orjson, events as one
batch row per run and group commit. Several rows go in as one multi-row ``INSERT`` of a few
fixed shapes (``insert_rows``), so a group costs a handful of statements whatever its size.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from itertools import chain
from typing import Any

import orjson

from ._records import CallRecord, EventRecord, RunRecord, WorkflowRecord

Row = tuple[Any, ...]


# Rows per multi-row statement: up to 256 (19 columns: well under SQLite's 32766 parameters).
# A batch of n rows goes in as n // 256 full statements, then one of a multiple of 16 rows and
# one of fewer than 16: at most two steps for a typical group, and 32 statement shapes per table
# to prepare, which the connection's statement cache keeps.
MAX_ROWS_PER_STATEMENT = 256
ROW_STEP = 16


def insert_rows(conn: sqlite3.Connection, sql: str, rows: Sequence[Row]) -> int:
    """Run the one-row ``INSERT … VALUES (?, …)`` ``sql`` for every row, in a few multi-row
    statements (see the module docstring); the number of rows."""
    if not rows:
        return 0
    # SQLite before 3.32 allows only 999 parameters per statement.
    most = min(MAX_ROWS_PER_STATEMENT, max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(rows[0])))
    start = 0
    while start < len(rows):
        left = len(rows) - start
        size = most if left >= most else (left // ROW_STEP * ROW_STEP or left)
        conn.execute(multi_row(sql, size), list(chain.from_iterable(rows[start:start + size])))
        start += size
    return len(rows)


@functools.cache
def multi_row(sql: str, rows: int) -> str:
    start = sql.index("VALUES (") + len("VALUES ")
    end = sql.index(")", start) + 1
    return sql[:start] + ", ".join([sql[start:end]] * rows) + sql[end:]


def dumps(value: Any) -> str:
    # orjson encodes a journal entry several times faster than the json module. It refuses what
    # JSON from a script never holds (integers past 64 bits, non-string keys): those take the
    # slow road.
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def loads(text: str) -> Any:
    return json.loads(text)


def upsert(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> str:
    # ``INSERT OR REPLACE`` would silently delete a *different* row that collides on another
    # unique index (runs' idempotency key); an upsert on the primary key raises instead.
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates}"
    )


RUN_COLUMNS = (
    "id", "owner", "status", "script", "args", "has_args", "options", "workflow", "resume_from",
    "resume_mode", "idempotency_key", "created_at", "started_at", "finished_at", "result", "error",
    "usage", "node",
)  # fmt: skip
CALL_COLUMNS = (
    "run_id", "idx", "key", "occurrence", "status", "prompt", "options", "label", "phase", "output",
    "usage", "cost_usd", "model", "attempts", "queued_at", "started_at", "finished_at", "error",
    "transcript",
)  # fmt: skip
EVENT_COLUMNS = ("run_id", "seq", "ts", "type", "data")  # the legacy table, read only
EVENT_BATCH_COLUMNS = ("run_id", "first_seq", "last_seq", "events")
WORKFLOW_COLUMNS = ("name", "script", "meta", "owner", "source", "updated_at")

SAVE_RUN = upsert("runs", RUN_COLUMNS, ("id",))
SAVE_CALL = upsert("calls", CALL_COLUMNS, ("run_id", "idx"))
INSERT_EVENT_BATCH = f"INSERT INTO event_batches ({', '.join(EVENT_BATCH_COLUMNS)}) VALUES (?, ?, ?, ?)"
SAVE_WORKFLOW = upsert("workflows", WORKFLOW_COLUMNS, ("name",))
DELETE_WORKFLOW = "DELETE FROM workflows WHERE name = ?"

SELECT_RUN = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"
SELECT_CALL = f"SELECT {', '.join(CALL_COLUMNS)} FROM calls"
SELECT_EVENT = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events"
SELECT_EVENT_BATCHES = "SELECT events FROM event_batches WHERE run_id = ? AND last_seq > ? ORDER BY first_seq"
# A page of batches after seq ?2: from the last batch that starts at or before it, so that SQLite
# seeks on the primary key instead of reading every earlier batch to test its last_seq.
SELECT_EVENT_BATCHES_PAGE = (
    "SELECT first_seq, last_seq, events FROM event_batches WHERE run_id = ?1 AND last_seq > ?2 AND first_seq >= coalesce("
    "(SELECT max(first_seq) FROM event_batches WHERE run_id = ?1 AND first_seq <= ?2), ?2) "
    "ORDER BY first_seq LIMIT ?3"
)
SELECT_WORKFLOW = f"SELECT {', '.join(WORKFLOW_COLUMNS)} FROM workflows"


def run_params(r: RunRecord) -> Row:
    return (
        r.id, r.owner, r.status, r.script, dumps(r.args), int(r.has_args), dumps(r.options), r.workflow,
        r.resume_from, r.resume_mode, r.idempotency_key, r.created_at, r.started_at, r.finished_at,
        dumps(r.result), dumps(r.error), dumps(r.usage), r.node,
    )  # fmt: skip


def run_from_row(row: Row) -> RunRecord:
    return RunRecord(
        id=row[0], owner=row[1], status=row[2], script=row[3], args=loads(row[4]), has_args=bool(row[5]),
        options=loads(row[6]), workflow=row[7], resume_from=row[8], resume_mode=row[9],
        idempotency_key=row[10], created_at=row[11], started_at=row[12], finished_at=row[13],
        result=loads(row[14]), error=loads(row[15]), usage=loads(row[16]), node=row[17],
    )  # fmt: skip


def call_fields(c: CallRecord) -> Row:
    """A journal entry as it travels to the writer process: ``CALL_COLUMNS`` order, not yet
    encoded (a tuple pickles several times faster than the record)."""
    return (
        c.run_id, c.index, c.key, c.occurrence, c.status, c.prompt, c.options, c.label, c.phase, c.output,
        c.usage, c.cost_usd, c.model, c.attempts, c.queued_at, c.started_at, c.finished_at, c.error, c.transcript,
    )  # fmt: skip


def call_row(f: Row) -> Row:
    """``call_fields`` with its JSON columns encoded: the row the writer inserts."""
    return (*f[:6], dumps(f[6]), *f[7:9], dumps(f[9]), dumps(f[10]), *f[11:18], dumps(f[18]))


def call_from_row(row: Row) -> CallRecord:
    return CallRecord(
        run_id=row[0], index=row[1], key=row[2], occurrence=row[3], status=row[4], prompt=row[5],
        options=loads(row[6]), label=row[7], phase=row[8], output=loads(row[9]), usage=loads(row[10]),
        cost_usd=row[11], model=row[12], attempts=row[13], queued_at=row[14], started_at=row[15],
        finished_at=row[16], error=row[17], transcript=loads(row[18]),
    )  # fmt: skip


def event_fields(e: EventRecord) -> Row:
    """An event as it travels to the writer process."""
    return (e.run_id, e.seq, e.ts, e.type, e.data)


def event_batch_rows(events: Sequence[Row]) -> list[Row]:
    """One row per run from ``event_fields`` tuples: its events of this group, in order, as one
    JSON array of ``[seq, ts, type, data]``. Raises ValueError if a run's seqs do not increase,
    so that the group is written again event by event and only the event out of order fails
    (the table's trigger refuses a batch that does not start after the run's last stored event)."""
    by_run: dict[str, list[list[Any]]] = {}
    for run_id, seq, ts, type_, data in events:
        batch = by_run.get(run_id)
        if batch is None:
            by_run[run_id] = [[seq, ts, type_, data]]
        elif seq > batch[-1][0]:
            batch.append([seq, ts, type_, data])
        else:
            raise ValueError(f"run {run_id}: event seq {seq} after {batch[-1][0]}")
    return [(run_id, batch[0][0], batch[-1][0], dumps(batch)) for run_id, batch in by_run.items()]


def event_from_row(row: Row) -> EventRecord:
    return EventRecord(run_id=row[0], seq=row[1], ts=row[2], type=row[3], data=loads(row[4]))


def workflow_params(w: WorkflowRecord) -> Row:
    return (w.name, w.script, dumps(w.meta), w.owner, w.source, w.updated_at)


def workflow_from_row(row: Row) -> WorkflowRecord:
    return WorkflowRecord(
        name=row[0], script=row[1], meta=loads(row[2]), owner=row[3], source=row[4], updated_at=row[5]
    )
