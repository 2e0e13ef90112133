"""Sealed hand-over of a migration PSK from source to destination.

The management layer carries two opaque blobs between the hosts and can
read neither key:

* the destination's **offer**: a one-time X25519 public key and an offer id;
* the source's **cookie**: the PSK sealed to that key.

Sealing is ECIES-style: an ephemeral X25519 key on the source, HKDF-SHA256
over the shared secret (salt = offer id, info binds both public keys), and
AES-256-GCM with the cookie header as associated data.  A cookie opens only
with the private key of its own offer, only once (the destination forgets
the private key when it opens one), and any changed byte fails the tag.

Pure functions: the caller supplies every random value.

Layouts (big-endian where it matters; all fields fixed size)::

    offer  = "KAO1" | offer_id[16] | x25519_pub[32]                       (52 bytes)
    cookie = "KAC1" | offer_id[16] | eph_pub[32] | nonce[12] | AEAD(psk)  (64 + len(psk) + 16)
"""

from __future__ import annotations

import base64
import binascii
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

OFFER_MAGIC = b"KAO1"
COOKIE_MAGIC = b"KAC1"
OFFER = struct.Struct("!4s16s32s")  # magic, offer_id, x25519 public key
COOKIE_HEADER = struct.Struct("!4s16s32s12s")  # magic, offer_id, ephemeral public key, nonce
INFO = b"keyagent migration psk v1"
MAX_PSK = 1024


class SealError(ValueError):
    """A one-line reason; never holds key bytes."""


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def _b64decode(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise SealError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SealError(f"{what} is not valid base64") from None


def make_offer(private_key: bytes, offer_id: bytes) -> str:
    """The destination's offer (base64) for a fresh 32-byte private key."""
    key = X25519PrivateKey.from_private_bytes(private_key)
    return base64.b64encode(OFFER.pack(OFFER_MAGIC, offer_id, _raw_public(key))).decode()


def parse_offer(offer_b64: str) -> tuple[bytes, bytes]:
    """-> (offer_id, public key)."""
    raw = _b64decode(offer_b64, "offer")
    if len(raw) != OFFER.size:
        raise SealError(f"offer is {len(raw)} bytes, expected {OFFER.size}")
    magic, offer_id, public = OFFER.unpack(raw)
    if magic != OFFER_MAGIC:
        raise SealError("not a keyagent migration offer")
    return offer_id, public


def _key(shared: bytes, offer_id: bytes, eph_pub: bytes, dest_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=offer_id,
                info=INFO + eph_pub + dest_pub).derive(shared)


def seal(offer_b64: str, psk: bytes, ephemeral_private: bytes, nonce: bytes) -> str:
    """The source's cookie (base64): ``psk`` sealed to the offer's key."""
    if not 1 <= len(psk) <= MAX_PSK:
        raise SealError(f"PSK must be 1..{MAX_PSK} bytes")
    offer_id, dest_pub = parse_offer(offer_b64)
    eph = X25519PrivateKey.from_private_bytes(ephemeral_private)
    eph_pub = _raw_public(eph)
    try:
        shared = eph.exchange(X25519PublicKey.from_public_bytes(dest_pub))
    except ValueError:
        raise SealError("offer holds an invalid public key") from None
    header = COOKIE_HEADER.pack(COOKIE_MAGIC, offer_id, eph_pub, nonce)
    sealed = AESGCM(_key(shared, offer_id, eph_pub, dest_pub)).encrypt(nonce, psk, header)
    return base64.b64encode(header + sealed).decode()


def cookie_offer_id(cookie_b64: str) -> bytes:
    raw = _b64decode(cookie_b64, "cookie")
    if len(raw) < COOKIE_HEADER.size + 16 + 1:
        raise SealError("cookie is too short")
    magic, offer_id, _eph, _nonce = COOKIE_HEADER.unpack_from(raw)
    if magic != COOKIE_MAGIC:
        raise SealError("not a keyagent migration cookie")
    return offer_id


def unseal(cookie_b64: str, private_key: bytes, offer_id: bytes) -> bytes:
    """Open a cookie with the destination's private key for ``offer_id``."""
    raw = _b64decode(cookie_b64, "cookie")
    if cookie_offer_id(cookie_b64) != offer_id:
        raise SealError("cookie was sealed for another offer")
    header, sealed = raw[:COOKIE_HEADER.size], raw[COOKIE_HEADER.size:]
    _magic, _oid, eph_pub, nonce = COOKIE_HEADER.unpack(header)
    key = X25519PrivateKey.from_private_bytes(private_key)
    dest_pub = _raw_public(key)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        return AESGCM(_key(shared, offer_id, eph_pub, dest_pub)).decrypt(nonce, sealed, header)
    except (InvalidTag, ValueError):
        raise SealError("cookie does not open: tampered, or not sealed to this offer") from None
