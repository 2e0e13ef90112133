"""contrib/container: the entrypoint image.  No container engine here: parsed only."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from agent.app.config import load_config
from agent.cli.main import build_parser
from tests.contrib.support import (
    CONTAINERFILE,
    CONTRIB,
    REPO,
    assert_real_ctl_verb,
    control_path,
    dev_sh_apt_packages,
    exec_form,
    only,
    parse_containerfile,
    stages,
)

VM_TOML = CONTRIB / "container" / "vm.toml"

INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}
ENTRYPOINT = ["keyagent", "launch", "--config", "/etc/keyagent/vm.toml", "--"]


@pytest.fixture(scope="module")
def instructions():
    return parse_containerfile(CONTAINERFILE.read_text())


def test_every_instruction_is_known_and_from_is_debian_bookworm_slim(instructions):
    for word, _ in instructions:
        assert word in INSTRUCTIONS, word
    words = [w for w, _ in instructions]
    assert words[0] in ("FROM", "ARG")
    found = stages(instructions)
    # The image itself (the last stage) and the stage that builds the wheels
    # stand on the same base; "wheels" holds nothing but wheel files.
    assert found[-1][0] == "debian:bookworm-slim" and found[-1][1] is None
    assert {base for base, _, _ in found} == {"debian:bookworm-slim", "scratch"}
    assert [name for base, name, _ in found if base == "scratch"] == ["wheels"]


def test_entrypoint_is_keyagent_launch_in_exec_form(instructions):
    assert exec_form(only(instructions, "ENTRYPOINT")) == ENTRYPOINT
    cmd = exec_form(only(instructions, "CMD"))
    assert cmd[0] == "qemu-system-x86_64"
    # keyagent launch adds these itself.
    assert "-S" not in cmd and "-qmp" not in cmd


def test_entrypoint_and_cmd_parse_as_keyagent_launch(instructions):
    argv = exec_form(only(instructions, "ENTRYPOINT"))[1:] + exec_form(only(instructions, "CMD"))
    parser = build_parser(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "launch" not in sub.choices:
        pytest.skip("keyagent launch is not written yet")
    args = parser.parse_args(argv)
    assert args.command == "launch" and args.config == "/etc/keyagent/vm.toml"


def test_apt_packages_are_the_ones_dev_sh_installs_plus_python(instructions):
    installed: set[str] = set()
    for word, args in instructions:
        if word != "RUN" or "apt-get install" not in args:
            continue
        for command in args.split("&&"):
            tokens = shlex.split(command)
            if tokens[:2] == ["apt-get", "install"]:
                installed |= {t for t in tokens[2:] if not t.startswith("-")}
    assert installed == dev_sh_apt_packages() | {"python3", "python3-venv"}


def _copies(stage_instructions) -> list[tuple[str | None, list[str], str]]:
    out = []
    for word, args in stage_instructions:
        if word in ("COPY", "ADD"):
            parts = args.split()
            source = next((p[len("--from=") :] for p in parts if p.startswith("--from=")), None)
            *sources, dest = [p for p in parts if not p.startswith("--")]
            out.append((source, sources, dest))
    return out


def test_wheel_stage_builds_what_it_copied_from_the_context(instructions):
    (builder,) = [s for s in stages(instructions) if s[1] == "wheelhouse"]
    copied = {}
    for source, sources, dest in _copies(builder[2]):
        assert source is None
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: not in the repository"
            copied[src] = dest.rstrip("/")
    pip = next(args for word, args in builder[2] if word == "RUN" and "pip wheel" in args)
    target = shlex.split(pip)[-1].rstrip("/")
    assert copied.get("pyproject.toml") == target, "pip wheel builds a directory without pyproject.toml"
    assert copied.get("agent") == target + "/agent"
    assert copied.get("README.md") == target  # pyproject's readme
    m = re.search(r"--wheel-dir (\S+)", pip)
    (wheels,) = [s for s in stages(instructions) if s[1] == "wheels"]
    assert _copies(wheels[2]) == [("wheelhouse", [m.group(1).rstrip("/") + "/"], "/")]


def test_image_installs_only_from_the_wheels_and_copies_nothing_of_the_context(instructions):
    base, name, final = stages(instructions)[-1]
    # One COPY, of the wheels (not a bind mount: buildah would reuse a cached
    # RUN layer whose mounted stage changed), removed by the RUN that installs.
    (copy,) = _copies(final)
    assert copy[:2] == ("wheels", ["/"]), copy
    wheels = copy[2].rstrip("/")
    assert not any(word == "RUN" and "--mount" in args for word, args in final)
    pip = next(args for word, args in final if word == "RUN" and "pip install" in args)
    tokens = shlex.split(pip[pip.index("pip install") :].split("&&")[0])
    assert "--no-index" in tokens
    assert tokens[tokens.index("--find-links") + 1] == wheels
    assert tokens[-1] == "keyagent"
    assert f"rm -rf {wheels}" in pip


def test_runs_as_a_non_root_user(instructions):
    user = only(instructions, "USER").split(":")[0]
    assert user not in ("root", "0")
    setup = next(args for word, args in instructions if word == "RUN" and "useradd" in args)
    assert re.search(rf"useradd .*--uid 10001 .*{user}", setup)


def test_healthcheck_is_a_real_ctl_verb_on_the_run_dir_socket(instructions):
    args = only(instructions, "HEALTHCHECK")
    argv = exec_form(args[args.index("CMD ") + 4 :])
    assert_real_ctl_verb(argv)
    cfg = load_config(str(VM_TOML))
    assert control_path(argv) == cfg.vm_run_dir + "/control.sock"


def test_example_config_loads_and_keeps_the_master_key_out_of_the_keyring():
    cfg = load_config(str(VM_TOML))
    assert cfg.vm_run_dir.startswith("/run/keyagent/")
    assert cfg.secrets_master_key == "file"
