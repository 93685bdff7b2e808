"""The home's layout (``safehaven.core.home``): a folder it keeps cannot be stood in for."""

from __future__ import annotations

from pathlib import Path

import pytest

from safehaven.core.home import Home, HomeError


@pytest.mark.parametrize("stand_in", ["dangling link", "file"])
def test_a_link_to_nothing_or_a_file_where_the_home_keeps_a_folder_is_refused_in_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stand_in: str
) -> None:
    """``releases/`` as a link to a folder that is not there (an operator's mount gone) or as a
    file: every command stopped with the OS's FileExistsError and a traceback (found by review);
    it is refused in one line that names the folder and says what to do."""
    from click.testing import CliRunner

    from safehaven.cli.main import main

    home = Home(tmp_path / "haven")
    home.root.mkdir()
    if stand_in == "file":
        home.releases.write_text("not a folder\n")
    else:
        home.releases.symlink_to(tmp_path / "unmounted")
    with pytest.raises(HomeError, match="releases is .*Make it a folder"):
        home.ensure()
    monkeypatch.setenv("SAFEHAVEN_HOME", str(home.root))
    done = CliRunner().invoke(main, ["dispose", "--resume"])
    assert done.exit_code != 0 and "Make it a folder" in done.output
    assert not isinstance(done.exception, (FileExistsError, HomeError)), "refused in words, not raised"


def test_the_homes_folders_are_made_private(tmp_path: Path) -> None:
    home = Home(tmp_path / "haven").ensure()
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in (home.incoming, home.releases, home.keys))
