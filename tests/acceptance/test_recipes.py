"""Folder recipes, end to end: `dhwatch check`, and the real daemon finishing files per recipe."""

from __future__ import annotations

from pathlib import Path

from dhwatch.emulators.deephearing import DeepHearingEmulator
from tests.acceptance.test_ops_cli import dhwatch
from tests.conftest import Folders, write_config


def with_recipes(config: Path, text: str) -> Path:
    """Append ``[recipes.*]`` tables to a config the shared fixture wrote."""
    config.write_text(config.read_text() + "\n" + text)
    return config


def test_check_names_a_recipe_folder_missing_from_the_inbox(folders: Folders, emulator: DeepHearingEmulator) -> None:
    """check fails on a recipe folder that does not exist in the inbox, naming the recipe and the folder."""
    (folders.inbox / "podcast").mkdir(parents=True)
    config = with_recipes(write_config(folders, base_url=emulator.base_url),
                          '[recipes.podcast]\nfolders = ["podcast"]\n[recipes.broadcast]\nfolders = ["braodcast"]\n')
    result = dhwatch("check", config=config)
    assert result.returncode == 1, result.stdout
    assert "FAIL  recipe broadcast: folder 'braodcast' does not exist" in result.stdout
    assert "OK    recipe podcast: folder 'podcast' exists" in result.stdout


def test_check_refuses_overlapping_recipe_folders(folders: Folders, emulator: DeepHearingEmulator) -> None:
    """check refuses the config when two recipes claim one folder, naming both."""
    config = with_recipes(write_config(folders, base_url=emulator.base_url),
                          '[recipes.a]\nfolders = ["shows"]\n[recipes.b]\nfolders = ["shows"]\n')
    result = dhwatch("check", config=config)
    assert result.returncode == 2
    assert "'a'" in result.stdout and "'b'" in result.stdout and "shows" in result.stdout
