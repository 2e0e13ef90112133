"""The simulator's migration handlers (MH) for SEV fast migration (docs/mh.md).

No firmware implements the MH yet; this stands in for both sides inside a
simulated guest (``keyagent simulate --mh``):

* at the launch secret's injection it reads the two MH entries of the
  secret table (:data:`agent.sev.guids.MH_PRIVATE_KEY_GUID`, ...): an empty
  source key is an ordinary boot, a 32-byte one makes this VM a migration
  target, which derives its transport key at once;
* ``x-mh-set-peer-key {"public-key", "tag"}`` (the source): checks the
  owner's tag under the confirmation key it derives, then keeps the
  transport key (a key whose tag does not verify is refused);
* ``migrate`` sends :data:`PAGES` guest pages, each AES-256-GCM encrypted
  under the transport key; the target decrypts them (a page that does not
  open fails the migration);
* ``x-mh-query`` answers what a test needs to check both sides without
  ever seeing a key: the role, the public keys, a digest of the transport
  key (SHA-256 under a label) and a digest of the pages sent / received.

``--mh-secrets-out FILE`` (tests only) writes this MH's private key and
transport key, hex, to a new 0600 file so that a leak scan can look for
them in everything the agents, QMP and the owner wrote.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import uuid
from typing import Any

from agent.common.errors import SimQmpError
from agent.common.logs import get_logger
from agent.common.secret import Secret
from agent.sev import mh as mhkeys
from agent.sev.guids import MH_PRIVATE_KEY_GUID, MH_SOURCE_PUBLIC_KEY_GUID

__all__ = ["SimMh", "PAGES", "PAGE_SIZE", "key_digest", "page_nonce"]

PAGES = 8
PAGE_SIZE = 4096
KEY_CHECK_LABEL = b"keyagent sim mh key check\0"
PAGE_AAD = b"keyagent sim mh page\0"
_NONCE = struct.Struct(">4xQ")  # 12-byte AES-GCM nonce: zero[4] || page index u64be


def key_digest(key: Secret) -> str:
    """What x-mh-query shows of a transport key: SHA-256(label || key), hex (not the key)."""
    return hashlib.sha256(KEY_CHECK_LABEL + key.reveal()).hexdigest()


def page_nonce(index: int) -> bytes:
    return _NONCE.pack(index)


class SimMh:
    """One VM's migration handler."""

    def __init__(self, vm: str, secrets_out: str | None = None, pages: int = PAGES) -> None:
        self.vm = vm
        self.role = "none"  # none | boot | source | target | retired
        self.public: bytes | None = None
        self.source_public: bytes | None = None
        self.peer_public: bytes | None = None
        self._private: Secret | None = None
        self._transport: Secret | None = None
        self._key_digest: str | None = None
        self._secrets_out = secrets_out
        # the source's guest memory: what must arrive intact
        self._pages = [os.urandom(PAGE_SIZE) for _ in range(pages)]
        self._sent = hashlib.sha256()
        self._received = hashlib.sha256()
        self.pages_sent = 0
        self.pages_received = 0
        self._log = get_logger("keyagent.sim")

    # -- the launch secret -------------------------------------------------------
    def on_table(self, entries: list[tuple[uuid.UUID, bytes]]) -> None:
        """The injected table: an identity key, and a source key (empty at a boot)."""
        found = dict(entries)
        private = found.get(MH_PRIVATE_KEY_GUID)
        source = found.get(MH_SOURCE_PUBLIC_KEY_GUID)
        if private is None or source is None or len(private) != mhkeys.KEY_LEN or len(source) not in (0, 32):
            self._log.warning("sim.mh_no_keys", private=private is not None, source=source is not None)
            return
        self._private = Secret(private)
        self.public = mhkeys.public_key(private)
        if not source:
            self.role = "boot"
        else:
            self.role = "target"
            self.source_public = bytes(source)
            self._derive(self.source_public, self.source_public, self.public)
        self._log.info("sim.mh_keys", role=self.role, key=mhkeys.key_id(self.public))
        self._write_secrets()

    def _derive(self, peer: bytes, source: bytes, target: bytes, tag: bytes | None = None) -> None:
        assert self._private is not None
        try:
            keys = mhkeys.derive(self._private.reveal(), peer, self.vm, source, target)
        except ValueError as exc:
            raise SimQmpError(f"MH: cannot derive the transport key: {exc}") from None
        try:
            if tag is not None and not mhkeys.tag_matches(keys.confirm, target, tag):
                keys.transport.wipe()
                raise SimQmpError("MH: the peer key's tag does not verify (not a key the owner made for this VM)")
        finally:
            keys.confirm.wipe()
        self._transport = keys.transport
        self._key_digest = key_digest(keys.transport)

    # -- x-mh-set-peer-key -------------------------------------------------------
    def set_peer_key(self, public_b64: str, tag_b64: str) -> dict[str, Any]:
        try:
            public = base64.b64decode(public_b64, validate=True)
            tag = base64.b64decode(tag_b64, validate=True)
        except ValueError:
            raise SimQmpError("MH: public-key and tag must be base64") from None
        if len(public) != mhkeys.KEY_LEN or len(tag) != mhkeys.TAG_LEN:
            raise SimQmpError("MH: public-key and tag must be 32 bytes each")
        if self.role not in ("boot", "source") or self._private is None or self.public is None:
            raise SimQmpError(f"MH: no peer key in role {self.role}")
        self._derive(public, self.public, public, tag)
        self.peer_public = public
        self.role = "source"
        self._log.info("sim.mh_peer_key", peer=mhkeys.key_id(public))
        self._write_secrets()
        return {}

    # -- pages ---------------------------------------------------------------------
    def encrypted_pages(self) -> list[bytes]:
        """The source's pages, sealed for the target (SimQmpError without a transport key)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if self.role != "source" or self._transport is None:
            raise SimQmpError("MH: the source has no transport key (x-mh-set-peer-key first)")
        aead = AESGCM(self._transport.reveal())
        out = []
        for i, page in enumerate(self._pages):
            out.append(aead.encrypt(page_nonce(i), page, PAGE_AAD + struct.pack(">Q", i)))
            self._sent.update(page)
            self.pages_sent += 1
        return out

    def receive_page(self, index: int, sealed: bytes) -> None:
        """The target opens one page; ValueError if it does not open."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if self.role != "target" or self._transport is None:
            raise ValueError("this VM is not a migration target with a transport key")
        try:
            page = AESGCM(self._transport.reveal()).decrypt(
                page_nonce(index), sealed, PAGE_AAD + struct.pack(">Q", index)
            )
        except InvalidTag:
            raise ValueError(f"page {index} does not open under the transport key") from None
        self._received.update(page)
        self.pages_received += 1

    def arrived(self) -> None:
        """The target after a completed migration: the transport key goes; its identity key
        stays, so this VM can be the source of the next migration."""
        if self._transport is not None:
            self._transport.wipe()
            self._transport = None
        self.role = "boot"
        self._log.info("sim.mh_arrived")

    def retire(self) -> None:
        """The migration succeeded (source) or the VM ended: the MH key is destroyed."""
        if self._private is not None:
            self._private.wipe()
            self._private = None
        if self._transport is not None:
            self._transport.wipe()
            self._transport = None
        self.role = "retired"

    # -- x-mh-query ----------------------------------------------------------------
    def query(self) -> dict[str, Any]:
        def b64(v: bytes | None) -> str | None:
            return base64.b64encode(v).decode() if v is not None else None

        return {
            "role": self.role,
            "public-key": b64(self.public),
            "source-public-key": b64(self.source_public),
            "peer-public-key": b64(self.peer_public),
            "key-digest": self._key_digest,
            "pages-sent": self.pages_sent,
            "pages-received": self.pages_received,
            "sent-digest": self._sent.hexdigest() if self.pages_sent else None,
            "received-digest": self._received.hexdigest() if self.pages_received else None,
        }

    def _write_secrets(self) -> None:
        """--mh-secrets-out (tests only): the keys a leak scan must never find elsewhere."""
        if self._secrets_out is None:
            return
        doc = {"private": self._private.reveal().hex() if self._private else None}
        if self._transport is not None:
            doc["transport"] = self._transport.reveal().hex()
        tmp = f"{self._secrets_out}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self._secrets_out)


# -- the migration stream (the simulated hypervisor carries ciphertext only) ------------

MIGRATION_TIMEOUT_S = 30.0


async def _open(uri: str):  # -> (reader, writer)
    import asyncio

    if uri.startswith("unix:"):
        return await asyncio.wait_for(asyncio.open_unix_connection(uri[5:]), MIGRATION_TIMEOUT_S)
    host, _, port = uri[4:].rpartition(":")
    return await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), MIGRATION_TIMEOUT_S)


async def _listen(uri: str, handler):  # -> asyncio.Server
    import asyncio

    if uri.startswith("unix:"):
        return await asyncio.start_unix_server(handler, path=uri[5:])
    host, _, port = uri[4:].rpartition(":")
    return await asyncio.start_server(handler, host.strip("[]"), int(port))


def check_uri(uri: str) -> None:
    """QEMU's answer to a URI it cannot use (the simulator knows tcp: and unix:)."""
    if uri.startswith("unix:") and len(uri) > 5:
        return
    if uri.startswith("tcp:") and uri[4:].rpartition(":")[2].isdigit():
        return
    raise SimQmpError(f"Invalid migration URI '{uri[:80]}'")


async def migrate_out(machine: Any, uri: str) -> None:
    """The source: seal the pages, send them, wait for the target's word."""
    import asyncio

    mh: SimMh = machine.mh
    machine.set_migration("setup")
    try:
        sealed = mh.encrypted_pages()
        reader, writer = await _open(uri)
    except (SimQmpError, OSError, TimeoutError, ValueError) as exc:
        machine.set_migration("failed", str(getattr(exc, "desc", exc)) or type(exc).__name__)
        return
    try:
        machine.set_migration("active")
        for i, page in enumerate(sealed):
            writer.write(json.dumps({"page": i, "data": base64.b64encode(page).decode()}).encode() + b"\n")
        writer.write(json.dumps({"end": len(sealed)}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), MIGRATION_TIMEOUT_S)
        answer = json.loads(line) if line else {"error": "the target closed the connection"}
    except (OSError, TimeoutError, ValueError) as exc:
        answer = {"error": f"migration stream: {type(exc).__name__}"}
    finally:
        writer.close()
    if answer.get("ok") is True and not machine.migration_cancelled:
        machine.migration_done_source()
    else:
        machine.set_migration("failed", str(answer.get("error", "cancelled")))


async def migrate_in(machine: Any, uri: str) -> Any:
    """The target: listen, open every page, answer the source (returns the server)."""
    import asyncio

    mh: SimMh = machine.mh
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if done.is_set():
            writer.close()
            return
        done.set()
        machine.set_migration("active")
        error = None
        try:
            while True:
                line = await asyncio.wait_for(reader.readline(), MIGRATION_TIMEOUT_S)
                if not line:
                    error = "the source closed the stream early"
                    break
                msg = json.loads(line)
                if "end" in msg:
                    if msg["end"] != mh.pages_received:
                        error = "pages missing"
                    break
                mh.receive_page(int(msg["page"]), base64.b64decode(msg["data"], validate=True))
        except (ValueError, OSError, TimeoutError, KeyError) as exc:
            error = str(exc) or type(exc).__name__
        writer.write(json.dumps({"ok": True} if error is None else {"error": error}).encode() + b"\n")
        try:
            await writer.drain()
        except OSError:
            pass
        writer.close()
        if error is None:
            mh.arrived()
            machine.set_migration("completed")
        else:
            machine.set_migration("failed", error)
        server.close()

    machine.set_migration("setup")
    server = await _listen(uri, serve)
    return server
