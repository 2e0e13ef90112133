"""``keyagent demo`` runs end to end: a verified platform's launch, two refusals."""

from __future__ import annotations

import subprocess
import sys

from tests.leakscan import LeakScan


def test_demo_launches_on_the_simulators_verified_platform_and_refuses_the_rest():
    from agent.tools.demo import DEMO_SECRET

    proc = subprocess.run([sys.executable, "-m", "agent.cli", "demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "agent exit status 0; VM running, 1 secret entry injected" in out
    assert "no launch session matches this measurement" in out
    assert "POST /v1/session -> HTTP 403: platform not verified: CEK is not signed by any trusted AMD ASK" in out
    assert out.count("replay check passed") == 2
    assert out.rstrip().endswith("demo passed: the VM ran only with a released secret, on a verified platform")
    scan = LeakScan()
    scan.secret("demo secret", DEMO_SECRET)
    scan.text("demo stdout", out)
    scan.text("demo stderr", proc.stderr)
    scan.check()
