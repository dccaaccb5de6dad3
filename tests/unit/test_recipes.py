"""Folder recipes: parsing, validation naming the recipe and folder, matching (deepest folder wins)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dhwatch.config import load_settings
from dhwatch.errors import ConfigError
from dhwatch.recipes import Finish, Recipe, recipe_for

FOLDERS = """\
inbox = "in"
outbox = "out"
failed_dir = "failed"
state_dir = "state"
on_success = "keep"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DHWATCH_* variable from the caller's environment leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("DHWATCH_"):
            monkeypatch.delenv(name)


def load(tmp_path: Path, recipes: str) -> object:
    path = tmp_path / "dhwatch.toml"
    path.write_text(FOLDERS + recipes)
    return load_settings(path)


def load_error(tmp_path: Path, recipes: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, recipes)
    return str(info.value)


def test_every_contract_key_is_accepted(tmp_path: Path) -> None:
    """A recipe with every documented key loads, and a top-level notify_url too."""
    settings = load(tmp_path, """
notify_url = "http://127.0.0.1:9/all"
[recipes.podcast]
folders = ["podcast"]
loudness_lufs = -16.0
true_peak_dbtp = -1.0
atten_lim_db = 100.0
output_format = "flac"
sample_rate = 0
bit_depth = 24
backend = "deephearing"
quality = "local"
notify_url = ""
""")
    recipe = settings.recipes["podcast"]  # type: ignore[attr-defined]
    assert recipe.loudness_lufs == -16.0 and recipe.output_format == "flac" and recipe.bit_depth == 24
    assert settings.notify_url == "http://127.0.0.1:9/all"  # type: ignore[attr-defined]


def test_unknown_key_is_named(tmp_path: Path) -> None:
    """A misspelt key in a recipe is refused, naming the recipe and the key."""
    message = load_error(tmp_path, '[recipes.podcast]\nfolders = ["podcast"]\nloudness = -16\n')
    assert "recipes.podcast.loudness" in message and "unknown key" in message


def test_same_folder_in_two_recipes_is_refused(tmp_path: Path) -> None:
    """One folder claimed by two recipes is refused, naming both and the folder."""
    message = load_error(tmp_path, '[recipes.a]\nfolders = ["shows"]\n[recipes.b]\nfolders = ["shows/"]\n')
    assert "'a'" in message and "'b'" in message and "shows" in message


@pytest.mark.parametrize("folder", ["/srv/inbox/podcast", "../elsewhere", "podcast/../../x", ""])
def test_folder_outside_the_inbox_is_refused(tmp_path: Path, folder: str) -> None:
    """Absolute folders, and folders that climb out with '..', are refused, naming the recipe."""
    message = load_error(tmp_path, f'[recipes.podcast]\nfolders = ["{folder}"]\n')
    assert "recipes.podcast.folders" in message


def test_bit_depth_needs_a_pcm_format(tmp_path: Path) -> None:
    """bit_depth with mp3 output is refused: it means nothing there."""
    message = load_error(tmp_path, '[recipes.p]\nfolders = ["p"]\noutput_format = "mp3"\nbit_depth = 24\n')
    assert "bit_depth" in message


def test_deepest_folder_wins() -> None:
    """A file in a nested folder gets the recipe of the deepest folder that contains it."""
    recipes = {"shows": Recipe(folders=["shows"]), "adr": Recipe(folders=["shows/adr"], loudness_lufs=-23)}
    assert recipe_for("shows/adr/line1.wav", recipes) == ("adr", recipes["adr"])
    assert recipe_for("shows/adr/deeper/line1.wav", recipes) == ("adr", recipes["adr"])
    assert recipe_for("shows/ep1.wav", recipes) == ("shows", recipes["shows"])
    assert recipe_for("showsX/ep1.wav", recipes) is None
    assert recipe_for("ep1.wav", recipes) is None


def test_snapshot_round_trips() -> None:
    """The settings recorded in the ledger give back the same recipe."""
    recipe = Recipe(folders=["p"], loudness_lufs=-16, output_format="flac", bit_depth=24)
    assert Recipe.from_snapshot(recipe.snapshot()) == recipe


def test_ceiling_defaults_when_a_target_is_set() -> None:
    """With a loudness target and no ceiling, the ceiling is -1 dBTP."""
    assert Finish.of(Recipe(folders=["p"], loudness_lufs=-16)).true_peak_dbtp == -1.0
    assert not Finish.of(Recipe(folders=["p"], notify_url="http://x/")).needed


def test_a_recipe_asking_for_huawei_reports_needs_the_huawei_keys(tmp_path: Path) -> None:
    """quality = "huawei" in one recipe is refused at start without a project id, naming the key."""
    from dhwatch.config import require_quality_settings

    settings = load(tmp_path, '[recipes.p]\nfolders = ["p"]\nquality = "huawei"\n')
    with pytest.raises(ConfigError, match="huawei.project_id"):
        require_quality_settings(settings)  # type: ignore[arg-type]


def test_a_recipes_own_backend_is_in_use_and_needs_its_key(tmp_path: Path) -> None:
    """A recipe naming another backend than the top level's is accepted; the daemon then needs that backend's
    key (named in the error) and no key of a backend nobody uses."""
    from dhwatch.config import Settings, require_api_key

    settings = load(tmp_path, 'backend = "local"\n[recipes.podcast]\nfolders = ["podcast"]\nbackend = "deephearing"\n'
                               '[recipes.plain]\nfolders = ["plain"]\n')  # fmt: skip
    assert isinstance(settings, Settings)
    assert settings.backends_in_use() == ["local", "deephearing"]
    with pytest.raises(ConfigError) as info:
        require_api_key(settings)
    assert "deephearing.api_key" in str(info.value) and "deepaffects" not in str(info.value)
    require_api_key(settings, "local")  # the local engine needs none


def test_who_uses_a_backend_is_said_in_words() -> None:
    """The pause text names the recipes that send files to a backend, and the files under no recipe."""
    from dhwatch.recipes import backend_of, recipes_using

    recipes = {"podcast": Recipe(folders=["podcast"], backend="deephearing"), "roomtone": Recipe(folders=["room"])}
    assert backend_of(recipes["roomtone"], "local") == "local" and backend_of(None, "local") == "local"
    assert recipes_using("deephearing", "local", recipes) == ["recipe podcast"]
    assert recipes_using("local", "local", recipes) == ["recipe roomtone", "files under no recipe"]
