"""``dhwatch ledger``: migrate the ledger's schema, and copy a SQLite ledger into PostgreSQL.

The daemon migrates on start (PostgreSQL under an advisory lock, so hosts starting together
take turns); ``migrate`` does it ahead of a rollout. ``copy`` is the one-time move of a
host's SQLite ledger into a shared PostgreSQL one: the history, the job ids (so nothing in
flight is paid twice) and the ledger's identity come along.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from dhwatch.cli import EXIT_FAILURE, EXIT_OK, SubParsers, add_command
from dhwatch.commands import _format as fmt


def cmd_ledger(args: argparse.Namespace) -> int:
    from dhwatch.config import load_settings
    from dhwatch.errors import ConfigError, LedgerLocked
    from dhwatch.store import SqliteStore, StateDirLock
    from dhwatch.store.sqlite import LEDGER_NAME
    from dhwatch.store.views import probe_daemon

    settings = load_settings(args.config)
    if args.action == "migrate" and not settings.ledger_url:
        lock = StateDirLock(settings.state_dir)
        try:
            lock.acquire()
        except LedgerLocked as exc:
            raise LedgerLocked(f"{exc}; the running daemon has migrated the ledger already") from None
        try:
            store = SqliteStore.open(settings.state_dir, create=False)
            print(f"{store.where}: schema version {store.schema_version()}")
            store.close()
        finally:
            lock.release()
        return EXIT_OK
    if not settings.ledger_url:
        raise ConfigError("ledger_url: 'dhwatch ledger copy' copies into a PostgreSQL ledger; set ledger_url "
                          "(or DHWATCH_LEDGER_URL) to the target database")  # fmt: skip
    from dhwatch.store.postgres import PostgresStore

    store_pg = PostgresStore.open(settings.ledger_url, password=settings.ledger_password(), stamp=False)
    try:
        if args.action == "migrate":
            print(f"{store_pg.where}: schema version {store_pg.schema_version()}")
            return EXIT_OK
        source = args.source or settings.state_dir / LEDGER_NAME
        if args.source is None and probe_daemon(settings.state_dir).running:
            print(f"dhwatch: the daemon is running with {settings.state_dir}: stop it first, so the copy is "
                  "complete (its ledger keeps changing)")  # fmt: skip
            return EXIT_FAILURE
        if not source.is_file():
            print(f"dhwatch: no SQLite ledger at {source}")
            return EXIT_FAILURE
        copied = store_pg.copy_from_sqlite(source, force=args.force)
    finally:
        store_pg.close()
    if not copied:
        print(f"{store_pg.where} already holds the ledger {source}: nothing to copy")
    else:
        counts = ", ".join(f"{n:,} {table}" for table, n in copied.items())
        print(f"copied {source} into {store_pg.where}: {counts}")
    return EXIT_OK


def register(sub: SubParsers) -> None:
    parser = add_command(
        sub, "ledger", "migrate the ledger; copy a SQLite ledger into PostgreSQL",
        textwrap.dedent("""
        migrate   bring the ledger's schema up to this dhwatch's version (the daemon also
                  does this when it starts). PostgreSQL (ledger_url): under an advisory
                  lock, safe while hosts run. SQLite: only while the daemon is stopped.
        copy      copy the SQLite ledger (state_dir/ledger.sqlite3, or --from FILE) into
                  the PostgreSQL ledger named by ledger_url, ids and history included, in
                  one transaction. Refuses a target that already holds files, unless it
                  already holds this very ledger (then it does nothing) or --force is
                  given (the target's rows are replaced). Stop the daemon first.

        Exit status: 0 done (or nothing to do); 1 the copy was not made; 2 configuration
        or ledger errors (connection refused, a schema newer than this dhwatch).
        """),
        """
        dhwatch ledger migrate
        DHWATCH_LEDGER_URL=postgresql://dhwatch@db1/dhwatch dhwatch ledger copy
        dhwatch ledger copy --from /var/backups/ledger.sqlite3 --force
        """,
        cmd_ledger,
    )
    fmt.add_config_argument(parser)
    parser.add_argument("action", choices=["migrate", "copy"])
    parser.add_argument("--from", dest="source", type=Path, default=None, metavar="FILE",
                        help="the SQLite ledger to copy (default: the one in state_dir)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="copy over a target that already holds files")
