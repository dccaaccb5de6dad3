"""The ledger's schema, written once as a list of migrations both databases apply in order.

SQLite counts the migrations applied in ``PRAGMA user_version``; PostgreSQL in its
``schema_migrations`` table. The text is SQLite's; :meth:`Dialect.ddl` gives PostgreSQL's
column types. PostgreSQL has one more step, the columns several hosts need to share a
ledger (a claim's host, lease and fencing token): a SQLite ledger belongs to one host.
"""

from __future__ import annotations

#: schema migrations, applied in order; ``PRAGMA user_version`` = how many have run
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE files (
        id              INTEGER PRIMARY KEY,
        rel_path        TEXT    NOT NULL,
        size            INTEGER NOT NULL,
        mtime_ns        INTEGER NOT NULL,
        inode           INTEGER NOT NULL,
        device          INTEGER NOT NULL,
        sha256          TEXT    NOT NULL,
        state           TEXT    NOT NULL,
        backend         TEXT    NOT NULL,
        job_id          TEXT,
        remote_status   TEXT,
        result_url      TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        fetch_attempts  INTEGER NOT NULL DEFAULT 0,
        polls           INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL    NOT NULL DEFAULT 0,
        submitted_at    REAL,
        billed_seconds  REAL,
        output_path     TEXT,
        failed_path     TEXT,
        error_code      TEXT,
        error_message   TEXT,
        adopted         INTEGER NOT NULL DEFAULT 0,
        created_at      REAL    NOT NULL,
        updated_at      REAL    NOT NULL,
        finished_at     REAL
    );
    CREATE INDEX files_state_due ON files(state, next_attempt_at);
    CREATE INDEX files_path ON files(rel_path);
    CREATE INDEX files_sha ON files(sha256);
    CREATE INDEX files_job ON files(job_id);
    CREATE TABLE events (
        id         INTEGER PRIMARY KEY,
        file_id    INTEGER NOT NULL REFERENCES files(id),
        at         REAL    NOT NULL,
        from_state TEXT,
        to_state   TEXT    NOT NULL,
        detail     TEXT
    );
    CREATE INDEX events_file ON events(file_id);
    CREATE TABLE daemon (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: quality reports, and where the original was archived (the report's "before")
    """
    ALTER TABLE files ADD COLUMN archived_path TEXT;
    ALTER TABLE files ADD COLUMN quality_status TEXT;
    ALTER TABLE files ADD COLUMN quality TEXT;
    CREATE INDEX files_quality ON files(quality_status) WHERE quality_status IS NOT NULL;
    """,
    # 3: billed seconds since a time (the daily budget, `dhwatch status`) without a full scan
    """
    CREATE INDEX files_billed ON files(submitted_at, billed_seconds) WHERE billed_seconds IS NOT NULL AND adopted = 0;
    """,
    # 4: the MetaStudio assessment jobs of a pending quality report (quality = "huawei"), so a
    # restart follows them instead of paying for new ones; side is 'before' (the original)
    # or 'after' (the output); the signed upload URL lets a job created but not yet
    # uploaded be finished
    """
    CREATE TABLE assessments (
        file_id    INTEGER NOT NULL REFERENCES files(id),
        side       TEXT    NOT NULL,
        job_id     TEXT    NOT NULL,
        upload_url TEXT    NOT NULL,
        created_at REAL    NOT NULL,
        PRIMARY KEY (file_id, side)
    );
    """,
    # 5: folder recipes: the recipe a file was taken under, its settings then (JSON), and what
    # identical content must share to reuse one denoising ("" = the backend's defaults)
    """
    ALTER TABLE files ADD COLUMN recipe TEXT;
    ALTER TABLE files ADD COLUMN recipe_settings TEXT;
    ALTER TABLE files ADD COLUMN denoise TEXT NOT NULL DEFAULT '';
    ALTER TABLE files ADD COLUMN finishing TEXT;
    CREATE TABLE notifications (
        id              INTEGER PRIMARY KEY,
        file_id         INTEGER NOT NULL REFERENCES files(id),
        url             TEXT    NOT NULL,
        body            TEXT    NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL    NOT NULL DEFAULT 0,
        created_at      REAL    NOT NULL
    );
    CREATE INDEX notifications_due ON notifications(next_attempt_at);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

#: what several hosts sharing one ledger need (PostgreSQL only): who holds a row, until when,
#: and the claim's generation that every fenced write must still match
HOSTS_MIGRATION = """
    ALTER TABLE files ADD COLUMN host TEXT;
    ALTER TABLE files ADD COLUMN lease_until REAL;
    ALTER TABLE files ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX files_lease ON files(lease_until) WHERE lease_until IS NOT NULL;
"""
#: several daemons on one ledger (PostgreSQL only): who runs (``hosts``: a name, the id of its
#: state_dir, its pid and heartbeat, on the database's clock), a note's claim (one host sends it),
#: and the rule that decides when two hosts' scans record one inbox file at once: one
#: unfinished row per inbox path (the loser's insert does nothing, see ``Store.insert``)
HOSTS_TABLE_MIGRATION = """
    CREATE TABLE hosts (
        name       TEXT PRIMARY KEY,
        state_id   TEXT    NOT NULL,
        pid        INTEGER NOT NULL,
        started_at REAL    NOT NULL,
        last_seen  REAL    NOT NULL
    );
    ALTER TABLE notifications ADD COLUMN host TEXT;
    ALTER TABLE notifications ADD COLUMN lease_until REAL;
    CREATE UNIQUE INDEX files_active_path ON files(rel_path)
        WHERE state NOT IN ('done', 'failed', 'discarded', 'vanished');
    CREATE INDEX files_host ON files(host, state) WHERE host IS NOT NULL;
"""
#: PostgreSQL's steps: SQLite's, then the hosts' columns, then the hosts' table and the one-row-per-path rule
POSTGRES_MIGRATIONS: tuple[str, ...] = (*MIGRATIONS, HOSTS_MIGRATION, HOSTS_TABLE_MIGRATION)
POSTGRES_SCHEMA_VERSION = len(POSTGRES_MIGRATIONS)

#: the tables a ledger holds, parents first (the order ``dhwatch ledger copy`` fills them)
TABLES = ("files", "events", "daemon", "assessments", "notifications")
