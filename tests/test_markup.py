"""Text a user typed or named (paths, chat input, profile fields) is printed as it is, never as rich markup."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import offload
from tests.test_chat_pty import slow_baby  # noqa: F401  (a fixture)
from tests.test_cli_generate import offload_here

DEMO = Path(offload.__file__).parent / "demo"


@pytest.fixture(autouse=True)
def _wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # tables keep each cell on one line


def one_line(text: str) -> str:
    """Output with rich's line wrapping undone (its console is 80 columns wide off a terminal)."""
    return text.replace("\n", "")


def test_chat_prints_bracketed_input_as_typed(
    slow_baby: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes [draft] :smile:.json"  # neither markup nor an emoji code
    lines = f"Hi\n/x[/red]\n/load [/b].json\n/save {notes}\n/load {notes}\n".encode()
    args = ["chat", "--model", str(slow_baby), "--dtype", "float32", "--max-new-tokens", "2"]
    code, stdout, err = offload_here(monkeypatch, capfd, *args, stdin=lines)
    assert code == 0, err
    shown = one_line(stdout)
    assert "unknown command /x[/red]" in shown
    assert "error: [/b].json: no such chat file" in shown
    assert f"saved to {notes}" in shown
    assert f"loaded 2 messages from {notes}" in shown
    assert notes.is_file()


def test_bracketed_paths_in_tables_and_summaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    model = tmp_path / "[red]m[/b]"  # a directory "[red]m[" holding "b]"
    shutil.copytree(DEMO, model)
    code, stdout, err = offload_here(monkeypatch, capfd, "plan", "--model", str(model))
    assert code == 0, err
    assert str(model) in one_line(stdout)

    out = tmp_path / "out [/i]"
    code, stdout, err = offload_here(monkeypatch, capfd, "convert", str(model), str(out), "--profile", "cpu")
    assert code == 0, err
    # The title wraps at the table's width: compare without whitespace.
    assert "".join(f"{model} -> {out}".split()) in "".join(stdout.split())

    trace = tmp_path / "t.trace"
    args = ["trace", "record", str(trace), "--model", str(model), "--max-new-tokens", "2"]
    code, _, err = offload_here(monkeypatch, capfd, *args)
    assert code == 0, err
    assert "b]: dense weights" in err  # the loading summary names the model directory
    code, stdout, err = offload_here(monkeypatch, capfd, "trace", "replay", str(trace))
    assert code == 0, err
    assert "b]: 2 steps" in one_line(stdout)


def test_profile_fields_print_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    home = tmp_path / "home"
    (home / "profiles").mkdir(parents=True)
    text = (DEMO.parent.parent / "profiles" / "cpu.toml").read_text()
    mine = text.replace('name = "cpu"', 'name = "mine"', 1).replace(
        'description = "', 'description = "[/b] my [i]own[/i] ', 1
    )
    (home / "profiles" / "mine.toml").write_text(mine)
    (home / "profiles" / "[b]broken.toml").write_text("not toml")
    monkeypatch.setenv("OFFLOAD_HOME", str(home))
    code, stdout, err = offload_here(monkeypatch, capfd, "profiles", "list")
    assert code == 0, err
    assert "[/b] my [i]own[/i]" in stdout and "[b]broken" in stdout
