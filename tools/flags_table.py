"""Print the README's flag tables from the scripts' own argparse definitions, one table per argument group.

    python tools/flags_table.py > /tmp/flags.md      # then paste into README.md's "Flags" section
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import erpd_rounds  # noqa: E402
import erpd_stage1  # noqa: E402
import erpd_stage2  # noqa: E402
import eval_math  # noqa: E402


def parser_of(module) -> argparse.ArgumentParser:
    """The module's parser, caught as parse_args builds it."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        return original(self, [], namespace)
    argparse.ArgumentParser.parse_args = capture
    try:
        module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def default_text(action) -> str:
    value = action.default
    if isinstance(value, str) and value.startswith(str(ROOT)):
        value = str(Path(value).relative_to(ROOT))
    return f"`{value}`"


def table(module, name: str) -> str:
    lines = [f"**{name}**", ""]
    for group in parser_of(module)._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        title = "general" if group.title in ("options", "optional arguments") else group.title
        lines += [f"*{title}*", "", "| flag | default | meaning |", "|---|---|---|"]
        for a in actions:
            meaning = (a.help or "").replace("|", "\\|")
            if a.choices:
                meaning += f" ({' / '.join(map(str, a.choices))})"
            lines.append(f"| `{a.option_strings[-1]}` | {default_text(a)} | {meaning.strip()} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    for module, name in ((erpd_stage1, "erpd_stage1.py"), (erpd_stage2, "erpd_stage2.py"),
                         (eval_math, "eval_math.py"), (erpd_rounds, "erpd_rounds.py")):
        print(table(module, name))
