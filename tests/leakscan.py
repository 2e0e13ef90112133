"""The one leak-scan helper every end-to-end test uses.

It searches captured text (stderr, stdout, event logs), argv snapshots taken
while the processes ran, and every file under given directories for each
test secret in raw, hex (both cases) and base64 forms.  Base64 is searched
at all three alignments, so a secret embedded inside a longer base64 value
is found too.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from dataclasses import dataclass, field


def forms(secret: bytes) -> dict[str, bytes]:
    out = {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode()}
    n = len(secret)
    for k in range(3):
        # Only the characters whose 6 bits all come from the secret.
        start, end = -(-8 * k // 6), (8 * (k + n)) // 6
        for variant, enc in (
            ("b64", base64.b64encode(b"\0" * k + secret)),
            ("b64url", base64.urlsafe_b64encode(b"\0" * k + secret)),
        ):
            core = enc[start:end]
            if len(core) >= 8:
                out[f"{variant}@{k}"] = core
    out["b64"] = base64.b64encode(secret).rstrip(b"=")
    return out


def find(secret: bytes, haystack: bytes) -> str | None:
    for name, needle in forms(secret).items():
        if needle and needle in haystack:
            return name
    return None


class ArgvWatcher:
    """Snapshots every process's argv (/proc/*/cmdline) while a test runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def snapshot(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    self.seen.add(f.read())
            except OSError:
                pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.snapshot()
            time.sleep(self.interval)

    def __enter__(self) -> ArgvWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.snapshot()


@dataclass
class LeakScan:
    """Collects everything to search; ``check()`` fails the test on a find."""

    secrets: dict[str, bytes] = field(default_factory=dict)
    texts: dict[str, bytes] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    argv: ArgvWatcher | None = None

    def secret(self, name: str, value: bytes) -> bytes:
        self.secrets[name] = value
        return value

    def text(self, name: str, value: bytes | str) -> None:
        self.texts[name] = value.encode() if isinstance(value, str) else value

    def file(self, path: str) -> None:
        with open(path, "rb") as f:
            self.texts[path] = f.read()

    def leaks(self) -> list[str]:
        found = []
        haystacks = dict(self.texts)
        if self.argv is not None:
            haystacks["argv"] = b"\n".join(sorted(self.argv.seen))
        for d in self.dirs:
            for root, _dirs, files in os.walk(d):
                for name in files:
                    path = os.path.join(root, name)
                    try:
                        with open(path, "rb") as f:
                            haystacks[path] = f.read()
                    except OSError:
                        pass
        for sname, secret in self.secrets.items():
            for hname, hay in haystacks.items():
                how = find(secret, hay)
                if how:
                    found.append(f"{sname} found in {hname} as {how}")
        return found

    def check(self) -> None:
        leaks = self.leaks()
        assert not leaks, "secret leaked: " + "; ".join(leaks)
