"""Memory timeline of a ``dhwatch run`` started by a benchmark (issue 12's memory profiling).

Put this folder on ``PYTHONPATH`` and set ``DHW_TRACE_OUT``; every ``python -m dhwatch run``
started with that environment (the benchmarks pass theirs on) then writes, every 0.25 s,
to ``$DHW_TRACE_OUT.rss``: VmRSS, VmHWM, threads, and each second the resident KiB of the
``[heap]`` and of anonymous mappings, and SQLite's own allocations (``sqlite3_memory_used``,
which tracemalloc cannot see). ``DHW_TRACE=tracemalloc`` also traces Python allocations
(8 frames) and dumps a snapshot to ``$DHW_TRACE_OUT.snap`` at each new traced peak (+5 %)::

    DHW_TRACE_OUT=/tmp/t1 PYTHONPATH=bench/memtrace \\
        .venv/bin/python bench/drain.py --burst --files 10000 --burst-quality off

Any other process (the benchmark itself, the report worker) is left alone.
"""

from __future__ import annotations

import os
import sys
import threading
import time


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f) if k in ("VmRSS", "VmHWM", "Threads")}


def _maps_kib() -> tuple[int, int]:
    """Resident KiB of the brk heap and of anonymous mappings (pymalloc arenas, thread arenas)."""
    heap = anon = 0
    name = None
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=6)
            if "-" in first[0] and not first[0].endswith(":"):
                name = first[5].strip() if len(first) > 5 else ""
            elif line.startswith("Rss:"):
                if name == "[heap]":
                    heap += int(first[1])
                elif name == "":
                    anon += int(first[1])
    return heap, anon


def _sqlite_mib() -> str:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("sqlite3")
    if name is None:
        return "?"
    lib = ctypes.CDLL(name)
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return f"{lib.sqlite3_memory_used() / 1048576:.1f}"


def _watch(out: str, traced: bool) -> None:
    import tracemalloc

    best = 0
    t0 = time.monotonic()
    with open(out + ".rss", "w") as log:
        for n in range(1 << 62):
            time.sleep(0.25)
            st = _status()
            line = f"{time.monotonic() - t0:.1f} rss={st.get('VmRSS')} hwm={st.get('VmHWM')} threads={st.get('Threads')}"
            if n % 4 == 0:
                heap, anon = _maps_kib()
                line += f" heap={heap // 1024}MiB anon={anon // 1024}MiB sqlite={_sqlite_mib()}MiB"
            if traced:
                current = tracemalloc.get_traced_memory()[0]
                line += f" traced={current / 1048576:.1f}MiB"
                if current > best * 1.05 and current > 15 * 1048576:
                    best = current
                    tracemalloc.take_snapshot().dump(out + ".snap")
                    line += " (snapshot)"
            log.write(line + "\n")
            log.flush()


if os.environ.get("DHW_TRACE_OUT") and sys.argv[:2] == ["-m", "run"]:
    _traced = os.environ.get("DHW_TRACE") == "tracemalloc"
    if _traced:
        import tracemalloc

        tracemalloc.start(8)
    threading.Thread(target=_watch, args=(os.environ["DHW_TRACE_OUT"], _traced), daemon=True).start()
