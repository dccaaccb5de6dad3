"""Shared by the benchmarks: folders, a config, the real daemon as a subprocess, its peak RSS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


def write_config(root: Path, base_url: str, key: str, **top: Any) -> Path:
    """A config under ``root`` for a benchmark daemon; ``top`` overrides top-level keys,
    ``deephearing__x`` keys go to the [deephearing] section."""
    section = {k.split("__", 1)[1]: v for k, v in top.items() if k.startswith("deephearing__")}
    top = {k: v for k, v in top.items() if not k.startswith("deephearing__")}
    base = {
        "inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "failed_dir": str(root / "failed"),
        "archive_dir": str(root / "archive"), "state_dir": str(root / "state"), "backend": "deephearing",
        "settle_seconds": 0.0, "log_format": "json", "log_level": "info", "quality": "off",
    }  # fmt: skip
    base.update(top)
    dh = {"base_url": base_url, "api_key": key, "poll_interval": 0.05, "poll_max_interval": 0.2, "read_timeout": 600}
    dh.update(section)
    lines = [f"{k} = {json.dumps(v)}" for k, v in base.items()] + ["[deephearing]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in dh.items()]
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    path = root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(pid: int) -> float:
    """The resident set size of ``pid`` and all its descendants now (VmRSS summed), in MiB."""
    return tree_memory_mb(pid)[0]


def tree_memory_mb(pid: int) -> tuple[float, float, float]:
    """``pid`` and all its descendants now, in MiB: RSS summed, ``pid``'s own RSS, PSS summed.

    PSS (``smaps_rollup``) counts a page shared by two processes half in each, where the
    RSS sum counts it twice (the Python binary, libc, libssl...); issue 12's target is RSS.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    total_kib, own_kib, pss_kib, todo = 0, 0, 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
                    own_kib += int(line.split()[1]) if p == pid else 0
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss_kib += int(line.split()[1])
        except OSError:
            pass
    return total_kib / 1024, own_kib / 1024, pss_kib / 1024


class Daemon:
    """``dhwatch run`` in a subprocess, counting log events as they arrive.

    ``source``: run the dhwatch package found in that folder instead of the installed one
    (to compare a baseline checkout with this one in the same run). The peak RSS of the
    daemon's whole process tree (workers included) is sampled every 100 ms.
    """

    def __init__(self, config: Path, source: Path | None = None) -> None:
        env = dict(os.environ)
        if source is not None:
            env["PYTHONPATH"] = str(source)
        # run from ``source``: ``python -m`` puts the working directory first on sys.path, so
        # started from a checkout's root the "baseline" would silently be that checkout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dhwatch", "run", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=str(source) if source is not None else None,
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self.tree_peak_mb = 0.0
        #: the daemon process's own peak RSS, and the tree's PSS when its RSS peaked
        self.daemon_peak_mb = 0.0
        self.tree_pss_at_peak_mb = 0.0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while self.proc.poll() is None:
            rss, own, pss = tree_memory_mb(self.proc.pid)
            self.daemon_peak_mb = max(self.daemon_peak_mb, own)
            if rss > self.tree_peak_mb:
                self.tree_peak_mb, self.tree_pss_at_peak_mb = rss, pss
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["_t"] = time.monotonic()
            self.events.append(event)
            name = str(event.get("event"))
            self.counts[name] = self.counts.get(name, 0) + 1

    def count(self, event: str) -> int:
        return self.counts.get(event, 0)

    def wait(self, event: str, n: int, timeout: float) -> float:
        """Wait until ``n`` events named ``event`` arrived; returns the time it took."""
        t0 = time.monotonic()
        while self.count(event) < n:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"only {self.count(event)}/{n} {event} after {timeout}s")
            time.sleep(0.02)
        return time.monotonic() - t0

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.proc.pid)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the daemon process itself has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        self._thread.join(5)


def small_wav_bytes(seconds: float = 0.1, sr: int = 16000) -> bytes:
    """A short real WAV file's bytes."""
    import io

    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def unique_copies(folder: Path, n: int, data: bytes, suffix: str = ".wav") -> None:
    """``n`` files of distinct content (one trailing byte differs) so none is deduplicated."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"f{i:05d}{suffix}").write_bytes(data + i.to_bytes(4, "little"))


def os_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
