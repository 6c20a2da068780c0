"""README's set-up commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_readme_test_command_verbatim():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_cmds = [b for b in blocks if "pytest" in b]
    assert test_cmds, "README must give a test command in a bash block"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmds[0] in ci_lines, f"{test_cmds[0]!r} must appear in .ci/run as written"


def test_readme_main_command_names_existing_tool():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main = blocks[0]
    for script in re.findall(r"python (tools/\S+\.py)", main):
        assert (ROOT / script).is_file(), f"README's main command runs missing {script}"
