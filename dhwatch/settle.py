"""Deciding when a file has stopped changing. Pure: the caller brings stats and the clock.

A copy over SMB or rsync writes a file for seconds or hours; the daemon must never take
it half-written. A file is *settled* once its size, mtime and inode have stayed the same
for ``settle_seconds`` of observations. Each candidate is one small tuple, so 100,000
files arriving at once cost a few megabytes and no threads.
"""

from __future__ import annotations

from dataclasses import dataclass

from dhwatch.sourcefile import Identity


@dataclass(slots=True)
class _Candidate:
    identity: Identity
    stable_since: float  #: first observation of this identity
    last_seen: float  #: latest observation that still showed it
    next_check: float


class SettleTracker:
    """Tracks candidate paths until each has been unchanged for ``settle_seconds``."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._candidates: dict[str, _Candidate] = {}

    def __len__(self) -> int:
        return len(self._candidates)

    def __contains__(self, rel_path: object) -> bool:
        return rel_path in self._candidates

    @property
    def check_interval(self) -> float:
        """How often each candidate is re-examined; grows with the backlog to bound the cost."""
        base = min(2.0, max(0.1, self.settle_seconds / 4))
        return max(base, len(self._candidates) / 50_000)

    def observe(self, rel_path: str, identity: Identity | None, now: float) -> None:
        """Record what a stat just showed; ``None`` means the file is gone."""
        if identity is None:
            self._candidates.pop(rel_path, None)
            return
        current = self._candidates.get(rel_path)
        if current is None or current.identity != identity:
            self._candidates[rel_path] = _Candidate(identity, now, now, now + self.check_interval)
        else:
            current.last_seen = now
            current.next_check = now + self.check_interval

    def due_for_check(self, now: float, limit: int = 10_000) -> list[str]:
        """Paths whose next look is due (the caller stats them and calls :meth:`observe`)."""
        due: list[str] = []
        for rel_path, cand in self._candidates.items():
            if cand.next_check <= now:
                due.append(rel_path)
                if len(due) >= limit:
                    break
        return due

    def pop_settled(self, limit: int = 1000) -> list[tuple[str, Identity]]:
        """Remove and return candidates *observed* unchanged across ``settle_seconds``.

        The span runs from the first to the latest stat that showed the same identity, so
        a file nobody has looked at for a while is not taken on an old observation.
        """
        ready: list[tuple[str, Identity]] = []
        for rel_path, cand in self._candidates.items():
            if cand.last_seen - cand.stable_since >= self.settle_seconds:
                ready.append((rel_path, cand.identity))
                if len(ready) >= limit:
                    break
        for rel_path, _ in ready:
            del self._candidates[rel_path]
        return ready

    def forget(self, rel_path: str) -> None:
        self._candidates.pop(rel_path, None)
