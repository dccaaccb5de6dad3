"""Folder recipes: what is done to a file is chosen by the inbox folder it is dropped in.

Pure: no I/O, no clock. A recipe is a named set of finishing settings (loudness, true-peak
ceiling, output format, sample rate, bit depth) plus optional per-folder denoiser, quality
and notification settings. :func:`recipe_for` finds the recipe of an inbox path (the deepest
matching folder wins); :func:`folder_problems` says what is wrong with the folders of a set of
recipes, naming the recipe and the folder. The settings a file got are snapshotted into the
ledger when it is taken (:meth:`Recipe.snapshot`), so a config change never alters a file in
flight.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

OutputFormat = Literal["same", "wav", "flac", "mp3", "ogg", "m4a"]
BackendName = Literal["deephearing", "local", "deepaffects"]
#: the default ceiling when a loudness target is set and no ceiling is (EBU R128 s1, streaming)
DEFAULT_TRUE_PEAK_DBTP = -1.0


class Recipe(BaseModel):
    """``[recipes.NAME]``: the settings of every file under ``folders``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: inbox-relative folders; every file anywhere under them
    folders: list[str] = Field(min_length=1)
    #: integrated loudness target (ITU-R BS.1770-4 / EBU R128); None = level untouched
    loudness_lufs: float | None = Field(None, ge=-70.0, le=-5.0)
    #: true-peak ceiling, 4x oversampled; None = DEFAULT_TRUE_PEAK_DBTP when a target is set
    true_peak_dbtp: float | None = Field(None, ge=-20.0, le=0.0)
    #: local engine: most noise removed, in dB; None = the [local] setting
    atten_lim_db: float | None = Field(None, gt=0, le=100)
    output_format: OutputFormat = "same"
    #: 0 = keep the rate
    sample_rate: int = Field(0, ge=0, le=384_000)
    #: 0 = keep; 16, 24 or 32 (float) for wav/flac
    bit_depth: Literal[0, 16, 24, 32] = 0
    #: another backend for this folder (built from its own section, e.g. ``[deephearing]``); None = the top-level one
    backend: BackendName | None = None
    #: None = the top-level ``quality``
    quality: Literal["local", "huawei", "off"] | None = None
    #: POST a JSON note here when a file of this recipe is done or failed; "" = the top-level one
    notify_url: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.sample_rate and not 8000 <= self.sample_rate:
            raise ValueError(f"sample_rate must be 0 (keep) or at least 8000 Hz, not {self.sample_rate}")
        if self.bit_depth and self.output_format not in ("wav", "flac", "same"):
            raise ValueError(f"bit_depth applies to wav and flac only, not output_format = {self.output_format!r}")
        if self.bit_depth == 32 and self.output_format == "flac":
            raise ValueError("bit_depth = 32 (float) cannot be stored in FLAC; use 16 or 24, or output_format = \"wav\"")
        if self.notify_url and not self.notify_url.startswith(("http://", "https://")):
            raise ValueError("notify_url must start with http:// or https://")
        return self

    @property
    def ceiling_dbtp(self) -> float:
        """The true-peak ceiling actually applied."""
        return DEFAULT_TRUE_PEAK_DBTP if self.true_peak_dbtp is None else self.true_peak_dbtp

    def snapshot(self) -> str:
        """The settings as JSON, recorded in the ledger when a file is taken."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_snapshot(cls, text: str) -> Recipe:
        """The settings a file was taken with (see :meth:`snapshot`)."""
        return cls.model_validate(json.loads(text))


@dataclass(frozen=True)
class Finish:
    """What the finishing step must do to a denoised file (plain data: it crosses to a worker process)."""

    loudness_lufs: float | None = None
    true_peak_dbtp: float = DEFAULT_TRUE_PEAK_DBTP
    output_format: str = "same"
    sample_rate: int = 0
    bit_depth: int = 0

    @property
    def needed(self) -> bool:
        """Whether the delivered file differs from the denoiser's result at all."""
        return (self.loudness_lufs is not None or self.output_format != "same" or self.sample_rate != 0
                or self.bit_depth != 0)  # fmt: skip

    @classmethod
    def of(cls, recipe: Recipe | None) -> Finish:
        if recipe is None:
            return cls()
        return cls(recipe.loudness_lufs, recipe.ceiling_dbtp, recipe.output_format, recipe.sample_rate,
                   recipe.bit_depth)  # fmt: skip


def output_suffix(fmt: str) -> str | None:
    """The extension an output format gives the delivered file; None for ``same``."""
    return None if fmt == "same" else f".{fmt}"


def normalized_folder(folder: str) -> str | None:
    """``podcast/`` → ``podcast``; None when the folder is absolute, empty, or climbs with ``..``."""
    text = folder.strip().replace("\\", "/")
    if not text or text.startswith("/") or "\0" in text:
        return None
    parts = [p for p in PurePosixPath(text).parts if p != "."]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def folder_problems(recipes: Mapping[str, Recipe]) -> list[str]:
    """Every problem with the recipes' folders, each naming the recipe and the folder."""
    problems: list[str] = []
    owner: dict[str, str] = {}
    for name, recipe in recipes.items():
        for folder in recipe.folders:
            norm = normalized_folder(folder)
            if norm is None:
                problems.append(f"recipes.{name}.folders: {folder!r} must be a folder inside the inbox, given "
                                "relative to it (not absolute, no '..')")  # fmt: skip
                continue
            if norm in owner:
                other = owner[norm]
                where = "twice in this recipe" if other == name else f"in both recipes {other!r} and {name!r}"
                problems.append(f"recipes.{name}.folders: {folder!r} is listed {where}; a folder belongs to one recipe")
                continue
            owner[norm] = name
    return problems


def recipe_for(rel_path: str, recipes: Mapping[str, Recipe]) -> tuple[str, Recipe] | None:
    """The recipe of an inbox file: the one whose folder is the deepest ancestor of it, or None."""
    parents = PurePosixPath(rel_path).parents
    best: tuple[int, str, Recipe] | None = None
    for name, recipe in recipes.items():
        for folder in recipe.folders:
            norm = normalized_folder(folder)
            if norm is None:
                continue
            depth = norm.count("/") + 1
            if PurePosixPath(norm) in parents and (best is None or depth > best[0]):
                best = (depth, name, recipe)
    return None if best is None else (best[1], best[2])


def backend_of(recipe: Recipe | None, default: str) -> str:
    """The backend that denoises a recipe's files: its own ``backend``, else the top-level one."""
    return default if recipe is None or recipe.backend is None else recipe.backend


def backends_in_use(default: str, recipes: Mapping[str, Recipe]) -> list[str]:
    """Every backend the daemon must run for new files: the top-level one first, then the recipes' own."""
    names = [default]
    for recipe in recipes.values():
        name = backend_of(recipe, default)
        if name not in names:
            names.append(name)
    return names


def recipes_using(backend: str, default: str, recipes: Mapping[str, Recipe]) -> list[str]:
    """Who sends new files to ``backend``, in words: ``recipe podcast``, ``files under no recipe``."""
    users = [f"recipe {name}" for name, recipe in recipes.items() if backend_of(recipe, default) == backend]
    return users + (["files under no recipe"] if backend == default else [])


def denoise_key(backend: str, atten_lim_db: float | None, default_atten_lim_db: float) -> str:
    """What identical content must share for one denoising to serve both files ("" = the defaults)."""
    if backend == "local" and atten_lim_db is not None and atten_lim_db != default_atten_lim_db:
        return f"atten_lim_db={atten_lim_db:g}"
    return ""


def describe(recipe: Recipe) -> dict[str, Any]:
    """The settings a person would want to read back (for ``show`` and reports)."""
    return {k: v for k, v in recipe.model_dump(mode="json").items() if v not in (None, "", 0, "same")}
