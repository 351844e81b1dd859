"""atomic_directory: a model directory appears whole or not at all, and a finished one is never clobbered."""

import os
from pathlib import Path

import pytest

from vita.paths import atomic_directory, vita_home


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}-")]


def test_published_only_on_a_clean_exit(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    with atomic_directory(target) as staging:
        assert staging.parent == target.parent and staging.is_dir() and not target.exists()
        (staging / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}"
    assert _leftovers(target.parent, "m") == []
    # As mkdir makes a directory (0755 under umask 022), not mkdtemp's 0700 (a new user's try, 2026-12-06: a
    # model directory that only its creator could read)
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_failure_leaves_the_old_directory_and_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target, overwrite=True) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("half-way")
    assert [p.name for p in target.iterdir()] == ["old"]
    assert _leftovers(tmp_path, "m") == []


def test_a_finished_directory_is_kept_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "m"
    with atomic_directory(target) as staging:
        (staging / "config.json").write_text("first")
        # Another process publishes the same thing meanwhile: its copy wins, ours is dropped.
        target.mkdir()
        (target / "config.json").write_text("theirs")
    assert (target / "config.json").read_text() == "theirs"
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "config.json").write_text("second")
    assert (target / "config.json").read_text() == "second"
    assert _leftovers(tmp_path, "m") == []


def test_an_unfinished_directory_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "partial.safetensors").write_text("junk")  # no marker: not a finished model
    with atomic_directory(target) as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]


def test_vita_home_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VITA_HOME", str(tmp_path))
    assert vita_home() == tmp_path
    monkeypatch.delenv("VITA_HOME")
    assert vita_home() == Path.home() / ".cache" / "vita"
