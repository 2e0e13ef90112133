"""A fresh clone runs its tests: no path of one machine, no public data left outside."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Directories whose contents differ from one machine to the next.
MACHINE_PATH = re.compile(r"^/(tmp|root|home|work|opt|mnt|srv)/")
# Test inputs that are never opened (a malformed socket spec).
NEVER_OPENED = {("tests/app/test_config.py", "/tmp/x")}


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):
            first = node.values[0] if node.values else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def test_no_code_or_test_names_a_file_of_one_machine():
    found = []
    for top in ("agent", "tests"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if path == Path(__file__).resolve():
                continue
            for line, value in _string_constants(path):
                if MACHINE_PATH.match(value) and (rel, value) not in NEVER_OPENED:
                    found.append(f"{rel}:{line}: {value!r}")
    assert not found, "fixed machine paths:\n" + "\n".join(found)


def test_sevctl_data_is_in_the_tree_with_its_origin_and_licence():
    data = REPO / "fixtures" / "sevctl"
    readme = (data / "README.md").read_text()
    assert "github.com/virtee/sevctl" in readme and "Apache" in readme
    files = [p for p in data.rglob("*") if p.is_file() and p.name != "README.md"]
    for path in files:
        assert path.name in readme, f"{path.name} not named in README"


def test_no_test_skips_for_want_of_sevctl_data():
    for path in (REPO / "tests").rglob("*.py"):
        if path != Path(__file__).resolve():
            assert "KEYAGENT_SEVCTL_TESTDATA" not in path.read_text(), path
