"""The closed sets of words a flow's parameters and actions use.

They travel as plain strings (flow parameters are recorded as JSON and
rebuilt by ``keyagent replay``), so they are ``Literal`` types rather than
enums: the type checker sees a misspelt mode, the event log does not change.
The configuration (``agent.app.config``) takes its choices from here.
"""

from __future__ import annotations

from typing import Literal

#: what an SEV launch does with QEMU when the owner gives no secret (core/launch.py)
OnRefusal = Literal["quit", "pause"]
#: where the secret-object flow keeps its master key (core/secret_objects.py)
MasterKeyMode = Literal["keyring", "file"]
#: which side of a migration a flow is (core/migration.py)
MigrationRole = Literal["source", "destination"]
#: the level of a ``Log`` action (the structlog method the runtime calls)
LogLevel = Literal["debug", "info", "warning", "error"]
