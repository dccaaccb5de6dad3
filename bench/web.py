"""How fast is the studio page with 10,000 files in the ledger? (target: ``/`` under 300 ms)

Builds a ledger as ``bench/status_100k.py`` does (realistic mix of states, each row with
its history, spread over 90 days), serves :class:`dhwatch.web.app.WebPage` with the real
uvicorn server (:class:`dhwatch.asgi.ThreadedAsgiServer`, in this process), and times
over real HTTP, each several times (median, min, max of wall time, client included):

* ``/`` (the first page of the list: 100 rows, counts, folders, the pause banner),
* ``/`` filtered by state, by folder and by text, and an older page (``before=``),
* ``/api/files`` (100 rows as JSON) and ``/api/files?limit=500``,
* one file's page and its JSON.

Beside wall time it prints the CPU time per request (client and server together: both run
in this process), which a busy shared machine disturbs far less than wall time.

It prints each answer's weight in bytes (no compression: the page is served on the LAN;
the stylesheet and script are fetched once and cached by the browser).

With ``--ledger-url`` the ledger built is copied into that PostgreSQL database (``dhwatch
ledger copy``; its files are replaced) and the page reads it there, as on several hosts. It
also times the live feed's look for changes while a page listens and nothing changed (the
probe each open page costs once a second), beside what the earlier ``MAX(updated_at)``
would cost there (no index: the whole table).

    .venv/bin/python bench/web.py [--files 10000] [--runs 15] [--keep DIR]
        [--ledger-url postgresql://USER@HOST:PORT/DB --password-file FILE]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from harness import write_config
from status_100k import build_ledger

from dhwatch.asgi import ThreadedAsgiServer
from dhwatch.config import load_settings
from dhwatch.web import data
from dhwatch.web.app import WebPage
from dhwatch.web.feed import ChangeFeed, _Cursor

TARGET_SECONDS = 0.3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--keep", type=Path, help="build the ledger here and keep it (default: a temp dir)")
    parser.add_argument("--ledger-url", default="", help="read the ledger from this PostgreSQL database instead")
    parser.add_argument("--password-file", type=Path, help="the PostgreSQL password, for --ledger-url")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="dhwatch-web-bench-"))
    try:
        t0 = time.perf_counter()
        rows, events = build_ledger(root / "state", args.files)
        print(f"ledger: {rows:,} files, {events:,} events, built in {time.perf_counter() - t0:.1f} s")
        config = write_config(root, "http://127.0.0.1:9", "bench-key")
        text = config.read_text()
        if args.ledger_url:
            from dhwatch.store.postgres import PostgresStore

            password = args.password_file.read_text().strip() if args.password_file else None
            t0 = time.perf_counter()
            store = PostgresStore.open(args.ledger_url, password=password)
            try:
                store.copy_from_sqlite(root / "state" / "ledger.sqlite3", force=True)
                store._conn.execute("ANALYZE")
            finally:
                store.close()
            print(f"copied into PostgreSQL in {time.perf_counter() - t0:.1f} s")
            text = f'ledger_url = "{args.ledger_url}"\n' + (
                f'ledger_password_file = "{args.password_file}"\n' if args.password_file else "") + text
        config.write_text(text + '[web]\naddress = "127.0.0.1:0"\n')
        page = WebPage(load_settings(config))
        feed_probe(page, args.runs * 20)
        failed_id = rows - rows // 3
        targets = [
            ("/", "/"),
            ("/?state=failed", "/?state=failed"),
            ("/?folder=project-042", "/?folder=project-042"),
            ("/?q=take-0099", "/?q=take-0099"),
            ("/?before=5000 (an older page)", f"/?before={rows // 2}"),
            ("/api/files", "/api/files"),
            ("/api/files?limit=500", "/api/files?limit=500"),
            ("/files/<id>", f"/files/{failed_id}"),
            ("/api/files/<id>", f"/api/files/{failed_id}"),
            ("/static/style.css", "/static/style.css"),
        ]
        worst_index = 0.0
        with ThreadedAsgiServer(page) as server, httpx.Client(base_url=server.url, timeout=30) as client:
            client.get("/")  # warm up: imports, templates compiled, SQLite page cache
            print(f"{'request':<32} {'median':>9} {'min':>9} {'max':>9} {'cpu':>9} {'bytes':>10}")
            for name, target in targets:
                times: list[float] = []
                size = 0
                cpu0 = time.process_time()
                for _ in range(args.runs):
                    start = time.perf_counter()
                    got = client.get(target)
                    times.append(time.perf_counter() - start)
                    if got.status_code != 200:
                        print(f"{name}: HTTP {got.status_code}")
                        return 1
                    size = len(got.content)
                cpu = (time.process_time() - cpu0) / args.runs
                median = statistics.median(times)
                if target == "/":
                    worst_index = max(times)
                print(f"{name:<32} {median * 1000:7.1f}ms {min(times) * 1000:7.1f}ms {max(times) * 1000:7.1f}ms "
                      f"{cpu * 1000:7.1f}ms {size:>10,}")
        verdict = "under" if worst_index < TARGET_SECONDS else "OVER"
        print(f"\n/ with {rows:,} files: slowest of {args.runs} runs {worst_index * 1000:.1f} ms, {verdict} the "
              f"{TARGET_SECONDS * 1000:.0f} ms target")
        return 0 if worst_index < TARGET_SECONDS else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def feed_probe(page: WebPage, runs: int) -> None:
    """The live feed's look when nothing changed, and a MAX(updated_at) look for comparison (median of ``runs``)."""
    conn = page.reader.connect()
    try:
        cursor = _Cursor(data.last_event(conn))
        for name, look in (("feed look, nothing changed", lambda: ChangeFeed._changes(conn, cursor)),
                           ("MAX(updated_at) (for comparison)",
                            lambda: conn.execute("SELECT MAX(updated_at) FROM files").fetchone())):  # fmt: skip
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                look()
                times.append(time.perf_counter() - start)
            print(f"{name:<34} median {statistics.median(times) * 1e6:8.0f} µs over {runs} looks")
    finally:
        conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
