"""Docs cannot drift: every setting the server reads and every CLI command is in README.md."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from adiuva_server.cli import app

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
SETTING = re.compile(r'"((?:ADIUVA|JWT|CORS|LLM|STRIPE|OLLAMA|LITELLM|S3|AWS|REDIS)_[A-Z0-9_]+|ENV|DATABASE_URL)"')


def settings_read_by_the_code() -> set[str]:
    names = set()
    for path in (REPO / "adiuva_server").rglob("*.py"):
        names |= set(SETTING.findall(path.read_text()))
    return names - {"LITELLM_LOCAL_MODEL_COST_MAP"}  # set by the server itself, not a setting


def test_every_setting_is_documented():
    missing = sorted(n for n in settings_read_by_the_code() if f"`{n}`" not in README)
    assert not missing, f"settings missing from README.md: {missing}"


def test_every_cli_command_is_documented():
    commands = []

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, prefix + [name])
            else:
                commands.append(" ".join(prefix + [name]))

    walk(typer.main.get_command(app), ["adiuva"])
    missing = [c for c in commands if c not in README]
    assert not missing, f"CLI commands missing from README.md: {missing}"


def test_readme_opens_with_the_two_command_lines():
    lines = README.splitlines()
    assert lines[2] == "```", "the README opens with a code block"
    code = lines[3:lines.index("```", 3)]
    assert len(code) == 2 and code[0].endswith("adiuva serve") and code[1].endswith("pytest")
    # CI runs exactly the README's test line.
    assert code[1] in (REPO / ".ci" / "run").read_text().splitlines()
