"""How the tests start keyagent: the console script next to the running interpreter.

A test never names a path of the machine it was written on: `pip install -e .`
puts `keyagent` beside `sys.executable` (a venv's bin/); without it (the tests
run from a source tree only) the same entry point runs as `python -m agent.cli`.
"""

from __future__ import annotations

import os
import sys

_BIN = os.path.join(os.path.dirname(sys.executable), "keyagent")
KEYAGENT: list[str] = [_BIN] if os.path.exists(_BIN) else [sys.executable, "-m", "agent.cli"]
