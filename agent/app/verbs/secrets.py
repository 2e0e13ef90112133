"""The shell side of the master key and ``secret add/remove``.

The master key (32 bytes from ``os.urandom``) stays in this process's
memory: the shell encrypts each secret under it (AES-256-CBC, PKCS#7, a
fresh 16-byte IV each: ``agent.crypto.secret_object``) and hands the flow
only ciphertext.  Plaintext never
goes to QEMU, to a log, or to the event log.

Bounds: a secret is 1 byte to 64 KiB (``MAX_SECRET_FILE``); an id is a QOM
id (a letter, then letters, digits, ``-``, ``.``, ``_``), at most 128
characters, and not one of ours already.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re

from agent.app.flowhost import FlowHost
from agent.common.errors import ControlError, UsageError
from agent.common.secret import Secret
from agent.core.events import ControlRequest, KeyProvided
from agent.core.secret_objects import SecretsFlow, SecretsParams
from agent.crypto.secret_object import IV_LEN, MASTER_KEY_LEN, encrypt

FLOW_ID = "secrets"
# fullmatch, not match with "$": "$" also matches before a trailing newline.
QOM_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")


class SecretsControl:
    def __init__(self, host: FlowHost) -> None:
        self.host = host
        self.master: Secret | None = None

    def start(self, master: Secret | None = None, in_qemu: list[str] | None = None) -> None:
        """Start the flow; ``master`` is a key already on QEMU's command line.

        ``in_qemu``: the secret objects a restarted agent found in QEMU
        (``agent.app.adopt``).  If the predecessor's master key is among
        them it is left alone, and ours gets the first free id, added when
        a secret needs it.
        """
        host, cfg = self.host, self.host.cfg
        self.master = master or Secret(os.urandom(MASTER_KEY_LEN))
        params = SecretsParams(vm=cfg.vm_name, mode=cfg.secrets_master_key, preloaded=master is not None)
        if in_qemu and master is None and params.master_id in in_qemu:
            n = 2
            while f"{params.master_id}-{n}" in in_qemu:
                n += 1
            params = dataclasses.replace(
                params, master_id=f"{params.master_id}-{n}", lazy_master=True, in_qemu=tuple(in_qemu)
            )
        elif in_qemu:
            params = dataclasses.replace(params, in_qemu=tuple(in_qemu))
        host.start_flow(FLOW_ID, SecretsFlow(params))
        host.feed(FLOW_ID, KeyProvided("master", self.master))

    async def _ask(self, verb: str, args: dict) -> tuple[int, dict]:
        host = self.host
        flow = host.flows().get(FLOW_ID)
        if flow is None or flow.finished is not None:
            raise ControlError(503, "secret objects are unavailable (QEMU is gone)")
        req, future = host.new_request()
        host.feed(FLOW_ID, ControlRequest(req, verb, args))
        return await future

    @staticmethod
    def _id(args: dict) -> str:
        sid = args.get("id")
        if not isinstance(sid, str) or not QOM_ID.fullmatch(sid):
            raise ControlError(400, "invalid secret id: a letter, then letters, digits, '-', '.', '_' (at most 128)")
        return sid

    async def add(self, args: dict) -> tuple[int, dict]:
        sid = self._id(args)
        ref = args.get("ref")
        if not isinstance(ref, str):
            raise ControlError(400, "secret add needs --file or --ref")
        from agent.app.control import resolve_ref

        try:
            plaintext = await resolve_ref(ref, "secret")
        except UsageError as exc:
            raise ControlError(400, str(exc)) from None
        iv = os.urandom(IV_LEN)
        assert self.master is not None  # start() made it; the verbs are served after
        try:
            data = encrypt(self.master, plaintext, iv)
        finally:
            plaintext.wipe()
        status, body = await self._ask("add", {"id": sid, "iv": base64.b64encode(iv).decode(), "data": data})
        if status == 200:
            self.host.metrics.secrets_added += 1
        return status, body

    async def remove(self, args: dict) -> tuple[int, dict]:
        return await self._ask("remove", {"id": self._id(args)})
