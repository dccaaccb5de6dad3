"""The store's conformance suite: every behaviour the pipeline relies on, against SQLite and PostgreSQL alike."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from dhwatch.errors import LedgerError, TransitionConflict
from dhwatch.recipes import Recipe
from dhwatch.states import State
from dhwatch.store import Store

SHA_A = "a" * 64
SHA_B = "b" * 64


def add(store: Store, rel: str = "take.wav", *, sha: str = SHA_A, now: float = 100.0, backend: str = "deephearing",
        state: State = State.QUEUED, **extra: Any) -> int:  # fmt: skip
    return store.insert(
        rel_path=rel, size=10, mtime_ns=1_733_000_000_123_456_789, inode=2**40 + 7, device=3, sha256=sha,
        backend=backend, now=now, state=state, **extra,
    )  # fmt: skip


def fail(store: Store, row_id: int, state: State = State.QUEUED) -> None:
    store.transition(row_id, state, State.FAILING, now=1.0)
    store.transition(row_id, State.FAILING, State.FAILED, now=2.0)


# --------------------------------------------------------------------------- rows and transitions


def test_insert_reads_back_every_identity_field(store: Store) -> None:
    """A new row comes back QUEUED with its 64-bit identity (nanosecond mtime, large inode) and a first history line."""
    row_id = add(store, "sub/take.wav", now=5.25)
    row = store.get(row_id)
    assert (row.rel_path, row.size, row.sha256, row.state, row.attempts) == ("sub/take.wav", 10, SHA_A, State.QUEUED, 0)
    assert (row.mtime_ns, row.inode) == (1_733_000_000_123_456_789, 2**40 + 7)
    assert row.created_at == row.updated_at == 5.25
    assert [(e.from_state, e.to_state) for e in store.history(row_id)] == [(None, "queued")]


def test_row_ids_grow(store: Store) -> None:
    """Each insert gets a new, larger id (the newest version of a path is the largest id)."""
    ids = [add(store, f"{i}.wav") for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5


def test_transition_applies_changes_and_records_an_event(store: Store) -> None:
    """A legal transition sets the state and fields and appends a history line with its detail."""
    row_id = add(store)
    store.transition(row_id, State.QUEUED, State.UPLOADING, now=110.0)
    store.transition(row_id, State.UPLOADING, State.SUBMITTED, now=120.5, durable=True, job_id="JOB1",
                     submitted_at=120.5, attempts=1, detail="accepted")  # fmt: skip
    row = store.get(row_id)
    assert (row.state, row.job_id, row.attempts, row.submitted_at, row.updated_at) == (
        State.SUBMITTED, "JOB1", 1, 120.5, 120.5,
    )  # fmt: skip
    history = store.history(row_id)
    assert [(e.from_state, e.to_state) for e in history] == [
        (None, "queued"), ("queued", "uploading"), ("uploading", "submitted"),
    ]  # fmt: skip
    assert history[-1].detail == "accepted" and history[-1].at == 120.5


def test_terminal_transition_stamps_finished_at(store: Store) -> None:
    """Reaching a terminal state records when the row finished."""
    row_id = add(store)
    store.transition(row_id, State.QUEUED, State.VANISHED, now=130.0)
    assert store.get(row_id).finished_at == 130.0


def test_compare_and_set_conflict_changes_nothing(store: Store) -> None:
    """A transition from a state the row is no longer in raises TransitionConflict and writes nothing."""
    row_id = add(store)
    store.transition(row_id, State.QUEUED, State.UPLOADING, now=110.0)
    with pytest.raises(TransitionConflict):
        store.transition(row_id, State.QUEUED, State.FAILING, now=112.0, error_code="X")
    row = store.get(row_id)
    assert row.state is State.UPLOADING and row.updated_at == 110.0 and row.error_code is None
    assert len(store.history(row_id)) == 2


def test_compare_and_set_holds_across_two_connections(open_store: Callable[[], Store]) -> None:
    """Two connections to one ledger: the second to move a row from the same state loses, loudly."""
    a, b = open_store(), open_store()
    row_id = add(a)
    b.transition(row_id, State.QUEUED, State.UPLOADING, now=1.0)
    with pytest.raises(TransitionConflict):
        a.transition(row_id, State.QUEUED, State.UPLOADING, now=2.0)
    assert a.get(row_id).state is State.UPLOADING


def test_a_missing_row_is_a_conflict(store: Store) -> None:
    """Moving or updating a row that does not exist is a conflict, not a silent no-op."""
    with pytest.raises(TransitionConflict):
        store.transition(999, State.QUEUED, State.UPLOADING, now=1.0)
    with pytest.raises(TransitionConflict):
        store.update(999, State.QUEUED, now=1.0, polls=1)


def test_illegal_edge_and_unknown_columns_are_refused(store: Store) -> None:
    """An edge outside the state machine or a column that may not be set raises LedgerError and writes nothing."""
    row_id = add(store)
    with pytest.raises(LedgerError) as info:
        store.transition(row_id, State.QUEUED, State.DONE, now=2.0)
    assert not isinstance(info.value, TransitionConflict)
    with pytest.raises(LedgerError):
        store.transition(row_id, State.QUEUED, State.UPLOADING, now=1.0, jobid="x")
    with pytest.raises(LedgerError):
        store.update(row_id, State.QUEUED, now=1.0, sha256="c" * 64)
    with pytest.raises(LedgerError):
        add(store, "b.wav", state_x=1)
    assert store.get(row_id).state is State.QUEUED and len(store.history(row_id)) == 1
    assert store.counts() == {"queued": 1}


def test_a_group_transition_is_all_or_nothing_unless_told_to_skip(store: Store) -> None:
    """transition_many moves every row or none; with skip_conflicts it leaves rows another stage moved."""
    a, b, c = (add(store, r) for r in ("a", "b", "c"))
    store.transition(b, State.QUEUED, State.UPLOADING, now=2.0)
    with pytest.raises(TransitionConflict):
        store.transition_many([(r, {"attempts": 1}) for r in (a, b, c)], State.QUEUED, State.UPLOADING, now=3.0)
    assert [store.get(r).state for r in (a, c)] == [State.QUEUED, State.QUEUED]
    moved = store.transition_many([(r, {"attempts": 1}) for r in (a, b, c)], State.QUEUED, State.UPLOADING,
                                  now=3.0, skip_conflicts=True)  # fmt: skip
    assert moved == [a, c]
    assert [store.get(r).attempts for r in (a, b, c)] == [1, 0, 1]
    assert [e.to_state for e in store.history(b)] == ["queued", "uploading"]


def test_update_is_compare_and_set_without_history(store: Store) -> None:
    """update() and update_many() change fields only of rows still in the expected state, with no history line."""
    a, b = add(store, "a"), add(store, "b")
    store.update(a, State.QUEUED, now=150.0, next_attempt_at=300.0)
    assert store.get(a).next_attempt_at == 300.0 and len(store.history(a)) == 1
    with pytest.raises(TransitionConflict):
        store.update(a, State.SUBMITTED, now=151.0, polls=3)
    store.transition(b, State.QUEUED, State.UPLOADING, now=2.0)
    assert store.update_many([(a, {"polls": 2}), (b, {"polls": 2})], State.QUEUED, now=3.0) == [a]
    assert (store.get(a).polls, store.get(b).polls) == (2, 0)


def test_secrets_are_redacted_and_odd_paths_round_trip(store: Store) -> None:
    """Error text is stored without registered secrets; paths that are not UTF-8 come back byte-identical."""
    from dhwatch.logs import register_secret

    register_secret("sk-store-secret-123456")
    rel = os.fsdecode(b"sess\xe9/t\xffake.wav")
    out = os.fsdecode(b"/out/sess\xe9/t\xffake.wav")
    row_id = add(store, rel)
    store.transition(row_id, State.QUEUED, State.FAILING, now=1.0, error_message="key sk-store-secret-123456 refused",
                     failed_path=out)  # fmt: skip
    row = store.get(row_id)
    assert row.rel_path == rel and row.failed_path == out
    assert row.error_message is not None and "sk-store-secret-123456" not in row.error_message
    assert store.active_for_path(rel) is not None and store.active_among([rel, "x.wav"]) == {rel}


# --------------------------------------------------------------------------- crash recovery and scheduling


def test_recover_moves_only_uploading_back_to_queued(store: Store) -> None:
    """After a crash, uploads without a job id are queued again; every other row resumes as it is."""
    rows = {s: add(store, f"{s.value}.wav", state=s) for s in State}
    store.update(rows[State.SUBMITTED], State.SUBMITTED, now=100.0, job_id="J1")
    assert store.recover(now=500.0) == {"uploading": 1}
    for state, row_id in rows.items():
        assert store.get(row_id).state is (State.QUEUED if state is State.UPLOADING else state), state
    assert store.get(rows[State.SUBMITTED]).job_id == "J1"
    last = store.history(rows[State.UPLOADING])[-1]
    assert (last.from_state, last.to_state, last.detail) == ("uploading", "queued", "recovered after restart")
    assert store.recover(now=600.0) == {}


def test_rows_survive_reopening(open_store: Callable[[], Store]) -> None:
    """What one connection committed is there, state and job id, for the next one (a restart)."""
    first = open_store()
    row_id = add(first)
    first.transition(row_id, State.QUEUED, State.UPLOADING, now=1.0)
    first.transition(row_id, State.UPLOADING, State.SUBMITTED, now=2.0, durable=True, job_id="JX")
    first.close()
    again = open_store()
    assert (again.get(row_id).state, again.get(row_id).job_id) == (State.SUBMITTED, "JX")
    assert again.busy()


def test_due_orders_by_next_attempt_and_respects_state_time_and_limit(store: Store) -> None:
    """due() returns rows of one state whose time has come, earliest first (ties by id), at most ``limit``."""
    late = add(store, "late.wav", next_attempt_at=50.0)
    early = add(store, "early.wav", next_attempt_at=10.0)
    tie_a = add(store, "tie-a.wav", next_attempt_at=30.0)
    tie_b = add(store, "tie-b.wav", next_attempt_at=30.0)
    add(store, "future.wav", next_attempt_at=1000.0)
    add(store, "other-state.wav", state=State.SUBMITTED, next_attempt_at=0.0)
    assert [r.id for r in store.due(State.QUEUED, now=100.0, limit=10)] == [early, tie_a, tie_b, late]
    assert [r.id for r in store.due(State.QUEUED, now=30.0, limit=10)] == [early, tie_a, tie_b]
    assert [r.id for r in store.due(State.QUEUED, now=100.0, limit=2)] == [early, tie_a]
    assert store.next_due_at([State.QUEUED]) == 10.0
    assert store.next_due_at([State.QUEUED, State.SUBMITTED]) == 0.0
    assert store.next_due_at([State.FETCHING]) is None
    assert [r.id for r in store.in_state(State.QUEUED, limit=2)] == [late, early]


def test_path_lookups_answer_for_the_asked_paths_only_in_any_number(store: Store) -> None:
    """active_among/finished_among answer for exactly the paths asked, also for more than one IN list holds."""
    paths = [f"s/take{i:04d}.wav" for i in range(1203)]
    ids = {p: add(store, p) for p in paths}
    store.transition_many([(ids[p], {}) for p in paths[::2]], State.QUEUED, State.FAILING, now=1.0)
    store.transition_many([(ids[p], {}) for p in paths[::2]], State.FAILING, State.FAILED, now=2.0)
    asked = [*paths[100:1203], "not/there.wav"]
    assert store.active_among(asked) == set(paths[101:1203:2])
    assert set(store.finished_among(asked)) == set(paths[100:1203:2])
    assert store.active_among([]) == set() and store.finished_among([]) == {}


def test_the_latest_finished_version_of_a_path_wins(store: Store) -> None:
    """Each path maps to its newest done or failed version; active and discarded rows are not listed."""
    old = add(store, "a.wav", sha=SHA_A)
    fail(store, old)
    new = store.insert(rel_path="a.wav", size=20, mtime_ns=9, inode=8, device=3, sha256=SHA_B, backend="deephearing",
                       now=3.0, state=State.DELIVERED)  # fmt: skip
    store.transition(new, State.DELIVERED, State.DONE, now=4.0)
    add(store, "active.wav")
    gone = add(store, "gone.wav")
    store.transition(gone, State.QUEUED, State.VANISHED, now=5.0)
    versions = store.finished_among(["a.wav", "active.wav", "gone.wav", "never.wav"])
    assert set(versions) == {"a.wav"}
    assert (versions["a.wav"].id, versions["a.wav"].sha256, versions["a.wav"].state) == (new, SHA_B, State.DONE)
    assert versions["a.wav"].same_file(20, 9, 8) and not versions["a.wav"].same_file(20, 10, 8)
    found = store.finished_version("a.wav")
    assert found is not None and found.id == new
    assert store.finished_version("active.wav") is None


# --------------------------------------------------------------------------- identical content, lost jobs, recipes


def test_content_leader_prefers_a_row_with_a_job_then_the_earliest_waiting(store: Store) -> None:
    """Identical content follows a row whose job is in flight; without one, the earliest queued/uploading row leads."""
    failed = add(store, "f.wav")
    fail(store, failed)
    first = add(store, "a.wav", state=State.UPLOADING)
    second = add(store, "b.wav")
    assert store.content_leader(SHA_A, "deephearing", first) is None
    lead = store.content_leader(SHA_A, "deephearing", second)
    assert lead is not None and lead.id == first
    with_job = add(store, "c.wav", state=State.SUBMITTED, job_id="JOB-C")
    lead = store.content_leader(SHA_A, "deephearing", second)
    assert lead is not None and lead.id == with_job and lead.job_id == "JOB-C"
    assert store.content_leader(SHA_A, "local", second) is None
    assert store.content_leader(SHA_B, "deephearing", second) is None


def test_failed_and_lost_jobs_are_never_adopted(open_store: Callable[[], Store]) -> None:
    """A failed row's job and a job the backend lost (remembered across a restart) are never reused."""
    store = open_store()
    row = add(store, "a.wav", state=State.SUBMITTED, job_id="JOB-F")
    fail(store, row, State.SUBMITTED)
    assert store.reusable_job(SHA_A, "deephearing") is None
    add(store, "b.wav", state=State.SUBMITTED, job_id="JOB-L")
    assert store.reusable_job(SHA_A, "deephearing") is not None
    store.mark_job_lost("JOB-L", "engine restarted")
    store.close()
    again = open_store()
    assert again.job_lost("JOB-L") and not again.job_lost("JOB-F")
    assert again.reusable_job(SHA_A, "deephearing") is None


def test_done_jobs_are_adopted_only_where_results_outlive_release(store: Store) -> None:
    """A DONE row's job qualifies only when ``finished`` says results outlive release."""
    add(store, "a.wav", state=State.DONE, job_id="JOB-D")
    assert store.reusable_job(SHA_A, "deephearing", finished=True) is not None
    assert store.reusable_job(SHA_A, "deephearing", finished=False) is None


def test_a_job_is_reused_only_with_the_same_denoise_settings_and_recipes_round_trip(store: Store) -> None:
    """The recipe snapshot is stored as taken, and identical content with other denoise settings never adopts the job."""
    taken = Recipe(folders=["podcast"], loudness_lufs=-16.0, output_format="flac")
    row_id = add(store, "podcast/a.wav", backend="local", recipe="podcast", recipe_settings=taken.snapshot(),
                 denoise="atten_lim_db=12")  # fmt: skip
    assert Recipe.from_snapshot(store.get(row_id).recipe_settings or "") == taken
    store.transition(row_id, State.QUEUED, State.UPLOADING, now=2.0)
    store.transition(row_id, State.UPLOADING, State.SUBMITTED, now=3.0, job_id="job-1")
    assert store.reusable_job(SHA_A, "local", denoise="") is None
    found = store.reusable_job(SHA_A, "local", denoise="atten_lim_db=12")
    assert found is not None and found.job_id == "job-1"
    assert [r.id for r in store.rows_for_job("job-1", State.SUBMITTED)] == [row_id]


# --------------------------------------------------------------------------- reports, notes, flags, money


def test_assessment_jobs_are_remembered_replaced_and_forgotten(store: Store) -> None:
    """A quality report's assessment jobs survive, a side recorded again replaces its job, and they are forgotten together."""
    row_id = add(store, state=State.DONE, quality_status="pending")
    assert [r.id for r in store.quality_pending(10)] == [row_id] and store.busy()
    store.record_assessment_job(row_id, "before", "A1", "https://up/1", now=1.0)
    store.record_assessment_job(row_id, "after", "B1", "https://up/2", now=1.0)
    store.record_assessment_job(row_id, "before", "A2", "https://up/3", now=2.0)
    assert store.assessment_jobs(row_id) == {"before": ("A2", "https://up/3"), "after": ("B1", "https://up/2")}
    store.forget_assessment_jobs(row_id)
    assert store.assessment_jobs(row_id) == {}
    store.update(row_id, State.DONE, now=3.0, quality_status="done")
    assert store.quality_pending(10) == [] and not store.busy()


def test_notifications_queue_retry_and_are_forgotten(store: Store) -> None:
    """A queued note is due at once, waits after a retry, and is gone once done."""
    row_id = add(store, state=State.DONE)
    assert store.next_notification_at() is None
    note = store.add_notification(row_id, "http://hook/x", '{"ok": true}', now=10.0)
    (due,) = store.due_notifications(now=10.0, limit=5)
    assert (due.id, due.file_id, due.url, due.body, due.attempts) == (note, row_id, "http://hook/x", '{"ok": true}', 0)
    store.notification_retry(note, 1, 40.0)
    assert store.due_notifications(now=20.0, limit=5) == [] and store.next_notification_at() == 40.0
    store.notification_done(note)
    assert store.due_notifications(now=100.0, limit=5) == [] and store.next_notification_at() is None


def test_flags_round_trip(store: Store) -> None:
    """Daemon flags are stored, replaced and deleted."""
    store.set_flag("paused", "bad key")
    store.set_flag("paused", "still bad")
    assert store.get_flag("paused") == "still bad"
    store.set_flag("paused", None)
    assert store.get_flag("paused") is None


def test_counts_and_billed_seconds(store: Store) -> None:
    """Counts per state, and billed seconds that exclude adopted rows (paid once)."""
    add(store, "a.wav", state=State.DONE, billed_seconds=3.5, submitted_at=10.0)
    add(store, "b.wav", state=State.DONE, billed_seconds=3.0, submitted_at=10.0, adopted=1)
    add(store, "c.wav", state=State.DONE, billed_seconds=5.0, submitted_at=1.0)
    add(store, "d.wav")
    assert store.counts() == {"done": 3, "queued": 1}
    assert store.billed_seconds() == 8.5
    assert store.billed_seconds(since=5.0) == 3.5


def test_sync_returns_with_every_commit_kept(open_store: Callable[[], Store]) -> None:
    """Many waiters for durability at once all return, and what they committed is there after reopening."""
    import asyncio

    store = open_store()

    async def commit_and_sync(rel: str) -> None:
        add(store, rel)
        await store.sync()

    async def main() -> None:
        await asyncio.gather(*(commit_and_sync(f"f{i}") for i in range(20)))

    asyncio.run(main())
    store.close()
    assert sum(open_store().counts().values()) == 20
