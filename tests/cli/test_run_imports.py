"""What ``keyagent run`` loads before QMP connects: only what its path needs.

Every module is start-up time and RSS in every sidecar (one per VM).  These
are the ones that were on that path once and cost the most; each belongs to
a command or a step the sidecar does not take before it is asked to.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.hostkeys import make_pair

# module -> why it stays out
NOT_ON_THE_RUN_PATH = {
    "cryptography": "loaded by the first migration or host-key command (+9 MB)",
    "agent.owner": "the guest owner's side",
    "agent.tools": "development tools",
    "tomllib": "read only with --config",
    "shutil": "imports zlib, bz2 and lzma; argparse and the key directories do without it",
    "ctypes.util": "find_library runs ldconfig in a subprocess",
    "hmac": "loads OpenSSL's libcrypto a second way",
}

PROBE = """
import json, sys
from agent.cli.main import build_parser
from agent.app.config import config_from_args
argv = sys.argv[1:]
args = build_parser(argv).parse_args(argv)
from agent.app.sidecar import Sidecar, SidecarOptions
from agent.cli.run import control_path
cfg = config_from_args(args)
sidecar = Sidecar(cfg, SidecarOptions(qmp_path="", control_path=control_path(args, cfg), event_log=None))
sidecar.run_dir = cfg.vm_run_dir
sidecar.preload()
print(json.dumps(sorted(sys.modules)))
"""


def test_a_sidecar_with_a_launch_and_a_control_socket_loads_none_of_the_heavy_modules(tmp_path):
    argv = [
        "run",
        "--qmp",
        f"unix:{tmp_path}/qmp.sock",
        "--owner-url",
        "http://127.0.0.1:1",
        "--vm-name",
        "vm1",
        "--vm-run-dir",
        str(tmp_path),
    ]
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert {"agent.app.sidecar", "agent.io.owner_client", "agent.app.control"} <= loaded  # the probe did its work
    packages = {name.split(".")[0] for name in loaded} | loaded
    wrong = {m: why for m, why in NOT_ON_THE_RUN_PATH.items() if m in packages or m in loaded}
    assert wrong == {}


def probe_after_idle(argv: list[str]) -> set[str]:
    """The modules of a sidecar after its preloads, the idle one included."""
    probe = PROBE.replace("sidecar.preload()\n", "sidecar.preload()\nsidecar.preload_idle()\n")
    out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def run_argv(tmp_path, *extra: str) -> list[str]:
    return ["run", "--qmp", f"unix:{tmp_path}/qmp.sock", "--vm-name", "vm1", "--vm-run-dir", str(tmp_path), *extra]


def test_an_idle_sidecar_without_host_keys_loads_no_cryptography(tmp_path):
    loaded = probe_after_idle(run_argv(tmp_path))
    assert not {m for m in loaded if m.split(".")[0] == "cryptography"}
    assert "agent.app.verbs.migrate" not in loaded


def test_an_idle_sidecar_with_host_keys_has_what_a_sealed_migration_needs_loaded(tmp_path):
    """migration_fixed_ms: the source would otherwise load cryptography inside the migration."""
    src, _dst = make_pair(tmp_path)
    loaded = probe_after_idle(run_argv(tmp_path, *src.flags()))
    assert {
        "agent.app.verbs.migrate",
        "agent.crypto.seal",
        "cryptography.hazmat.backends.openssl.backend",  # what the first X25519 key would import
    } <= loaded
    assert "cryptography.hazmat.primitives.serialization" not in loaded
