"""Several hosts, one PostgreSQL ledger (issue 15): three real daemons share one inbox and one database.

Each daemon is the real ``dhwatch run`` with its own ``state_dir`` and ``host_name`` (set
through the environment, as a systemd unit per host would), on one config file naming the
shared folders and the shared ``ledger_url``. 300 small WAVs go through the DeepHearing
emulator while hosts are killed with SIGKILL (one twice and restarted, one for good) or
while the database itself is down for longer than a lease. What the studio would notice is
checked: every file delivered once with the right content, nothing failed or left behind,
and a job paid twice only where a kill (or the outage) caught that file being uploaded.

The ledger is read by the test itself with psycopg (never through the code under test).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import soundfile as sf

from dhwatch.cli import EXIT_CONFIG
from dhwatch.emulators.deephearing import GAIN_DB, DeepHearingEmulator
from tests.conftest import API_KEY, Daemon, Folders, assert_idle, make_audio, wait_for, write_config
from tests.postgres import PG_PASSWORD, PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

#: files per run, and how they arrive: folders of takes renamed into the inbox at once
FILES = 300
FOLDERS = 10
#: short leases, so a dead host's work is taken over within seconds
LEASE_SECONDS = 4
#: each host's capacity: requests in flight, files per request, jobs held at once
UPLOAD_SLOTS = 2
BATCH_FILES = 4
MAX_JOBS_IN_FLIGHT = 30
#: the emulator's job time: long enough that kills land while jobs are followed
PROCESSING_SECONDS = 1.0


@pytest.fixture
def farm_emulator() -> Iterator[DeepHearingEmulator]:
    """The DeepHearing emulator every host talks to, each job taking a moment."""
    emu = DeepHearingEmulator(keys={API_KEY}, processing_seconds=PROCESSING_SECONDS, workers=4)
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


class LedgerView:
    """The shared ledger as the test reads it: plain SQL over its own connection, reconnecting after a restart."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection[Any] | None = None

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one statement; a connection the server dropped is opened again once."""
        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.url, password=PG_PASSWORD, autocommit=True, connect_timeout=5)
                return self._conn.execute(sql, params).fetchall()
            except psycopg.OperationalError:
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def counts(self) -> dict[str, int]:
        """How many rows are in each state (an empty dict while the server is unreachable)."""
        try:
            return {state: n for state, n in self.query("SELECT state, count(*) FROM files GROUP BY state")}
        except psycopg.OperationalError:
            return {}

    def done(self) -> int:
        return self.counts().get("done", 0)

    def submitted(self) -> int:
        """How many rows have a job recorded (paid for), whatever they are doing since."""
        try:
            return int(self.query("SELECT count(*) FROM files WHERE job_id IS NOT NULL")[0][0])
        except psycopg.OperationalError:
            return 0

    def states_at(self, at: float) -> dict[str, str]:
        """rel_path → the state its row was in at epoch ``at``, from the ledger's history."""
        rows = self.query("SELECT DISTINCT ON (f.id) f.rel_path, e.to_state FROM events e JOIN files f ON f.id = e.file_id "
                          "WHERE e.at <= %s ORDER BY f.id, e.at DESC, e.id DESC", (at,))  # fmt: skip
        return {rel: state for rel, state in rows}

    def held(self, host: str, states: tuple[str, ...]) -> list[tuple[str, str, str | None]]:
        """(rel_path, state, job id) of the rows ``host`` holds in one of ``states``."""
        return [(r[0], r[1], r[2]) for r in self.query(
            "SELECT rel_path, state, job_id FROM files WHERE host = %s AND state = ANY(%s) ORDER BY id",
            (host, list(states)))]  # fmt: skip

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None


@dataclass
class Kill:
    """One SIGKILL, and what the killed host held at that instant (read right after: a dead host changes nothing)."""

    host: str
    at: float
    #: rel_path of the rows it was uploading: the only files this kill may make us pay for again
    uploading: set[str]
    #: rel_path → job id of the rows whose job it was following: these must be followed, never sent again
    following: dict[str, str]


@dataclass
class Farm:
    """Three hosts' daemons on one inbox, one config, one PostgreSQL ledger."""

    folders: Folders
    config: Path
    env: dict[str, str]
    ledger: LedgerView
    start_daemon: Callable[..., Daemon]
    running: dict[str, Daemon] = field(default_factory=dict)
    every: list[Daemon] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)

    def state_dir(self, host: str) -> Path:
        return self.folders.root / f"state-{host}"

    def start(self, host: str) -> Daemon:
        """Start ``host``'s daemon (its own state_dir and host_name) and wait until it watches the inbox."""
        env = {**self.env, "DHWATCH_STATE_DIR": str(self.state_dir(host)), "DHWATCH_HOST_NAME": host}
        d = self.start_daemon(self.config, env)
        self.running[host] = d
        self.every.append(d)
        return d

    def start_all(self, hosts: list[str]) -> None:
        """Start several hosts at once, as a farm's units come up together after a reboot."""
        with ThreadPoolExecutor(len(hosts)) as pool:
            list(pool.map(self.start, hosts))

    def kill(self, host: str) -> Kill:
        """SIGKILL ``host`` once it is uploading or following jobs, and record what it held."""
        wait_for(lambda: self.ledger.held(host, ("uploading", "submitted", "fetching")), timeout=60, interval=0.02,
                 what=f"{host} holding jobs in flight")  # fmt: skip
        d = self.running.pop(host)
        d.kill()
        at = time.time()
        held = self.ledger.held(host, ("uploading", "submitted", "fetching"))
        kill = Kill(host, at, {rel for rel, state, _ in held if state == "uploading"},
                    {rel: job for rel, state, job in held if state != "uploading" and job})  # fmt: skip
        self.kills.append(kill)
        return kill

    def wait_done(self, n: int, timeout: float) -> None:
        wait_for(lambda: self.ledger.done() >= n, timeout=timeout, interval=0.1, what=f"{n} rows done")

    def wait_submitted(self, n: int, timeout: float) -> None:
        wait_for(lambda: self.ledger.submitted() >= n, timeout=timeout, interval=0.05, what=f"{n} jobs recorded")


@pytest.fixture
def farm(
    folders: Folders, farm_emulator: DeepHearingEmulator, daemons: Callable[..., Daemon], pg_database: str
) -> Iterator[Farm]:  # fmt: skip
    """The shared config (folders, ledger_url, short leases, each host's capacity); hosts are started by the test."""
    creds = folders.root / "creds"
    creds.mkdir(mode=0o700)
    (creds / "dhwatch-ledger-password").write_text(PG_PASSWORD + "\n")
    cfg = write_config(
        folders, base_url=farm_emulator.base_url,
        extra=f'ledger_url = "{pg_database}"\nlease_seconds = {LEASE_SECONDS}\nmax_jobs_in_flight = {MAX_JOBS_IN_FLIGHT}\n'
              f"upload_concurrency = {UPLOAD_SLOTS}\nrescan_interval = 5.0\nlog_level = \"info\"",
        deephearing=f"batch_files = {BATCH_FILES}\npoll_interval = 0.2\npoll_max_interval = 0.5",
    )  # fmt: skip
    view = LedgerView(pg_database)
    try:
        yield Farm(folders, cfg, {"CREDENTIALS_DIRECTORY": str(creds)}, view, daemons)
    finally:
        view.close()


def drop_takes(folders: Folders, n: int = FILES, folders_count: int = FOLDERS) -> list[str]:
    """``n`` distinct small WAVs in session folders, renamed into the inbox at once; their inbox paths."""
    staging = folders.root / "staging"
    names = []
    for i in range(n):
        rel = f"session{i % folders_count:02d}/take{i:03d}.wav"
        make_audio(staging / rel, seconds=0.1, seed=i)
        names.append(rel)
    for k in range(folders_count):
        os.rename(staging / f"session{k:02d}", folders.inbox / f"session{k:02d}")
    return sorted(names)


def assert_delivered_once(folders: Folders, names: list[str]) -> None:
    """Every take is in the outbox once, as the emulator's result of that very take; nothing failed or left behind."""
    assert folders.files(folders.failed) == []
    assert folders.files(folders.inbox) == []
    assert folders.files(folders.outbox) == names  # no "take (2).wav": nothing was delivered twice
    assert folders.files(folders.archive) == names  # each original archived once
    gain = 10.0 ** (GAIN_DB / 20.0)
    for rel in names:
        out, _ = sf.read(folders.outbox / rel)
        src, _ = sf.read(folders.archive / rel)
        assert out.shape == src.shape and np.allclose(out, src * gain, atol=2 / 32768), f"{rel}: not its own result"


def assert_ledger_finished(ledger: LedgerView, names: list[str]) -> None:
    """One row per take, every row DONE, delivered once each, no lease left held."""
    rows = ledger.query("SELECT rel_path, state, host FROM files ORDER BY rel_path")
    paths = [r[0] for r in rows]
    twice = {p: [r for r in rows if r[0] == p] for p in paths if paths.count(p) > 1}
    assert twice == {}, f"takes recorded more than once: {twice}"
    assert paths == names, f"takes never recorded: {sorted(set(names) - set(paths))}"
    assert {r[1] for r in rows} == {"done"}, ledger.counts()
    assert [r for r in rows if r[2] is not None] == [], "a finished row still held by a host"
    delivered = ledger.query("SELECT f.rel_path, count(*) FROM events e JOIN files f ON f.id = e.file_id "
                             "WHERE e.to_state = 'delivered' GROUP BY f.rel_path HAVING count(*) <> 1")  # fmt: skip
    assert delivered == []


def jobs_per_take(emulator: DeepHearingEmulator) -> dict[str, list[str]]:
    """Take name → the ids of the jobs the emulator created for it (each one paid)."""
    jobs: dict[str, list[str]] = {}
    for job in emulator.jobs:
        jobs.setdefault(job.file_name, []).append(job.job_id)
    return jobs


def story(emulator: DeepHearingEmulator, ledger: LedgerView, rel: str, t0: float) -> str:
    """One take's jobs and ledger history, times relative to ``t0``: what a failed assertion shows."""
    name = rel.rsplit("/", 1)[1]
    jobs = [(j.job_id, round(j.created - t0, 2)) for j in emulator.jobs if j.file_name == name]
    events = ledger.query("SELECT round(CAST(e.at - %s AS numeric), 2), e.from_state, e.to_state, e.detail, f.job_id, "
                          "f.host FROM events e JOIN files f ON f.id = e.file_id WHERE f.rel_path LIKE %s ORDER BY e.id",
                          (t0, f"%/{name}"))  # fmt: skip
    return f"{name}: jobs {jobs}; history {events}"


def assert_paid_twice_only_where_a_kill_explains_it(
    emulator: DeepHearingEmulator, ledger: LedgerView, names: list[str], kills: list[Kill]
) -> None:  # fmt: skip
    """Each take paid once, plus at most once per kill that caught it uploading; followed jobs kept their ids."""
    jobs = jobs_per_take(emulator)
    final = {rel: job for rel, job in ledger.query("SELECT rel_path, job_id FROM files")}
    for kill in kills:
        assert len(kill.uploading) <= UPLOAD_SLOTS * BATCH_FILES, f"{kill.host} uploaded more than its slots allow"
        for rel, job in kill.following.items():
            assert final[rel] == job, f"{rel}: its recorded job was sent again after {kill.host}'s kill"
    for rel in names:
        base = rel.rsplit("/", 1)[1]
        paid = jobs.get(base, [])
        explained = sum(1 for k in kills if rel in k.uploading)
        assert 1 <= len(paid) <= 1 + explained, f"kills that caught it uploading: {explained}; " + story(
            emulator, ledger, rel, kills[0].at)  # fmt: skip
        assert final[rel] in paid


def assert_quiet(farm: Farm) -> None:
    """Every host still running is idle, measured side by side; none ever logged a crashed stage."""
    alive = list(farm.running.values())
    errors: list[BaseException] = []

    def measure(d: Daemon) -> None:
        try:
            assert_idle(d, seconds=6.0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=measure, args=(d,)) for d in alive]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[0]
    for d in farm.every:
        assert d.events("stage_crashed") == [], d.output()[-3000:]
        assert PG_PASSWORD not in d.output()


def test_three_hosts_deliver_every_file_once_through_kills(farm: Farm, farm_emulator: DeepHearingEmulator) -> None:
    """Three hosts share 300 takes; one is killed -9 twice and restarted, another killed for good: every take is delivered once, paid twice only where a kill caught it uploading."""
    farm.start_all(["alpha", "bravo", "charlie"])
    names = drop_takes(farm.folders)
    farm.wait_submitted(30, timeout=60)
    farm.kill("alpha")
    farm.start("alpha")
    farm.wait_submitted(120, timeout=60)
    farm.kill("alpha")
    farm.start("alpha")
    farm.wait_submitted(200, timeout=60)
    farm.kill("bravo")  # for good: its work is taken over once its leases run out
    farm.wait_done(FILES, timeout=90)
    wait_for(lambda: sorted(farm.folders.files(farm.folders.outbox)) == names and not farm.folders.files(
        farm.folders.inbox), timeout=30, what="every output delivered and every original archived")  # fmt: skip

    assert_delivered_once(farm.folders, names)
    assert_ledger_finished(farm.ledger, names)
    assert_paid_twice_only_where_a_kill_explains_it(farm_emulator, farm.ledger, names, farm.kills)
    assert any(k.following for k in farm.kills), "no kill caught its host following jobs: nothing was taken over"
    assert_quiet(farm)


def test_three_hosts_wait_out_a_database_restart_longer_than_a_lease(
    farm: Farm, farm_emulator: DeepHearingEmulator, postgres_server: PostgresServer
) -> None:  # fmt: skip
    """The database stopped mid-run for longer than a lease, then started: the hosts wait, reconnect and resume; every take is delivered once, paid twice only where an answer came while it was down."""
    farm.start_all(["alpha", "bravo", "charlie"])
    names = drop_takes(farm.folders)
    farm.wait_submitted(100, timeout=60)
    postgres_server.pg_ctl("stop", "-m", "fast")  # every host's sessions are cut, mid-run
    down = time.time()  # nothing written after this instant: the server is gone
    try:
        # The outage's length, not a wait for an outcome: down for longer than a lease, so
        # when the server is back every lease has run out on its clock and hosts race for rows.
        time.sleep(LEASE_SECONDS + 1.0)
    finally:
        postgres_server.pg_ctl("start")
    farm.wait_done(FILES, timeout=90)
    wait_for(lambda: sorted(farm.folders.files(farm.folders.outbox)) == names and not farm.folders.files(
        farm.folders.inbox), timeout=30, what="every output delivered and every original archived")  # fmt: skip

    gave_up = [d for d in farm.running.values() if d.proc is None or d.proc.poll() is not None]
    assert gave_up == [], "a host gave up:\n" + "".join(d.output()[-4000:] for d in gave_up)
    assert_delivered_once(farm.folders, names)
    assert_ledger_finished(farm.ledger, names)
    # A host cut off from the ledger in the middle of an upload cannot record its answer, and
    # its lease runs out meanwhile: that file is sent again (the one-request window of every
    # host). Only files uploading when the server went down, and each at most twice.
    uploading = {rel for rel, state in farm.ledger.states_at(down).items() if state == "uploading"}
    jobs = jobs_per_take(farm_emulator)
    twice = {rel for rel in names if len(jobs[rel.rsplit("/", 1)[1]]) > 1}
    assert len(uploading) <= len(farm.running) * UPLOAD_SLOTS * BATCH_FILES
    assert twice <= uploading, "\n".join(story(farm_emulator, farm.ledger, rel, down) for rel in twice - uploading)
    assert all(len(ids) <= 2 for ids in jobs.values())
    assert_quiet(farm)


def test_a_second_daemon_with_a_host_name_in_use_refuses_to_start(farm: Farm) -> None:
    """A daemon whose host_name a running daemon with another state_dir already uses refuses to start, saying why; the first goes on working."""
    first = farm.start("alpha")
    env = {**os.environ, **farm.env, "DHWATCH_STATE_DIR": str(farm.state_dir("elsewhere")), "DHWATCH_HOST_NAME": "alpha"}
    second = subprocess.run([sys.executable, "-m", "dhwatch", "run", "--config", str(farm.config)], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    said = second.stdout + second.stderr
    assert second.returncode == EXIT_CONFIG, said
    assert "alpha" in said and "host_name" in said, said
    names = drop_takes(farm.folders, n=6, folders_count=2)
    wait_for(lambda: farm.folders.files(farm.folders.outbox) == names, timeout=60, what="every output")
    assert first.proc is not None and first.proc.poll() is None
    assert first.stop() == 0, first.output()[-4000:]
