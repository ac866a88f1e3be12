"""The README's usage snippet runs as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_snippet_runs():
    text = README.read_text()
    usage = text.split("## Usage", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    assert "import pwlu" in snippet
    exec(compile(snippet, str(README), "exec"), {})


def test_readme_first_commands_are_demo_and_test():
    commands = re.findall(r"^make (\w+)", README.read_text(), re.M)
    assert commands[:2] == ["demo", "test"]
