"""Shared by the contrib tests: where things are, and the checks they share."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib"
CONTAINERFILE = CONTRIB / "container" / "Containerfile"


def ctl_failure(argv: tuple[str, ...]) -> tuple[int, str]:
    """Run a ``keyagent ctl ...`` argv against a socket that does not exist.

    A real verb with valid options gets as far as connecting and fails with
    exit 1, "no socket"; a verb or option ``keyagent ctl`` does not know is a
    usage error, exit 2.  ``keyagent`` becomes ``python -m agent.cli`` and the
    ``--control`` value a path that cannot exist.
    """
    assert argv[:2] == ("keyagent", "ctl"), argv
    args = list(argv[2:])
    assert "--control" in args, f"{argv}: no --control"
    i = args.index("--control")
    args[i + 1] = "unix:/nonexistent/keyagent-contrib-test/control.sock"
    return _run_ctl(tuple(args))


@functools.cache
def _run_ctl(args: tuple[str, ...]) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "ctl", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return proc.returncode, proc.stderr


def assert_real_ctl_verb(argv) -> None:
    code, stderr = ctl_failure(tuple(argv))
    assert code == 1 and "no socket" in stderr, (
        f"{shlex.join(argv)} is not a working keyagent ctl command line: exit {code}, {stderr.strip()!r}"
    )


def control_path(argv) -> str:
    """The PATH of ``--control unix:PATH`` in a ctl argv."""
    value = list(argv)[list(argv).index("--control") + 1]
    assert value.startswith("unix:"), value
    return value[5:]


def dev_sh_apt_packages() -> set[str]:
    """The Debian packages dev.sh installs for the tests."""
    text = (REPO / "dev.sh").read_text()
    m = re.search(r"^APT_PACKAGES=\(([^)]*)\)", text, re.M)
    assert m, "dev.sh has no APT_PACKAGES=(...)"
    return set(m.group(1).split())


def parse_containerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # comments (and parser directives) may sit inside a continuation
        if not stripped and not pending:
            continue
        line = pending + stripped
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the file ends inside a continuation line"
    return out


def stages(instructions) -> list[tuple[str, str | None, list[tuple[str, str]]]]:
    """(base image, stage name or None, the stage's instructions) per FROM."""
    out: list[tuple[str, str | None, list[tuple[str, str]]]] = []
    for word, args in instructions:
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            assert len(parts) == 1 or name, f"FROM {args}"
            out.append((parts[0], name, []))
        elif out:
            out[-1][2].append((word, args))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def only(instructions, name: str) -> str:
    found = [args for word, args in instructions if word == name]
    assert len(found) == 1, f"{name}: {len(found)} instructions"
    return found[0]


def control_route(argv) -> tuple[str, str]:
    """(method, route) that a ``keyagent ctl ...`` argv sends, from ctl's own parser."""
    from agent.cli.main import build_parser

    args = build_parser(list(argv[1:])).parse_args(list(argv[1:]))
    method, route = args.route
    return method, route


def control_server_status(method: str, route: str, qmp: str = "connected") -> int:
    """The HTTP status the agent's control server gives ``method route``."""
    import asyncio

    from agent.app.control import ControlServer
    from agent.io.http import Request

    class FakeSidecar:
        def status(self) -> dict:
            return {"qmp": qmp}

        def control_verbs(self) -> dict:
            return {}

    server = ControlServer(FakeSidecar(), "/nonexistent/control.sock")
    response = asyncio.run(server.handle(Request(method, route, {})))
    return response.status


# -- systemd units (keyagent@.service, keyagent-host.service) ------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """systemd's unit syntax: [Section], Key=Value, '#'/';' comments, '\\' continuations.

    configparser does not do: a key may repeat (After=, SystemCallFilter=).
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=Value: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def values(sections, section: str, key: str) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


def value(sections, section: str, key: str) -> str:
    found = values(sections, section, key)
    assert found, f"[{section}] {key}= is missing"
    return found[-1]


def parse_env_file(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, val = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), line
        env[key] = val
    return env


def expand_exec(line: str, env: dict[str, str], instance: str) -> list[str]:
    """ExecStart= as systemd runs it: specifiers, then $VAR split into words."""
    line = line.replace("%i", instance).replace("%t", "/run").replace("%%", "%")
    argv = []
    for word in shlex.split(line):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            argv += shlex.split(env.get(m.group(1), ""))
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda v: env.get(v.group(1), ""), word))
    return argv
