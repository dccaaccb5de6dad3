"""Spectrogram images for the file page, made on demand by a worker process and cached.

The daemon never decodes audio from the share itself (native decoders run in workers), so
an image that is not cached yet is made by a short-lived child, ``python -m
dhwatch.web.spectrograms``, at the lowest CPU priority, one at a time. The child calls
the renderer (``dhwatch.quality.spectrogram.render_spectrogram(audio_path, png_path, *,
width, height)``) on the very file the daemon opened and checked (see
:func:`dhwatch.web.media.open_inside`): it inherits that descriptor and reads
``/proc/self/fd/N``, so no path is opened twice. The image is written under a temporary
name and renamed into ``state_dir/web/spectrograms/<id>-<side>.png`` when complete.

Until the renderer exists in this installation, no child is started and the page answers
404 for an image not in the cache. A file that cannot be rendered is not tried again
until the daemon restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from dhwatch.naming import TEMP_PREFIX, TEMP_SUFFIX

#: the renderer, as ``module:function`` (another module of dhwatch's)
RENDERER = "dhwatch.quality.spectrogram:render_spectrogram"
WIDTH, HEIGHT = 900, 256
#: a render taking longer than this is given up (the file is hours long, or the worker hangs)
RENDER_TIMEOUT = 300.0


class SpectrogramMaker:
    """Makes missing images, one worker at a time; two requests for one image share its worker."""

    def __init__(self, renderer: str = RENDERER, timeout: float = RENDER_TIMEOUT) -> None:
        self.renderer = renderer
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._making: dict[Path, asyncio.Task[bool]] = {}
        self._failed: set[Path] = set()
        self._children: set[asyncio.subprocess.Process] = set()

    @property
    def available(self) -> bool:
        """Whether the renderer is installed (looked up without importing it)."""
        module = self.renderer.split(":", 1)[0]
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    async def make(self, fd: int, target: Path) -> bool:
        """Render the audio open as ``fd`` into ``target``; True once ``target`` exists. Closes ``fd``."""
        if target in self._failed or not self.available:
            os.close(fd)
            return False
        running = self._making.get(target)
        if running is not None:
            os.close(fd)
            return await asyncio.shield(running)
        task = asyncio.create_task(self._render(fd, target))
        self._making[target] = task
        return await asyncio.shield(task)  # a browser that leaves does not waste the work

    async def _render(self, fd: int, target: Path) -> bool:
        try:
            async with self._lock:
                ok = await self._run_child(fd, target)
        finally:
            os.close(fd)
            self._making.pop(target, None)
        if not ok:
            self._failed.add(target)
        return ok

    async def _run_child(self, fd: int, target: Path) -> bool:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a temporary name that still ends in .png: a renderer may choose the format by the extension
        temp = target.with_name(f"{TEMP_PREFIX}{target.stem}{TEMP_SUFFIX}{target.suffix}")
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dhwatch.web.spectrograms", self.renderer, f"/proc/self/fd/{fd}", str(temp),
            pass_fds=(fd,), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self._children.add(child)
        try:
            code = await asyncio.wait_for(child.wait(), self.timeout)
        except TimeoutError:
            child.kill()
            await child.wait()
            code = -1
        finally:
            self._children.discard(child)
        if code == 0 and temp.is_file():
            os.replace(temp, target)
            return True
        with contextlib.suppress(OSError):
            temp.unlink()
        return False

    async def aclose(self) -> None:
        """Kill any worker (a stop never waits for an image) and forget the work in progress."""
        for child in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        for task in list(self._making.values()):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._making.values(), return_exceptions=True)


def main(argv: list[str]) -> int:
    """The worker: ``python -m dhwatch.web.spectrograms MODULE:FUNCTION AUDIO PNG``."""
    from dhwatch.childprocess import die_with_parent, lower_priority

    renderer, audio, png = argv
    die_with_parent()  # an orphan would render for nobody
    lower_priority()
    module, _, function = renderer.partition(":")
    render = getattr(importlib.import_module(module), function)
    render(Path(audio), Path(png), width=WIDTH, height=HEIGHT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
