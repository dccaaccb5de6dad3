"""The pure state machine of one input file version: complete, closed and drawn truthfully."""

from __future__ import annotations

from collections import deque

import pytest

from dhwatch import states
from dhwatch.states import ACTIVE, RECOVERY, TERMINAL, TRANSITIONS, State, can_transition


def _reachable(start: State) -> set[State]:
    """Every state reachable from ``start`` along TRANSITIONS edges (``start`` included)."""
    seen = {start}
    todo = deque([start])
    while todo:
        for nxt in TRANSITIONS[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_has_a_transitions_entry() -> None:
    """TRANSITIONS has exactly one entry per state and only points at states."""
    assert set(TRANSITIONS) == set(State)
    for source, targets in TRANSITIONS.items():
        assert targets <= set(State), source


@pytest.mark.parametrize("terminal", sorted(TERMINAL, key=lambda s: s.value))
def test_terminal_states_have_no_way_out(terminal: State) -> None:
    """A terminal row never changes again: no edge leaves it, and ``terminal`` says so."""
    assert TRANSITIONS[terminal] == frozenset()
    assert terminal.terminal
    assert not any(can_transition(terminal, target) for target in State)


def test_terminal_property_matches_terminal_set() -> None:
    """``State.terminal`` is true exactly for the members of TERMINAL."""
    assert {s for s in State if s.terminal} == TERMINAL
    assert TERMINAL == {State.DONE, State.FAILED, State.DISCARDED, State.VANISHED}


@pytest.mark.parametrize("source", list(RECOVERY))
def test_recovery_targets_are_legal_edges(source: State) -> None:
    """Crash recovery only moves a row along an edge the ledger accepts, out of a non-terminal state."""
    assert source not in TERMINAL
    assert can_transition(source, RECOVERY[source])


def test_recovery_resends_only_uploads_without_a_job_id() -> None:
    """Only UPLOADING is recovered (to QUEUED); rows with a recorded job id are followed, not resent."""
    assert RECOVERY == {State.UPLOADING: State.QUEUED}


@pytest.mark.parametrize("source", sorted(set(State) - TERMINAL, key=lambda s: s.value))
def test_a_terminal_state_is_reachable_from_every_non_terminal_state(source: State) -> None:
    """No row can be trapped forever: every non-terminal state has a path to a terminal one."""
    assert _reachable(source) & TERMINAL


@pytest.mark.parametrize("source", [State.QUEUED, State.UPLOADING, State.SUBMITTED, State.FETCHING])
def test_every_working_state_can_fail(source: State) -> None:
    """Any state that talks to the backend can end in FAILED (never both outputs, never neither)."""
    assert State.FAILED in _reachable(source)


@pytest.mark.parametrize("state", list(State))
def test_every_state_appears_in_the_docstring_diagram(state: State) -> None:
    """The drawing in the module docstring names every state, so it cannot silently go stale."""
    assert states.__doc__ is not None
    diagram = states.__doc__.split("::", 1)[1]
    assert state.name in diagram


def test_active_is_exactly_the_non_terminal_states() -> None:
    """ACTIVE (rows that own their inbox file) is the complement of TERMINAL."""
    assert ACTIVE == frozenset(State) - TERMINAL
    assert not ACTIVE & TERMINAL


def test_in_flight_states_are_active() -> None:
    """A row whose job exists at the backend is never terminal."""
    in_flight = {s for s in State if s.in_flight}
    assert in_flight == {State.UPLOADING, State.SUBMITTED, State.FETCHING}
    assert in_flight <= ACTIVE


def test_can_transition_agrees_with_the_table() -> None:
    """``can_transition`` is exactly membership in TRANSITIONS, for every ordered pair."""
    for a in State:
        for b in State:
            assert can_transition(a, b) == (b in TRANSITIONS[a])


def test_delivery_is_only_reached_through_fetching_and_done_only_through_delivered() -> None:
    """An output is only ever written from FETCHING, and DONE always follows a delivery."""
    assert {s for s in State if State.DELIVERED in TRANSITIONS[s]} == {State.FETCHING}
    assert {s for s in State if State.DONE in TRANSITIONS[s]} == {State.DELIVERED}
    assert {s for s in State if State.FAILED in TRANSITIONS[s]} == {State.FAILING}


def test_state_values_are_the_stored_words() -> None:
    """States round-trip through their lowercase stored value (what the ledger keeps)."""
    for s in State:
        assert State(s.value) is s
        assert s.value == s.name.lower()
