"""Named, ordered schema migrations for the SQLite store.

Each migration runs in its own ``BEGIN IMMEDIATE`` transaction together with the row that records
it in the ``migrations`` table, so a migration is either fully applied and recorded or not at all.
Append new migrations at the end; never edit or reorder one that has shipped.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["MIGRATIONS", "Migration", "apply_migrations"]


@dataclass(frozen=True)
class Migration:
    name: str
    # Executed one by one with ``Connection.execute``: ``executescript`` would commit the
    # surrounding transaction first.
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_initial",
        (
            # JSON columns hold ``json.dumps`` text and are never NULL: ``'null'`` is a value.
            """
            CREATE TABLE runs (
                id              TEXT PRIMARY KEY,
                owner           TEXT NOT NULL,
                status          TEXT NOT NULL,
                script          TEXT NOT NULL,
                args            TEXT NOT NULL,          -- JSON
                has_args        INTEGER NOT NULL,
                options         TEXT NOT NULL,          -- JSON
                workflow        TEXT,
                resume_from     TEXT,
                resume_mode     TEXT,
                idempotency_key TEXT,
                created_at      REAL NOT NULL,
                started_at      REAL,
                finished_at     REAL,
                result          TEXT NOT NULL,          -- JSON
                error           TEXT NOT NULL,          -- JSON
                usage           TEXT NOT NULL,          -- JSON
                node            TEXT
            )
            """,
            """
            CREATE UNIQUE INDEX runs_owner_idempotency_key
                ON runs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL
            """,
            "CREATE INDEX runs_created ON runs (created_at, id)",
            "CREATE INDEX runs_owner_created ON runs (owner, created_at, id)",
            "CREATE INDEX runs_status_created ON runs (status, created_at, id)",
            """
            CREATE TABLE calls (
                run_id      TEXT NOT NULL,
                idx         INTEGER NOT NULL,
                key         TEXT NOT NULL,
                occurrence  INTEGER NOT NULL,
                status      TEXT NOT NULL,
                prompt      TEXT NOT NULL,
                options     TEXT NOT NULL,              -- JSON
                label       TEXT NOT NULL,
                phase       TEXT,
                output      TEXT NOT NULL,              -- JSON
                usage       TEXT NOT NULL,              -- JSON
                cost_usd    REAL NOT NULL,
                model       TEXT,
                attempts    INTEGER NOT NULL,
                queued_at   REAL,
                started_at  REAL,
                finished_at REAL,
                error       TEXT,
                transcript  TEXT NOT NULL,              -- JSON
                PRIMARY KEY (run_id, idx)
            )
            """,
            # Events are small and always read as a range of one run: cluster them by key.
            """
            CREATE TABLE events (
                run_id TEXT NOT NULL,
                seq    INTEGER NOT NULL,
                ts     REAL NOT NULL,
                type   TEXT NOT NULL,
                data   TEXT NOT NULL,                   -- JSON
                PRIMARY KEY (run_id, seq)
            ) WITHOUT ROWID
            """,
            """
            CREATE TABLE workflows (
                name       TEXT PRIMARY KEY,
                script     TEXT NOT NULL,
                meta       TEXT NOT NULL,               -- JSON
                owner      TEXT,
                source     TEXT NOT NULL,
                updated_at REAL NOT NULL
            )
            """,
        ),
    ),
    # Events go in as batches: one row per run per group commit holding that run's events as a
    # JSON array, instead of one row each. A thousand agents' three events each were most of the
    # writer's rows; a batch costs one row and one JSON encoding. The trigger keeps each run's
    # seqs increasing across batches and after its events from before this migration (the
    # writer checks within a batch). The events table keeps those, and is read with the batches.
    Migration(
        "0002_event_batches",
        (
            """
            CREATE TABLE event_batches (
                run_id    TEXT NOT NULL,
                first_seq INTEGER NOT NULL,
                last_seq  INTEGER NOT NULL,
                events    TEXT NOT NULL,                -- JSON: [[seq, ts, type, data], ...]
                PRIMARY KEY (run_id, first_seq)
            )
            """,
            """
            CREATE TRIGGER event_batches_after_the_last BEFORE INSERT ON event_batches
            WHEN NEW.first_seq > NEW.last_seq OR NEW.first_seq <= coalesce(
                (SELECT last_seq FROM event_batches WHERE run_id = NEW.run_id ORDER BY first_seq DESC LIMIT 1),
                (SELECT max(seq) FROM events WHERE run_id = NEW.run_id))
            BEGIN
                SELECT RAISE(ABORT, 'event batch does not follow the run''s stored events');
            END
            """,
        ),
    ),
)


def apply_migrations(conn: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now, in order.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Safe against another process
    migrating the same file at the same time: the applied set is re-read under the write lock.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    known = {m.name for m in migrations}
    recorded = {row[0] for row in conn.execute("SELECT name FROM migrations")}
    unknown = sorted(recorded - known)
    if unknown:
        raise ConfigError(
            f"the database was written by a newer quickflow (unknown migrations: {', '.join(unknown)}); "
            "upgrade quickflow or point it at another data directory"
        )
    applied: list[str] = []
    for migration in migrations:
        if migration.name in recorded:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = conn.execute("SELECT 1 FROM migrations WHERE name = ?", (migration.name,)).fetchone()
            if done is None:
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (migration.name, time.time())
                )
                applied.append(migration.name)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return applied
