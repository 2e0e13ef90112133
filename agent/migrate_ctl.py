"""The shell side of the ``migrate`` control verbs.

Randomness and sealing live here, not in the flow (flows get no randomness
and must replay exactly): ``prepare`` makes the one-time X25519 key and the
offer, ``begin`` makes the PSK and seals it, ``accept`` opens the cookie.
The key then reaches a :class:`MigrationFlow` as ``KeyProvided``; the flow
does the rest, and its key files are the runtime's to remove.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import OrderedDict
from typing import Any

from agent.core.events import ControlRequest, KeyProvided
from agent.core.migration import MigrationFlow, MigrationParams
from agent.core.secret import Secret
from agent.errors import UsageError

MAX_PENDING_OFFERS = 8
# fullmatch, not match with "$": "$" also matches before a trailing newline,
# and "tcp:a:1\n" would reach QEMU.
URI_RE = re.compile(r"tcp:[^\s:]+:[0-9]{1,5}|tcp:\[[0-9a-fA-F:.]+\]:[0-9]{1,5}|unix:/\S+")


class ControlError(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def _uri(args: dict) -> str:
    uri = args.get("uri")
    if not isinstance(uri, str) or not URI_RE.fullmatch(uri):
        raise ControlError(400, "uri must be tcp:HOST:PORT (or unix:/PATH)")
    return uri


class MigrationControl:
    def __init__(self, sidecar: Any) -> None:
        self.sidecar = sidecar
        self.offers: OrderedDict[bytes, Secret] = OrderedDict()
        self.source_psk: Secret | None = None
        self._count = 0
        self.log = sidecar.log

    # -- sealed hand-over ----------------------------------------------------------
    # ``agent.seal`` is imported by the verbs that use it: cryptography costs
    # ~7 MB of RSS in every idle sidecar, and only a migration needs it.
    def prepare(self, _args: dict) -> dict:
        from agent import seal

        offer_id, private = os.urandom(16), Secret(os.urandom(32))
        offer = seal.make_offer(private.reveal(), offer_id)
        self.offers[offer_id] = private
        while len(self.offers) > MAX_PENDING_OFFERS:
            _old, key = self.offers.popitem(last=False)
            key.wipe()
        self.log.info("migration offer made", offer_id=offer_id.hex())
        return {"offer": offer}

    def begin(self, args: dict) -> dict:
        from agent import seal

        offer = args.get("offer")
        length = self.sidecar.cfg.migration_psk_length
        psk = Secret(os.urandom(length))
        try:
            cookie = seal.seal(offer, psk.reveal(), os.urandom(32), os.urandom(12))
            offer_id, _pub = seal.parse_offer(offer)
        except seal.SealError as exc:
            psk.wipe()
            raise ControlError(400, str(exc)) from None
        if self.source_psk is not None:
            self.source_psk.wipe()
        self.source_psk = psk
        self.log.info("migration PSK generated and sealed", offer_id=offer_id.hex(),
                      psk_length=length)
        return {"cookie": cookie}

    def _open_cookie(self, cookie: Any) -> Secret:
        from agent import seal

        try:
            offer_id = seal.cookie_offer_id(cookie)
        except seal.SealError as exc:
            raise ControlError(400, str(exc)) from None
        private = self.offers.get(offer_id)
        if private is None:
            raise ControlError(409, "cookie is not for a pending offer of this agent "
                                    "(already used, or made for another destination)")
        try:
            psk = Secret(seal.unseal(cookie, private.reveal(), offer_id))
        except seal.SealError as exc:
            raise ControlError(400, str(exc)) from None
        # Single use: the private key goes with its first successful cookie.
        del self.offers[offer_id]
        private.wipe()
        self.log.info("migration cookie opened", offer_id=offer_id.hex())
        return psk

    @staticmethod
    async def _psk_from_ref(args: dict) -> Secret | None:
        from agent.control import resolve_ref

        ref = args.get("psk_ref")
        if ref is None:
            return None
        if not isinstance(ref, str):
            raise ControlError(400, "psk_ref must be a string")
        try:
            # Within the peer's rights, off the event loop (agent.control).
            return await resolve_ref(ref, "PSK")
        except UsageError as exc:
            raise ControlError(400, str(exc)) from None

    # -- the flows -----------------------------------------------------------------
    def _active(self) -> MigrationFlow | None:
        rt = self.sidecar.runtime
        for fid in reversed(list(rt.flows)):
            flow = rt.flows[fid]
            if isinstance(flow, MigrationFlow):
                return flow if flow.finished is None else None
        return None

    def _latest(self) -> tuple[str, MigrationFlow] | None:
        rt = self.sidecar.runtime
        for fid in reversed(list(rt.flows)):
            if isinstance(rt.flows[fid], MigrationFlow):
                return fid, rt.flows[fid]
        return None

    async def _run(self, role: str, psk: Secret, args: dict) -> tuple[int, dict]:
        rt = self.sidecar.runtime
        if self._active() is not None:
            psk.wipe()
            raise ControlError(409, "a migration is already in progress")
        if not rt.run_dir:
            psk.wipe()
            raise ControlError(409, "no run_dir configured: the agent has nowhere to put key files")
        multifd = args.get("multifd", False)
        postcopy = args.get("postcopy", False)
        if not isinstance(postcopy, bool):
            psk.wipe()
            raise ControlError(400, "postcopy must be a boolean")
        channels = args.get("multifd_channels", 2)
        if not isinstance(multifd, bool) or isinstance(channels, bool) or \
                not isinstance(channels, int) or not 1 <= channels <= 255:
            psk.wipe()
            raise ControlError(400, "multifd must be a boolean and multifd_channels 1..255")
        self._count += 1
        flow_id = f"migrate-{self._count}"
        req, future = rt.new_request()
        flow = MigrationFlow(MigrationParams(
            role=role, uri=_uri(args), reply_to=req, creds_id=f"keyagent-tls-{flow_id}",
            multifd=multifd, multifd_channels=channels, postcopy=postcopy,
            dest_deadline_s=self.sidecar.cfg.migration_dest_deadline_s))
        rt.start_flow(flow_id, flow)
        rt.feed(flow_id, KeyProvided("psk", psk))
        status, body = await future
        return status, {**body, "migration": flow_id}

    async def accept(self, args: dict) -> tuple[int, dict]:
        _uri(args)
        if "cookie" in args and "psk_ref" in args:
            raise ControlError(400, "give either a cookie or a PSK file, not both")
        if "cookie" in args:
            psk = self._open_cookie(args["cookie"])
        else:
            psk = await self._psk_from_ref(args)
            if psk is None:
                raise ControlError(400, "migrate accept needs --cookie or --psk-file")
        return await self._run("destination", psk, args)

    async def start(self, args: dict) -> tuple[int, dict]:
        _uri(args)
        psk = await self._psk_from_ref(args)
        if psk is None:
            if self.source_psk is None:
                raise ControlError(409, "no PSK: run 'migrate begin' first, or give --psk-file")
            psk, self.source_psk = self.source_psk, None
        return await self._run("source", psk, args)

    async def wait(self, args: dict) -> tuple[int, dict]:
        timeout = args.get("timeout", 3600)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ControlError(400, "timeout must be a positive number of seconds")
        latest = self._latest()
        if latest is None:
            raise ControlError(404, "no migration has been started")
        flow_id, flow = latest
        try:
            await asyncio.wait_for(self.sidecar.runtime.finished(flow_id), timeout)
        except asyncio.TimeoutError:
            return 200, {"status": flow.status, "migration": flow_id, "timed_out": True}
        return 200, {**flow.result(), "migration": flow_id}

    async def cancel(self, _args: dict) -> tuple[int, dict]:
        flow = self._active()
        if flow is None:
            raise ControlError(409, "no migration in progress")
        rt = self.sidecar.runtime
        flow_id = next(fid for fid, f in rt.flows.items() if f is flow)
        req, future = rt.new_request()
        rt.feed(flow_id, ControlRequest(req, "cancel", {}))
        status, body = await future
        return status, {**body, "migration": flow_id}
