"""Headless chromium for the tests that look at a page the way a user does.

``needs_chromium`` skips a test, with the reason, only when Debian's
``chromium`` is not installed (``./dev.sh test`` installs it).  Each run
gets its own profile directory and every network feature chromium has is
switched off: the pages under test are files and must need nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--hide-scrollbars",
)

#: generous: a loaded CI machine, and a 100,000-record page; never a speed assertion
TIMEOUT_S = 300


def _run(profile: Path, args: list[str]) -> subprocess.CompletedProcess:
    flags = list(FLAGS)
    if os.geteuid() == 0:
        flags.append("--no-sandbox")  # chromium refuses to run as root with its sandbox
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [CHROMIUM, *flags, f"--user-data-dir={profile}", *args], capture_output=True, timeout=TIMEOUT_S, check=False
    )


def dump_dom(page: Path, profile: Path, fragment: str = "", settle_ms: int = 0) -> str:
    """The page's DOM after it loaded and its script ran (``settle_ms``: and
    after that much virtual time, for work the script does asynchronously)."""
    wait = [f"--virtual-time-budget={settle_ms}"] if settle_ms else []
    out = _run(profile, [*wait, "--dump-dom", page.resolve().as_uri() + fragment])
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    return out.stdout.decode("utf-8")


def screenshot(page: Path, png: Path, profile: Path, size: str = "1240,1000") -> bytes:
    out = _run(profile, [f"--screenshot={png}", f"--window-size={size}", page.resolve().as_uri()])
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-2000:]
    return png.read_bytes()
