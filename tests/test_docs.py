"""The commands the README shows are ones the CLI accepts, with files that exist."""
import re
import shlex
from pathlib import Path

import pytest
import typer
import typer.main

from rep_pipeline.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[list[str]]:
    """Every `rep-pipeline ...` line of the README's bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if "rep-pipeline " in line:
                commands.append(shlex.split(line[line.index("rep-pipeline "):], comments=True))
    return commands


def _parse(args: list[str]):
    """Parse ``args`` as the CLI would, down to the subcommand, without running it: options,
    their types and choices, required ones. Errors are typer's (its own click underneath)."""
    command = typer.main.get_command(app)
    while hasattr(command, "commands"):  # a group: step into the named subcommand
        name, args = args[0], args[1:]
        if name not in command.commands:
            raise typer.TyperException(f"no such command {name!r}")
        command = command.commands[name]
    return command.make_context(command.name, list(args))


def test_readme_shows_the_main_commands():
    shown = {tuple(c[1:3]) if c[1] == "store" else c[1] for c in _readme_commands()}
    assert {"run", "extract", "cluster", "evaluate", "report", "query", "models", ("store", "info")} <= shown


@pytest.mark.parametrize("command", _readme_commands(), ids=lambda c: " ".join(c[1:3]))
def test_readme_command_parses_and_names_existing_configs(command):
    parsed = _parse(command[1:])
    assert parsed.command.name == (command[2] if command[1] == "store" else command[1])
    for arg in command[1:]:
        if arg.startswith("configs/"):
            assert (ROOT / arg).is_file(), arg


def test_the_parse_catches_a_misspelt_option():
    with pytest.raises(typer.TyperException, match="--modle"):
        _parse(["extract", "--modle", "tiny-vit", "--store", "x.zarr"])
    with pytest.raises(typer.TyperException, match="stor"):
        _parse(["stor", "info", "x.zarr"])
    with pytest.raises(typer.TyperException, match="store"):  # a required option left out
        _parse(["extract", "--model", "tiny-vit"])
    assert _parse(["store", "info", "x.zarr"]).command.name == "info"
