"""The real daemon on a PostgreSQL ledger: files delivered through the DeepHearing emulator, kill -9, restart, resume."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.conftest import API_KEY, Daemon, Folders, make_audio, wait_for, write_config
from tests.store.conftest import PG_PASSWORD, PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def slow_emulator() -> Iterator[DeepHearingEmulator]:
    """The DeepHearing emulator taking a while per job, so a kill lands while jobs are followed."""
    emu = DeepHearingEmulator(keys={API_KEY}, processing_seconds=1.5)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def pg_states(server: PostgresServer, url: str) -> dict[str, tuple[str, str]]:
    """rel_path → (state, job id) of its latest row, read with psql (not through the code under test)."""
    out = server.psql("SELECT rel_path, state, COALESCE(job_id, '') FROM files ORDER BY id", url.rsplit("/", 1)[1])
    return {line.split("|")[0]: (line.split("|")[1], line.split("|")[2]) for line in out.splitlines() if line}


def test_the_daemon_delivers_on_postgresql_and_resumes_after_kill_9(
    folders: Folders, slow_emulator: DeepHearingEmulator, daemons: Callable[..., Daemon],
    postgres_server: PostgresServer, pg_database: str,
) -> None:  # fmt: skip
    """With ledger_url set, every file is delivered once; after kill -9 the restarted daemon follows recorded jobs instead of paying again."""
    creds = folders.root / "creds"
    creds.mkdir(mode=0o700)
    (creds / "dhwatch-ledger-password").write_text(PG_PASSWORD + "\n")
    names = [f"take{i}.wav" for i in range(6)]
    for i, name in enumerate(names):
        make_audio(folders.inbox / name, seed=i)
    cfg = write_config(folders, base_url=slow_emulator.base_url, extra=f'ledger_url = "{pg_database}"')
    env = {"CREDENTIALS_DIRECTORY": str(creds)}

    first = daemons(cfg, env)
    wait_for(lambda: any(job for _, job in pg_states(postgres_server, pg_database).values()), timeout=60,
             what="a job id recorded in PostgreSQL")  # fmt: skip
    first.kill()
    at_kill = pg_states(postgres_server, pg_database)
    followed = {rel: job for rel, (state, job) in at_kill.items() if state in ("submitted", "fetching") and job}
    assert followed, f"the kill must land with jobs recorded: {at_kill}"
    uploading = sum(1 for state, _ in at_kill.values() if state == "uploading")
    jobs_at_kill = len(slow_emulator.jobs)

    second = daemons(cfg, env)
    wait_for(lambda: sorted(folders.files(folders.outbox)) == sorted(names), timeout=90, what="every output")
    wait_for(lambda: all(s == "done" for s, _ in pg_states(postgres_server, pg_database).values())
             and len(pg_states(postgres_server, pg_database)) == len(names), timeout=60, what="every row done")  # fmt: skip
    assert second.stop() == 0

    assert not (folders.state / "ledger.sqlite3").exists()  # the ledger is PostgreSQL's, not a file beside it
    final = pg_states(postgres_server, pg_database)
    assert {rel: final[rel][1] for rel in followed} == followed  # recorded jobs were followed, not replaced
    per_file = {n: sum(1 for j in slow_emulator.jobs if j.file_name == n) for n in names}
    assert all(n >= 1 for n in per_file.values())
    # Paid again only where the kill explains it: an upload in flight without a recorded job id,
    # or a request the emulator had accepted but whose answer the kill cut off.
    assert sum(per_file.values()) - len(names) <= uploading + (jobs_at_kill - len([j for j in at_kill.values() if j[1]]))
    assert folders.files(folders.failed) == [] and folders.files(folders.inbox) == []
    for d in (first, second):
        assert PG_PASSWORD not in d.output()


def test_the_daemon_waits_out_a_database_restart_and_delivers_everything_once(
    folders: Folders, slow_emulator: DeepHearingEmulator, daemons: Callable[..., Daemon],
    postgres_server: PostgresServer, pg_database: str,
) -> None:  # fmt: skip
    """The PostgreSQL server restarted while jobs are followed: the daemon reconnects, no stage crashes, every file is delivered and paid once."""
    password_file = folders.root / "ledger.password"
    password_file.write_text(PG_PASSWORD)
    names = [f"take{i}.wav" for i in range(4)]
    for i, name in enumerate(names):
        make_audio(folders.inbox / name, seed=i)
    cfg = write_config(folders, base_url=slow_emulator.base_url,
                       extra=f'ledger_url = "{pg_database}"\nledger_password_file = "{password_file}"')  # fmt: skip
    d = daemons(cfg)
    wait_for(lambda: any(job for _, job in pg_states(postgres_server, pg_database).values()), timeout=60,
             what="a job id recorded in PostgreSQL")  # fmt: skip
    postgres_server.pg_ctl("stop", "-m", "fast")  # every session is cut, mid-run
    postgres_server.pg_ctl("start")
    wait_for(lambda: sorted(folders.files(folders.outbox)) == sorted(names), timeout=90, what="every output")
    wait_for(lambda: [s for s, _ in pg_states(postgres_server, pg_database).values()] == ["done"] * len(names),
             timeout=60, what="every row done")  # fmt: skip
    assert d.events("stage_crashed") == [] and d.proc is not None and d.proc.poll() is None
    assert d.stop() == 0
    assert sorted(j.file_name for j in slow_emulator.jobs) == sorted(names)  # each paid once
    assert PG_PASSWORD not in d.output()
