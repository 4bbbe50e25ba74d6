"""The README and docs/: what they show still works. Every relative link resolves, every Python block
compiles (and those marked `<!-- test: runs -->` run), every `irr ...` command parses with the CLI's own
parser, every `python <script>.py` names a script that exists, and the README's test command is the one
CI runs (`.ci/run`). `ruff format --check .` checks the Python blocks' style as well."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
RUNS = "<!-- test: runs -->"
LINK = re.compile(r"\]\(([^)\s]+)\)")
SCRIPT = re.compile(r"\bpython (?:-u )?([\w./-]+\.py)\b")


def _blocks(page: Path, language: str) -> list[tuple[str, bool]]:
    """(code, marked to run) of every fenced block in `language`."""
    text = page.read_text(encoding="utf-8")
    return [
        (m.group(2), text[: m.start()].rstrip().endswith(RUNS)) for m in FENCE.finditer(text) if m.group(1) == language
    ]


def _shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at `&&`, `;`
    and `|`; leading `VAR=value` assignments and the brackets around optional flags (`[--x 1]`) removed."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        current: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", ";", "|", "do", "then"):
                while current and re.fullmatch(r"[A-Z_]+=\S*", current[0]):
                    current.pop(0)
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token.strip("[]").rstrip(";"))
    return commands


def test_the_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 15 * 1024, "README.md over 15 KB: move the details to docs/ (docs/README.md)"
    assert text.count("<!-- suite-table -->") == 1 and text.count("<!-- /suite-table -->") == 1  # swapped by the suite


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name if p == README else f"docs/{p.name}")
def test_every_relative_link_resolves(page):
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: broken link {target}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name if p == README else f"docs/{p.name}")
def test_python_blocks_compile_and_marked_ones_run(page):
    for number, (code, runs) in enumerate(_blocks(page, "python")):
        compiled = compile(code, f"{page.name}, python block {number}", "exec")
        if runs:
            exec(compiled, {"__name__": f"{page.stem}_block_{number}"})


def test_every_irr_command_shown_parses_and_every_script_exists():
    from irr_callback.cli import build_parser

    parser = build_parser()
    parsed = 0
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for code in [c for language in ("bash", "sh", "shell", "console") for c, _ in _blocks(page, language)]:
            for command in _shell_commands(code):
                if command[0] == "irr":
                    try:
                        parser.parse_args(command[1:])
                    except SystemExit:
                        pytest.fail(f"{page.name}: `{shlex.join(command)}` does not parse (see stderr)")
                    parsed += 1
        for script in SCRIPT.findall(text):
            assert (ROOT / script).is_file(), f"{page.name}: `python {script}`: no such script"
    assert parsed >= 10  # the README's and docs/cli.md's commands were found


def test_the_readme_test_command_is_what_ci_runs():
    commands = [
        line.split("#")[0].strip()
        for code, _ in _blocks(README, "bash")
        for line in code.splitlines()
        if "python -m pytest" in line
    ]
    assert commands, "the README shows no test command"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert commands[0] in ci, f"README's test command is not a line of .ci/run: {commands[0]}"
