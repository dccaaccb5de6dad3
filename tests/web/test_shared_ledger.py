"""The page on a ledger several hosts share (PostgreSQL): which host holds each file, and no change missed when
hosts' transactions commit out of order."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest

from dhwatch.states import State
from dhwatch.web.feed import ChangeFeed
from tests.conftest import Folders
from tests.store.conftest import PG_PASSWORD, PostgresServer
from tests.web.conftest import Files


@pytest.fixture
def shared(folders: Folders, pg_database: str) -> Iterator[Files]:
    """A PostgreSQL ledger to fill."""
    made = Files(folders, pg_database)
    try:
        yield made
    finally:
        made.close()


def hold(server: PostgresServer, url: str, row_id: int, host: str, lease_from_now: float) -> None:
    """Make ``host`` hold a row as a claim does (host, a lease on the database's clock, fence + 1)."""
    server.psql(f"UPDATE files SET host = '{host}', lease_until = EXTRACT(EPOCH FROM now()) + {lease_from_now}, "
                f"fence = fence + 1 WHERE id = {row_id}", database=url.rsplit("/", 1)[1])  # fmt: skip


@pytest.mark.postgres
def test_list_and_file_page_name_the_holding_host(shared: Files, postgres_server: PostgresServer,
                                                  serve_page: Callable[..., str]) -> None:  # fmt: skip
    """On a shared ledger the list says which hosts work (alive or not, what each holds) and has a Host column, a
    file's page says which host holds it and until when (or
    that its lease ran out), and /api/files carries host and lease_until."""
    held = shared.add("a.wav", State.SUBMITTED, ago=5)
    stale = shared.add("b.wav", State.FETCHING, ago=5)
    free = shared.add("c.wav", State.DONE)
    hold(postgres_server, shared.url, held, "studio-a", 120)
    hold(postgres_server, shared.url, stale, "studio-b", -30)
    url = serve_page(shared.config())
    page = httpx.get(url + "/").text
    assert "<th>Host</th>" in page
    hosts = page.split('<section class="hosts" id="hosts">', 1)[1].split("</section>", 1)[0]
    assert re.search(r'<li data-host="studio-a" class="alive"><strong>studio-a</strong>:\s*working;\s*holds 1 file '
                     r"\(1 in flight\)</li>", hosts)  # fmt: skip
    assert re.search(r'<li data-host="studio-b" class="gone">.*not heard from;.*holds 0 files \(0 in flight\); '
                     r"1 whose lease ran out", hosts, re.S)  # fmt: skip
    cells = dict(re.findall(r'<tr data-file-id="(\d+)".*?<td class="host">([^<]*)</td>', page, re.S))
    assert cells == {str(held): "studio-a", str(stale): "studio-b", str(free): "—"}
    assert re.search(r'<dd id="holder">studio-a until [^<]+</dd>', httpx.get(f"{url}/files/{held}").text)
    assert "studio-b, lease ran out" in httpx.get(f"{url}/files/{stale}").text
    assert "no host (nobody is working on it now)" in httpx.get(f"{url}/files/{free}").text
    api = {f["id"]: f for f in httpx.get(url + "/api/files").json()}
    assert api[held]["host"] == "studio-a" and api[held]["lease_until"].endswith("Z")
    assert api[free]["host"] is None and api[free]["lease_until"] is None


def test_sqlite_page_has_no_host(files: Files, serve_page: Callable[..., str]) -> None:
    """On the SQLite ledger (one host) neither the list, nor a file's page, nor the API mention a host."""
    row = files.add("a.wav", State.SUBMITTED)
    url = serve_page(files.config())
    listed = httpx.get(url + "/").text
    assert "<th>Host</th>" not in listed and 'class="host"' not in listed and 'id="hosts"' not in listed
    assert 'id="holder"' not in httpx.get(f"{url}/files/{row}").text
    assert "host" not in httpx.get(url + "/api/files").json()[0]


@pytest.mark.postgres
def test_feed_sends_a_change_that_commits_after_a_later_one(shared: Files) -> None:
    """A host's transaction that took its history id first but commits after another host's still reaches the page."""
    slow_row = shared.add("slow.wav", State.QUEUED)
    fast_row = shared.add("fast.wav", State.QUEUED)

    async def scenario() -> list[list[tuple[int, str]]]:
        feed = ChangeFeed(shared.reader(), interval=0.05)
        queue = feed.subscribe()
        await feed.started.wait()
        with psycopg.connect(shared.url, password=PG_PASSWORD) as other_host:  # a transaction, left open
            other_host.execute("UPDATE files SET state = 'uploading' WHERE id = %s", (slow_row,))
            other_host.execute("INSERT INTO events (file_id, at, from_state, to_state) "
                               "VALUES (%s, %s, 'queued', 'uploading')", (slow_row, time.time()))  # fmt: skip
            shared.ledger.transition(fast_row, State.QUEUED, State.UPLOADING, now=time.time())
            got = [[(r.id, r.state.value) for r in await asyncio.wait_for(queue.get(), 10)]]
            other_host.commit()
            got.append([(r.id, r.state.value) for r in await asyncio.wait_for(queue.get(), 10)])
        feed.unsubscribe(queue)
        await feed.aclose()
        return got

    assert asyncio.run(scenario()) == [[(fast_row, "uploading")], [(slow_row, "uploading")]]
