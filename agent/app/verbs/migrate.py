"""The shell side of the ``migrate`` control verbs.

Randomness, host keys and sealing live here, not in the flow (flows get no
randomness and must replay exactly): ``prepare`` makes the one-time HPKE
key and the signed offer, ``begin`` checks the offer, makes the PSK, seals
and signs it, ``accept`` checks and opens the cookie (``agent.crypto.seal``,
``docs/handover.md``).  A request that is refused spends nothing: the
offer and the source's PSK stay for the corrected retry.
The key then reaches a :class:`MigrationFlow` as ``KeyProvided``; the flow
does the rest, and its key files are the runtime's to remove.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agent.app.flowhost import FlowHost
from agent.common.errors import ControlError, UsageError
from agent.common.secret import Secret
from agent.core.events import ControlRequest, KeyProvided
from agent.core.migration import MigrationFlow, MigrationParams
from agent.core.modes import MigrationRole

MAX_PENDING_OFFERS = 8
# fullmatch, not match with "$": "$" also matches before a trailing newline,
# and "tcp:a:1\n" would reach QEMU.
URI_RE = re.compile(r"tcp:[^\s:]+:[0-9]{1,5}|tcp:\[[0-9a-fA-F:.]+\]:[0-9]{1,5}|unix:/\S+")


def _uri(args: dict) -> str:
    uri = args.get("uri")
    if not isinstance(uri, str) or not URI_RE.fullmatch(uri):
        raise ControlError(400, "uri must be tcp:HOST:PORT (or unix:/PATH)")
    return uri


NO_HOST_KEYS = (
    "the sealed hand-over needs host keys: set [migration] host_key and "
    "trusted_hosts (--migration-host-key, --migration-trusted-hosts; "
    "'keyagent hostkey init'), or give both sides --psk-file/--psk-ref"
)


@dataclass
class PendingOffer:
    """A destination's offer that no cookie has answered yet (memory only)."""

    offer: Any  # agent.crypto.seal.Offer
    private: Secret  # its HPKE (X25519) private key
    made: float  # time.monotonic()


@dataclass(frozen=True)
class Options:
    """A start/accept request's options, checked before any key is spent."""

    uri: str
    multifd: bool
    channels: int
    postcopy: bool


class MigrationControl:
    def __init__(self, host: FlowHost, clock=time.monotonic) -> None:
        self.host = host
        self.offers: OrderedDict[bytes, PendingOffer] = OrderedDict()  # by SHA-256 of the offer
        self.source_psk: Secret | None = None
        self._count = 0
        self.clock = clock
        self.log = host.log

    # -- host identity ---------------------------------------------------------------
    def _identity(self):
        """(our host key, the trusted hosts), read afresh: a key added or removed
        counts from the next request on."""
        from agent.crypto import hostkey

        cfg = self.host.cfg
        if cfg.migration_host_key is None or cfg.migration_trusted_hosts is None:
            raise ControlError(400, NO_HOST_KEYS)
        try:
            return (hostkey.load_private(cfg.migration_host_key), hostkey.load_trusted(cfg.migration_trusted_hosts))
        except hostkey.HostKeyError as exc:
            raise ControlError(500, str(exc)) from None

    def _expire(self) -> None:
        lifetime = self.host.cfg.migration_offer_lifetime_s
        now = self.clock()
        for digest in [d for d, p in self.offers.items() if now - p.made > lifetime]:
            pending = self.offers.pop(digest)
            pending.private.wipe()
            self.log.info("migration offer expired", offer_id=pending.offer.offer_id.hex())

    # -- sealed hand-over ----------------------------------------------------------
    # ``agent.crypto.seal`` is imported by the verbs that use it: cryptography costs
    # ~7 MB of RSS in every idle sidecar, and only a migration needs it.
    def prepare(self, _args: dict) -> dict:
        from agent.crypto import seal

        host_key, _trusted = self._identity()
        vm = self.host.cfg.vm_name
        self._expire()
        offer_id, private = os.urandom(16), Secret(os.urandom(32))
        offer_b64 = seal.make_offer(host_key, vm, offer_id, private.reveal())
        offer = seal.parse_offer(offer_b64)
        self.offers[offer.digest] = PendingOffer(offer, private, self.clock())
        while len(self.offers) > MAX_PENDING_OFFERS:
            _old, pending = self.offers.popitem(last=False)
            pending.private.wipe()
        self.log.info("migration offer made", offer_id=offer_id.hex())
        return {"offer": offer_b64}

    def begin(self, args: dict) -> dict:
        from agent.crypto import seal

        host_key, trusted = self._identity()
        vm = self.host.cfg.vm_name
        try:
            offer, dest = seal.verify_offer(args.get("offer"), vm, trusted)
        except seal.SealError as exc:
            self.log.warning("migration offer refused", reason=str(exc))
            raise ControlError(exc.status, str(exc)) from None
        length = self.host.cfg.migration_psk_length
        psk = Secret(os.urandom(length))
        try:
            cookie = seal.seal(offer, vm, psk.reveal(), host_key)
        except seal.SealError as exc:
            psk.wipe()
            raise ControlError(exc.status, str(exc)) from None
        if self.source_psk is not None:
            self.source_psk.wipe()
        self.source_psk = psk
        self.log.info(
            "migration PSK generated and sealed", offer_id=offer.offer_id.hex(), destination=dest, psk_length=length
        )
        return {"cookie": cookie}

    def _open_cookie(self, cookie_b64: Any) -> tuple[bytes, Secret]:
        """-> (the offer's digest, the PSK).  Spends nothing: the caller deletes
        the offer once nothing can refuse the request any more."""
        from agent.crypto import seal

        _host_key, trusted = self._identity()
        try:
            cookie, source = seal.verify_cookie(cookie_b64, self.host.cfg.vm_name, trusted)
        except seal.SealError as exc:
            self.log.warning("migration cookie refused", reason=str(exc))
            raise ControlError(exc.status, str(exc)) from None
        self._expire()
        pending = self.offers.get(cookie.offer_hash)
        if pending is None:
            self.log.warning("migration cookie refused", reason="no pending offer", source=source)
            raise ControlError(
                409,
                "cookie answers no pending offer of this agent (already "
                "used, expired, or made for another destination)",
            )
        try:
            psk = Secret(seal.open_cookie(cookie, pending.offer, pending.private.reveal()))
        except seal.SealError as exc:
            self.log.warning("migration cookie refused", reason=str(exc), source=source)
            raise ControlError(exc.status, str(exc)) from None
        self.log.info("migration cookie opened", offer_id=pending.offer.offer_id.hex(), source=source)
        return cookie.offer_hash, psk

    def wipe(self) -> None:
        """At exit: zero the offer keys no cookie used and a PSK no ``start`` used."""
        for pending in self.offers.values():
            pending.private.wipe()
        self.offers.clear()
        if self.source_psk is not None:
            self.source_psk.wipe()
            self.source_psk = None

    def _spend_offer(self, digest: bytes) -> None:
        # Single use: the private key goes with its first accepted cookie.
        pending = self.offers.pop(digest, None)
        if pending is not None:
            pending.private.wipe()

    @staticmethod
    async def _psk_from_ref(args: dict) -> Secret | None:
        from agent.app.control import resolve_ref

        ref = args.get("psk_ref")
        if ref is None:
            return None
        if not isinstance(ref, str):
            raise ControlError(400, "psk_ref must be a string")
        try:
            # Within the peer's rights, off the event loop (agent.app.control).
            return await resolve_ref(ref, "PSK")
        except UsageError as exc:
            raise ControlError(400, str(exc)) from None

    # -- the flows -----------------------------------------------------------------
    def _active(self) -> MigrationFlow | None:
        flows = self.host.flows()
        for fid in reversed(list(flows)):
            flow = flows[fid]
            if isinstance(flow, MigrationFlow):
                return flow if flow.finished is None else None
        return None

    def _latest(self) -> tuple[str, MigrationFlow] | None:
        flows = self.host.flows()
        for fid in reversed(list(flows)):
            flow = flows[fid]
            if isinstance(flow, MigrationFlow):
                return fid, flow
        return None

    def _options(self, args: dict) -> Options:
        """Everything that can refuse a start/accept, before a key is touched:
        a refused request must leave the cookie or the source's PSK for the
        corrected retry."""
        uri = _uri(args)
        multifd = args.get("multifd", False)
        postcopy = args.get("postcopy", False)
        if not isinstance(postcopy, bool):
            raise ControlError(400, "postcopy must be a boolean")
        channels = args.get("multifd_channels", 2)
        if (
            not isinstance(multifd, bool)
            or isinstance(channels, bool)
            or not isinstance(channels, int)
            or not 1 <= channels <= 255
        ):
            raise ControlError(400, "multifd must be a boolean and multifd_channels 1..255")
        if self._active() is not None:
            raise ControlError(409, "a migration is already in progress")
        if not self.host.run_dir:
            raise ControlError(409, "no run_dir configured: the agent has nowhere to put key files")
        return Options(uri, multifd, channels, postcopy)

    async def _run(self, role: MigrationRole, psk: Secret, opts: Options) -> tuple[int, dict]:
        """Start the flow with a key that is already spent: nothing here refuses."""
        host = self.host
        self._count += 1
        while f"migrate-{self._count}" in host.flows():  # one a restarted agent adopted (agent.app.adopt)
            self._count += 1
        flow_id = f"migrate-{self._count}"
        req, future = host.new_request()
        flow = MigrationFlow(
            MigrationParams(
                role=role,
                uri=opts.uri,
                reply_to=req,
                creds_id=f"keyagent-tls-{flow_id}",
                multifd=opts.multifd,
                multifd_channels=opts.channels,
                postcopy=opts.postcopy,
                dest_deadline_s=self.host.cfg.migration_dest_deadline_s,
                # SEV fast migration: the source reports the end to the owner (docs/mh.md)
                mh_vm=self.host.cfg.vm_name if (role == "source" and self._mh_enabled()) else None,
            )
        )
        host.start_flow(flow_id, flow)
        host.feed(flow_id, KeyProvided("psk", psk))
        status, body = await future
        return status, {**body, "migration": flow_id}

    async def accept(self, args: dict) -> tuple[int, dict]:
        # Validate first, spend last; no await in between, so no other
        # request can take the same offer or start a migration meanwhile.
        if "cookie" in args and "psk_ref" in args:
            raise ControlError(400, "give either a cookie or a PSK file, not both")
        opts = self._options(args)
        if "cookie" in args:
            digest, psk = self._open_cookie(args["cookie"])
            self._spend_offer(digest)
        else:
            from_ref = await self._psk_from_ref(args)
            if from_ref is None:
                raise ControlError(400, "migrate accept needs --cookie or --psk-file")
            psk = from_ref
        return await self._run("destination", psk, opts)

    async def start(self, args: dict) -> tuple[int, dict]:
        opts = self._options(args)
        psk = await self._psk_from_ref(args)
        if psk is None:
            if self.source_psk is None:
                raise ControlError(409, "no PSK: run 'migrate begin' first, or give --psk-file")
            psk, self.source_psk = self.source_psk, None
        return await self._run("source", psk, opts)

    async def wait(self, args: dict) -> tuple[int, dict]:
        timeout = args.get("timeout", 3600)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ControlError(400, "timeout must be a positive number of seconds")
        latest = self._latest()
        if latest is None:
            raise ControlError(404, "no migration has been started")
        flow_id, flow = latest
        try:
            await asyncio.wait_for(self.host.finished(flow_id), timeout)
        except TimeoutError:
            return 200, {"status": flow.status, "migration": flow_id, "timed_out": True}
        return 200, {**flow.result(), "migration": flow_id}

    async def cancel(self, _args: dict) -> tuple[int, dict]:
        flow = self._active()
        if flow is None:
            raise ControlError(409, "no migration in progress")
        host = self.host
        flow_id = next(fid for fid, f in host.flows().items() if f is flow)
        req, future = host.new_request()
        host.feed(flow_id, ControlRequest(req, "cancel", {}))
        status, body = await future
        return status, {**body, "migration": flow_id}

    # -- SEV fast migration (docs/mh.md) ----------------------------------------------
    def _mh_enabled(self) -> bool:
        cfg = self.host.cfg
        return bool(getattr(cfg, "sev_mh", False)) and cfg.sev_enabled

    async def mh_target(self, _args: dict) -> tuple[int, dict]:
        """(source) Fetch the target MH's public key from the owner, hand it to the source VM."""
        from agent.core.mh import MhPeerFlow, MhPeerParams

        if not self._mh_enabled():
            raise ControlError(400, "migrate mh-target needs [sev] mh = true (--sev-mh true) and an owner_url")
        host = self.host
        self._count += 1
        flow_id = f"mh-target-{self._count}"
        req, future = host.new_request()
        host.start_flow(
            flow_id, MhPeerFlow(MhPeerParams(vm=host.cfg.vm_name, reply_to=req, timeout_s=host.cfg.sev_timeout_s))
        )
        status, body = await future
        return status, {**body, "flow": flow_id}
