"""Every failpoint in the code has a crash test, and the README's table "What happens if it dies
here" lists exactly the failpoints the code has: a new step that writes data without a crash
test, or a table that drifted from the code, fails the suite."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dataops.failpoints import FAILPOINT_EXIT, _parse

REPO = Path(__file__).resolve().parent.parent
CODE = ["dataops", "tasks", "flows", "deployments", "cli", "dev"]


def crash_tested() -> set[str]:
    """The failpoints the crash tests kill at: the CELLS list of every tests/test_crash_*.py."""
    import importlib

    cells: set[str] = set()
    for path in sorted(Path(__file__).parent.glob("test_crash_*.py")):
        cells |= set(importlib.import_module(path.stem).CELLS)
    return cells


def failpoints_in_code() -> set[str]:
    """The literal failpoint("area.step") calls, and the swap's f"{step}.between_renames" expanded
    with every `step=` its callers pass."""
    names, templates, steps = set(), set(), set()
    for folder in CODE:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if func == "failpoint" and node.args:
                    arg = node.args[0]
                    if isinstance(arg, ast.Constant):
                        names.add(arg.value)
                    elif isinstance(arg, ast.JoinedStr):
                        templates.add("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values))
                    else:
                        raise AssertionError(f"{path}: failpoint() takes a literal name or an f-string")
                for kw in node.keywords:
                    if func == "swap_database" and kw.arg == "step" and isinstance(kw.value, ast.Constant):
                        steps.add(kw.value.value)
    for template in templates:
        assert template.startswith("{}.") and template.count("{}") == 1, template
        names |= {template.format(s) for s in steps}
    return names


def test_the_code_has_failpoints_at_the_steps_that_write():
    found = failpoints_in_code()
    for area in ("restore", "verify", "refresh"):
        assert any(n.startswith(area + ".") for n in found), area
    assert {"restore.between_renames", "refresh.between_renames"} <= found


def test_every_failpoint_has_a_crash_test():
    found, tested = failpoints_in_code(), crash_tested()
    assert found - tested == set(), "failpoints without a crash test (CELLS of a tests/test_crash_*.py)"
    assert tested - found == set(), "crash tests of failpoints the code no longer has"


def test_the_readme_table_lists_every_failpoint():
    text = (REPO / "README.md").read_text()
    section = text.split("## What happens if it dies here", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", section, re.M))
    assert listed == failpoints_in_code()


def test_arming_syntax():
    assert _parse("a.b=exit, c.d=pause(1.5),e.f=raise") == {"a.b": "exit", "c.d": "pause(1.5)", "e.f": "raise"}
    with pytest.raises(ValueError, match="name=exit"):
        _parse("a.b=explode")


@pytest.mark.parametrize("action,code", [("exit", FAILPOINT_EXIT), ("raise", 1), ("pause(0.1)", 0)])
def test_each_action_in_a_child_process(action, code):
    script = ("from dataops.failpoints import failpoint, FailpointError\n"
              "try:\n    failpoint('t.here')\nexcept FailpointError as e:\n    print('raised', e); raise SystemExit(1)\n"
              "print('went on')")
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, "DATAOPS_FAILPOINTS": f"t.here={action}"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == code, r.stderr
    assert {"exit": "", "raise": "raised failpoint t.here\n", "pause(0.1)": "went on\n"}[action] == r.stdout
