"""/metrics and /healthz on the one HTTP stack (Starlette + uvicorn), served in-process over real HTTP; per host on a
shared ledger."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dhwatch.asgi import ThreadedAsgiServer
from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.metrics import Metrics, metrics_app
from tests.conftest import Daemon, Folders, free_port, wait_for, write_config
from tests.store.conftest import PG_PASSWORD, PostgresServer


def test_metrics_and_health_answers() -> None:
    """/metrics is the Prometheus text, /healthz follows the health callback (503 when stalled), other paths 404, POST 405."""
    metrics = Metrics()
    metrics.set_counts({"done": 3})
    health: list[tuple[int, dict[str, object]]] = [(200, {"status": "ok"})]
    with ThreadedAsgiServer(metrics_app(metrics, lambda: health[0])) as server:
        scraped = httpx.get(server.url + "/metrics")
        assert scraped.status_code == 200 and scraped.headers["content-type"] == CONTENT_TYPE_LATEST
        assert 'dhwatch_files{state="done"} 3.0' in scraped.text
        assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
        health[0] = (503, {"status": "stalled", "stages": ["upload"]})
        stalled = httpx.get(server.url + "/healthz?verbose=1")
        assert stalled.status_code == 503 and stalled.json()["stages"] == ["upload"]
        head = httpx.head(server.url + "/metrics")
        assert head.status_code == 200 and head.content == b""
        elsewhere = httpx.get(server.url + "/nothing/here")
        assert elsewhere.status_code == 404 and "/metrics" in elsewhere.text
        assert httpx.post(server.url + "/metrics").status_code == 405


def test_a_host_alone_on_its_sqlite_ledger_has_no_host_series() -> None:
    """Without a shared ledger /metrics carries no per-host series (the output a single host had before)."""
    metrics = Metrics()
    metrics.set_counts({"done": 3})
    assert b"dhwatch_held_files" not in metrics.render() and b"dhwatch_host_info" not in metrics.render()


@pytest.mark.postgres
def test_metrics_count_what_this_host_holds(folders: Folders, postgres_server: PostgresServer, pg_database: str) -> None:
    """On a shared ledger dhwatch_held_files{host,state} counts the rows this host holds, not the other hosts' rows,
    beside the ledger-wide dhwatch_files."""
    from dhwatch.store.postgres import PostgresStore

    folders.state.mkdir()
    store = PostgresStore.open(pg_database, state_dir=folders.state, password=PG_PASSWORD)
    try:
        ids = [store.insert(rel_path=f"t{i}.wav", size=1, mtime_ns=1, inode=i, device=1, sha256=f"{i}",
                            backend="deephearing", now=1.0) for i in range(4)]  # fmt: skip
        db = pg_database.rsplit("/", 1)[1]
        for row_id, host in zip(ids, ("studio-a", "studio-a", "studio-b", None), strict=True):
            if host is not None:
                postgres_server.psql(f"UPDATE files SET host = '{host}', lease_until = EXTRACT(EPOCH FROM now()) "
                                     f"+ 60, fence = fence + 1 WHERE id = {row_id}", database=db)  # fmt: skip
        metrics = Metrics()
        metrics.set_counts(store.counts())
        metrics.set_held("studio-a", store.held_counts("studio-a"))
    finally:
        store.close()
    with ThreadedAsgiServer(metrics_app(metrics, lambda: (200, {"status": "ok"}))) as server:
        text = httpx.get(server.url + "/metrics").text
    assert 'dhwatch_files{state="queued"} 4.0' in text
    assert 'dhwatch_held_files{host="studio-a",state="queued"} 2.0' in text
    assert 'dhwatch_held_files{host="studio-a",state="done"} 0.0' in text
    assert 'dhwatch_host_info{host="studio-a"} 1.0' in text and "studio-b" not in text


@pytest.mark.postgres
def test_the_daemon_on_a_shared_ledger_serves_its_host_metrics(folders: Folders, emulator: DeepHearingEmulator,
                                                               daemons: Callable[..., Daemon],
                                                               pg_database: str) -> None:  # fmt: skip
    """`dhwatch run` with ledger_url and metrics_address serves dhwatch_host_info and dhwatch_held_files under this
    host's name (the machine's hostname unless host_name says otherwise)."""
    pw = folders.root / "pw"
    pw.write_text(PG_PASSWORD)
    port = free_port()
    cfg = write_config(folders, base_url=emulator.base_url, extra=f'ledger_url = "{pg_database}"\n'
                       f'ledger_password_file = "{pw}"\nmetrics_address = "127.0.0.1:{port}"')  # fmt: skip
    d = daemons(cfg)
    d.wait_event("metrics_listening")
    host = socket.gethostname()

    def scraped() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return text if f'dhwatch_host_info{{host="{host}"}} 1.0' in text else None

    text = wait_for(scraped, timeout=30, what="the host's series on /metrics")
    assert f'dhwatch_held_files{{host="{host}",state="submitted"}}' in text
    assert d.stop() == 0
