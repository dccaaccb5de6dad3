"""Two real ``dhwatch run`` daemons on one inbox and one PostgreSQL ledger: one is killed -9, the other finishes its work."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dhwatch.emulators.deephearing import DeepHearingEmulator
from dhwatch.naming import temp_name
from tests.conftest import API_KEY, Daemon, Folders, assert_idle, make_audio, wait_for, write_config
from tests.store.conftest import PG_PASSWORD, PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def slow_emulator() -> Iterator[DeepHearingEmulator]:
    """The DeepHearing emulator taking a few seconds per job, so a kill lands while jobs are followed."""
    emu = DeepHearingEmulator(keys={API_KEY}, processing_seconds=4.0)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def rows(server: PostgresServer, url: str) -> list[tuple[str, str, str, str]]:
    """(rel_path, state, job id, host) of every row, read with psql (not through the code under test)."""
    out = server.psql("SELECT rel_path, state, COALESCE(job_id, ''), COALESCE(host, '') FROM files ORDER BY id",
                      url.rsplit("/", 1)[1])  # fmt: skip
    return [tuple(line.split("|")) for line in out.splitlines() if line]  # type: ignore[misc]


def host_config(folders: Folders, name: str, emulator: DeepHearingEmulator, url: str, password: Path) -> Path:
    """One host's config: the shared folders and ledger, its own state_dir and host_name, short leases."""
    path = write_config(folders, base_url=emulator.base_url, extra=(
        f'state_dir = "{folders.root / f"state-{name}"}"\nhost_name = "{name}"\nlease_seconds = 3\n'
        f'ledger_url = "{url}"\nledger_password_file = "{password}"'))  # fmt: skip
    return path.rename(path.with_name(f"config-{name}.toml"))


def test_a_killed_hosts_files_are_finished_by_the_other_once_each(
    folders: Folders, slow_emulator: DeepHearingEmulator, daemons: Callable[..., Daemon],
    postgres_server: PostgresServer, pg_database: str,
) -> None:  # fmt: skip
    """Host a is killed -9 holding jobs: host b takes them over once a's lease runs out, follows the recorded jobs, and every file is recorded once, delivered once, and paid once unless the kill explains it; then b idles."""
    password = folders.root / "ledger.password"
    password.write_text(PG_PASSWORD)
    a = daemons(host_config(folders, "a", slow_emulator, pg_database, password))
    b = daemons(host_config(folders, "b", slow_emulator, pg_database, password))
    names = [f"take{i}.wav" for i in range(10)]
    staging = folders.root / "copying"
    for i, name in enumerate(names):  # copied in while both hosts watch
        os.rename(make_audio(staging / name, seed=i), folders.inbox / name)
    wait_for(lambda: any(s in ("submitted", "fetching") and job and host == "a"
                         for _, s, job, host in rows(postgres_server, pg_database)),
             timeout=60, what="host a holding a recorded job")  # fmt: skip
    a.kill()
    at_kill = rows(postgres_server, pg_database)
    followed = {rel: job for rel, s, job, host in at_kill if host == "a" and s in ("submitted", "fetching") and job}
    uploading = sum(1 for _, s, _, host in at_kill if s == "uploading" and host == "a")
    recorded = len([1 for _, _, job, _ in at_kill if job])
    jobs_at_kill = len(slow_emulator.jobs)

    wait_for(lambda: sorted(folders.files(folders.outbox)) == sorted(names), timeout=120, what="every output")
    wait_for(lambda: [r[1] for r in rows(postgres_server, pg_database)] == ["done"] * len(names), timeout=60,
             what="every row done")  # fmt: skip
    b.wait_event("rows_taken_over")
    final = rows(postgres_server, pg_database)
    assert sorted(r[0] for r in final) == sorted(names)  # each file recorded once, though both hosts scanned it
    assert {rel: job for rel, _, job, _ in final if rel in followed} == followed  # followed, not sent again
    per_file = {n: sum(1 for j in slow_emulator.jobs if j.file_name == n) for n in names}
    assert all(n >= 1 for n in per_file.values())
    # paid twice only where the kill explains it: a's uploads in flight, or answers the kill cut off
    assert sum(per_file.values()) - len(names) <= uploading + (jobs_at_kill - recorded)
    assert folders.files(folders.failed) == [] and folders.files(folders.inbox) == []
    assert {r[3] for r in final} == {""}  # every claim given back once finished
    assert_idle(b, seconds=5.0)
    assert b.stop() == 0
    assert PG_PASSWORD not in a.output() + b.output()


def test_a_host_starting_leaves_another_hosts_download_in_progress_alone(
    folders: Folders, slow_emulator: DeepHearingEmulator, daemons: Callable[..., Daemon],
    pg_database: str,
) -> None:  # fmt: skip
    """At start a host removes only stale temp files from the shared outbox: one another host is writing now stays."""
    password = folders.root / "ledger.password"
    password.write_text(PG_PASSWORD)
    folders.outbox.mkdir()
    writing = folders.outbox / temp_name("take.wav", 7)
    writing.write_bytes(b"half a download")
    left = folders.outbox / temp_name("old.wav", 3)
    left.write_bytes(b"left by a crash")
    hour_ago = time.time() - 3600
    os.utime(left, (hour_ago, hour_ago))
    d = daemons(host_config(folders, "a", slow_emulator, pg_database, password))
    assert d.events("started")[0]["temp_files_removed"] == 1
    assert writing.exists() and not left.exists()
    assert d.stop() == 0
