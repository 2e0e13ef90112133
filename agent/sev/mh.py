"""SEV fast migration: the migration handlers' (MH) keys and what both sides derive.

A migration handler runs inside the guest on each side of a migration; the
source MH encrypts guest pages with a *transport key* that only the target
MH can compute, and the hypervisor carries ciphertext (docs/mh.md).  The
guest owner provisions the keys through launch secrets:

* ordinary boot: [identity private key, empty source public key];
* migration target: [target private key, source public key].

Key type: X25519 (RFC 7748).  Why: 32-byte raw keys (a small secret-table
entry), no point validation to get wrong (every 32-byte string is a valid
public key; an all-zero shared secret is refused), constant-time in
``cryptography``, and the same curve the agents' hand-over (HPKE) uses.
Encodings, everywhere (secret table, owner protocol, simulator): the raw
32-byte private scalar (``PrivateFormat.Raw``) and the raw 32-byte public
key (``PublicFormat.Raw``); base64 on JSON.

Derivation (both MHs, and the owner once when it makes the target's pair)::

    shared    = X25519(source_private, target_public) = X25519(target_private, source_public)
    context   = vm_len u8 || vm (UTF-8) || source_public[32] || target_public[32]
    transport = HKDF-SHA256(shared, salt="", info=TRANSPORT_INFO || context, 32)
    confirm   = HKDF-SHA256(shared, salt="", info=CONFIRM_INFO || context, 32)
    tag       = HMAC-SHA256(confirm, TAG_LABEL || target_public)

The hypervisor hands the target's public key to the source MH; anyone
could substitute their own, so the owner sends ``tag`` with it, and the
source MH uses a peer key only if the tag verifies under the ``confirm`` key
it derives itself (only holders of the source's or the target's private key
can make it).  The owner computes the tag when it makes the target's pair,
then forgets the target's private key.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass, field

from agent.common.secret import Secret

__all__ = [
    "KEY_LEN",
    "TAG_LEN",
    "TRANSPORT_INFO",
    "CONFIRM_INFO",
    "TAG_LABEL",
    "MhKeys",
    "public_key",
    "derive",
    "confirm_tag",
    "tag_matches",
    "key_id",
]

KEY_LEN = 32  # X25519 private scalar and public key, raw
TAG_LEN = 32  # HMAC-SHA256
TRANSPORT_INFO = b"keyagent sev mh v1\0transport\0"
CONFIRM_INFO = b"keyagent sev mh v1\0confirm\0"
TAG_LABEL = b"keyagent sev mh v1\0target public key\0"

_VM_LEN = struct.Struct("B")  # vm_len u8, then the name's UTF-8 bytes


@dataclass(frozen=True)
class MhKeys:
    """What an MH (or the owner, once) derives for one source/target pair."""

    transport: Secret = field(repr=False)
    confirm: Secret = field(repr=False)

    def wipe(self) -> None:
        self.transport.wipe()
        self.confirm.wipe()


def public_key(private: bytes) -> bytes:
    """The raw X25519 public key of a raw 32-byte private key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    if len(private) != KEY_LEN:
        raise ValueError(f"an MH private key is {KEY_LEN} bytes, got {len(private)}")
    key = X25519PrivateKey.from_private_bytes(bytes(private))
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _context(vm: str, source_public: bytes, target_public: bytes) -> bytes:
    name = vm.encode()
    if not 1 <= len(name) <= 255:
        raise ValueError("vm name must be 1..255 bytes of UTF-8")
    for what, key in (("source", source_public), ("target", target_public)):
        if len(key) != KEY_LEN:
            raise ValueError(f"the {what} public key is {KEY_LEN} bytes, got {len(key)}")
    return _VM_LEN.pack(len(name)) + name + bytes(source_public) + bytes(target_public)


def derive(own_private: bytes, peer_public: bytes, vm: str, source_public: bytes, target_public: bytes) -> MhKeys:
    """Transport and confirmation keys; ValueError for a bad key or a zero shared secret."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    context = _context(vm, source_public, target_public)
    if len(own_private) != KEY_LEN or len(peer_public) != KEY_LEN:
        raise ValueError(f"MH keys are {KEY_LEN} bytes")
    private = X25519PrivateKey.from_private_bytes(bytes(own_private))
    # cryptography refuses an all-zero shared secret (a low-order peer key) with ValueError
    shared = bytearray(private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public))))
    try:
        out = []
        for info in (TRANSPORT_INFO, CONFIRM_INFO):
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info + context)
            out.append(Secret(hkdf.derive(bytes(shared))))
    finally:
        shared[:] = bytes(len(shared))
    return MhKeys(transport=out[0], confirm=out[1])


def confirm_tag(confirm: Secret, target_public: bytes) -> bytes:
    """The owner's tag over the target's public key (the source MH checks it)."""
    return hmac.new(confirm.reveal(), TAG_LABEL + bytes(target_public), "sha256").digest()


def tag_matches(confirm: Secret, target_public: bytes, tag: bytes) -> bool:
    """Constant-time check of a tag received with a peer key."""
    return hmac.compare_digest(confirm_tag(confirm, target_public), bytes(tag))


def key_id(public: bytes) -> str:
    """A short public name for an MH key (logs, audit): SHA-256 of the public key, 16 hex digits."""
    import hashlib

    return hashlib.sha256(bytes(public)).hexdigest()[:16]
