"""Memory of the production DeepHearing service while a big file goes up and comes back down.

The issue asks that a multi-GB upload or download never sit in memory. This runs the real
servers as subprocesses and samples their resident memory (VmRSS, every 20 ms) while:

1. a ``--mib`` MiB file is POSTed to ``dhwatch serve``'s /enhance (streamed by httpx). The
   file has a WAV magic but an unreadable header, so the service spools all of it, then
   refuses it with INVALID_FILE: the whole upload path runs, the engine does not;
2. the same file is downloaded as a job's result from the same service code (the DeepHearing
   emulator, in its own process, with a processor that hands the input back).

Prints the throughput and the server's RSS before and at its peak for each. Run from the
repository root::

    .venv/bin/python bench/serve_memory.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

KEY = "bench-key"
CHUNK = 1 << 20

EMULATOR = """
import shutil, sys, time
from pathlib import Path
from dhwatch.emulators.deephearing import DeepHearingEmulator, ProcessedFile

def same(src, out, name):
    dst = out / name
    shutil.copyfile(src, dst)
    return ProcessedFile(dst, 0.0)

with DeepHearingEmulator(keys={sys.argv[1]}, processor=same, validator=lambda p: None) as emu:
    print(emu.base_url, flush=True)
    sys.stdin.read()
"""


def rss_mib(pid: int) -> float:
    """The process's resident memory now, in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else 0.0


class Sampler:
    """The peak RSS of one process while a block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_mib(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid))


def big_file(path: Path, mib: int) -> int:
    """``mib`` MiB that sniff as WAV but no decoder can read (so serve refuses it after spooling it)."""
    head = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40
    block = bytes(range(256)) * (CHUNK // 256)
    with open(path, "wb") as f:
        f.write(head)
        for _ in range(mib):
            f.write(block)
    return path.stat().st_size


def multipart(path: Path, boundary: str) -> Iterator[bytes]:
    """One file part, streamed from disk."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"f0\"; filename=\"big.wav\"\r\n"
           "Content-Type: audio/wav\r\n\r\n").encode()  # fmt: skip
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            yield data
    yield f"\r\n--{boundary}--\r\n".encode()


def upload(base_url: str, path: Path) -> tuple[httpx.Response, float]:
    boundary = "benchboundary7f3a"
    headers = {"Authorization": KEY, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    t0 = time.monotonic()
    response = httpx.post(f"{base_url}/enhance", content=multipart(path, boundary), headers=headers, timeout=600)
    return response, time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        src = root / "big.wav"
        mb = big_file(src, args.mib) / 1e6
        keys = root / "keys"
        keys.write_text(KEY + "\n")

        serve = subprocess.Popen(
            [sys.executable, "-m", "dhwatch", "serve", "--keys-file", str(keys), "--port", "0", "--workers", "1",
             "--workdir", str(root / "serve")],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert serve.stdout is not None
            base = re.search(r"API on (http://\S+),", serve.stdout.readline())
            assert base, "dhwatch serve did not start"
            with Sampler(serve.pid) as sampled:
                response, seconds = upload(base.group(1), src)
            code = response.json().get("error", {}).get("code")
            print(f"upload to dhwatch serve: {mb:.0f} MB in {seconds:.1f} s ({mb / seconds:.0f} MB/s), answer {code}; "
                  f"serve RSS {sampled.before:.0f} MiB before, peak {sampled.peak:.0f} MiB")  # fmt: skip
        finally:
            serve.terminate()
            serve.wait(30)

        emulator = subprocess.Popen([sys.executable, "-c", EMULATOR, KEY], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert emulator.stdout is not None and emulator.stdin is not None
            base_url = emulator.stdout.readline().strip()
            response, _ = upload(base_url, src)
            job = response.json()["f0"]
            with httpx.Client(timeout=600) as client:
                status: dict[str, str] = {}
                for _ in range(600):
                    status = client.get(f"{base_url}/stat/jobs/{job}", headers={"Authorization": KEY}).json()
                    if "result" in status:
                        break
                    time.sleep(0.5)
                got = 0
                with Sampler(emulator.pid) as sampled:
                    t0 = time.monotonic()
                    with client.stream("GET", status["result"]) as answer:
                        for data in answer.iter_bytes(CHUNK):
                            got += len(data)
                    seconds = time.monotonic() - t0
            print(f"download of the result: {got / 1e6:.0f} MB in {seconds:.1f} s ({got / 1e6 / seconds:.0f} MB/s); "
                  f"server RSS {sampled.before:.0f} MiB before, peak {sampled.peak:.0f} MiB")  # fmt: skip
        finally:
            emulator.stdin.close() if emulator.stdin else None
            emulator.terminate()
            emulator.wait(30)


if __name__ == "__main__":
    main()
