"""The authenticated hand-over of a migration PSK from source to destination.

The management layer carries two blobs between the hosts.  It can read
them, change them, drop them or replay them; it must not be able to read
the PSK, plant a PSK of its own, or get either agent to talk to a host
that is not trusted.  Hence (``docs/handover.md`` is the specification):

* the destination's **offer**: a one-time HPKE (X25519) public key, the VM's
  name and an offer id, signed with the destination's **host key**
  (Ed25519);
* the source's **cookie**: the PSK sealed with HPKE (RFC 9180, base mode,
  DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM) to the offer's key,
  with the VM, the direction and the offer (its SHA-256) in HPKE's
  ``info``; the whole cookie signed with the source's host key.

Each side accepts the other's blob only when it is signed by a key in its
trusted-hosts directory and names its own VM.  The offer and the cookie are
signed under different context strings that name the direction
("source->destination"), and have different magics: one cannot stand in for
the other.  The destination keeps the offer's private key in memory only,
for one cookie (see ``agent.app.verbs.migrate``).

HPKE's ``info`` takes the place of associated data (cryptography's public
HPKE API has no AAD); what it binds is also covered by the signature.

Layouts (``struct`` formats; multi-byte fields are byte strings)::

    offer  = OFFER_HEAD  | vm[vm_len] | signature[64]
             OFFER_HEAD  = "!4s16s32s32sB": magic "KAO2", offer_id, hpke_public (X25519),
                           destination host key (Ed25519 public), vm_len
             signature   = Ed25519(destination host key, OFFER_CONTEXT | offer[:-64])
    cookie = COOKIE_HEAD | vm[vm_len] | enc[32] | ct[len(psk) + 16] | signature[64]
             COOKIE_HEAD = "!4s32s32sB": magic "KAC2", offer_hash = SHA-256(offer),
                           source host key (Ed25519 public), vm_len
             enc | ct    = HPKE.Seal(hpke_public, info=PSK_INFO | offer_hash | source host key
                           | vm_len | vm, psk)
             signature   = Ed25519(source host key, COOKIE_CONTEXT | cookie[:-64])

The functions take their keys from the caller; randomness is HPKE's own
ephemeral key (inside ``cryptography``) and the caller's offer id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

OFFER_MAGIC = b"KAO2"
COOKIE_MAGIC = b"KAC2"
OFFER_HEAD = struct.Struct("!4s16s32s32sB")  # magic, offer_id, hpke_public, dest host key, vm_len
COOKIE_HEAD = struct.Struct("!4s32s32sB")  # magic, offer_hash, source host key, vm_len
SIGNATURE = 64
ENC = 32  # DHKEM(X25519) encapsulated key
TAG = 16  # AES-256-GCM
DIRECTION = b"source->destination"
_V = b"keyagent migration hand-over v2\x00"
OFFER_CONTEXT = _V + b"offer\x00" + DIRECTION + b"\x00"
COOKIE_CONTEXT = _V + b"cookie\x00" + DIRECTION + b"\x00"
PSK_INFO = _V + b"psk\x00" + DIRECTION + b"\x00"
MIN_PSK, MAX_PSK = 16, 512  # [migration] psk_length's range
MAX_BLOB = 4096


class SealError(ValueError):
    """A one-line reason; never holds key bytes."""

    status = 400


class Malformed(SealError):
    """Not an offer or a cookie at all (bad base64, size, magic): the request is bad."""

    status = 400


class Refused(SealError):
    """Well-formed but not acceptable: unknown host, bad signature, other VM, other offer."""

    status = 403


SUITE = None


def _suite():
    global SUITE
    if SUITE is None:
        SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    return SUITE


def _raw_public(key) -> bytes:
    # public_bytes_raw, not public_bytes(Encoding.Raw, ...): the latter's enums
    # live in cryptography's ``serialization`` package (PEM, SSH, PKCS#12: ~5 ms
    # of CPU to import), which nothing else here needs.
    return bytes(key.public_key().public_bytes_raw())


# The warm-up's keys: everyone's, never ours (the scalar and the seed zero).
_WARM_SEED = bytes(32)
_WARM_INFO = b"keyagent warm-up\x00"


def warm() -> None:
    """Load now what the first hand-over would load inside the migration.

    The first X25519 key imports cryptography's OpenSSL backend (~7 ms of
    CPU: ``X25519PublicKey.from_public_bytes`` checks it supports X25519),
    and OpenSSL 3 looks up each algorithm (Ed25519, X25519, HKDF,
    AES-256-GCM) the first time it is used (~1 ms in all).  So one round of
    what :func:`make_offer`, :func:`seal`, :func:`verify_offer` and
    :func:`open_cookie` do, with keys whose private halves are zero: known
    to all, holding nothing, dropped at once.  No randomness but HPKE's own
    ephemeral key.  Called by a sidecar with host keys once it is idle
    (``agent.app.sidecar``).
    """
    signer = Ed25519PrivateKey.from_private_bytes(_WARM_SEED)
    Ed25519PublicKey.from_public_bytes(_raw_public(signer)).verify(signer.sign(_WARM_INFO), _WARM_INFO)
    recipient = X25519PrivateKey.from_private_bytes(_WARM_SEED)
    public = X25519PublicKey.from_public_bytes(_raw_public(recipient))
    _suite().decrypt(_suite().encrypt(_WARM_INFO, public, info=_WARM_INFO), recipient, info=_WARM_INFO)


def _b64decode(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise Malformed(f"{what} must be a base64 string")
    if len(text) > MAX_BLOB * 2:
        raise Malformed(f"{what} is too long")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed(f"{what} is not valid base64") from None


def _vm_bytes(vm: str) -> bytes:
    raw = vm.encode()
    if not 1 <= len(raw) <= 255:
        raise SealError("VM name must be 1..255 bytes")
    return raw


def _vm_field(raw: bytes, offset: int, length: int, what: str) -> str:
    try:
        return raw[offset : offset + length].decode()
    except UnicodeDecodeError:
        raise Malformed(f"{what} holds a VM name that is not UTF-8") from None


def _check_signer(host: bytes, trusted: dict[bytes, str], what: str, role: str) -> str:
    name = trusted.get(host)
    if name is None:
        raise Refused(
            f"{what} is signed by a host this agent does not trust "
            f"(not in [migration] trusted_hosts): an unknown {role}"
        )
    return name


def _verify(host: bytes, signature: bytes, data: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(host).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise Refused(f"{what} signature does not verify: changed after it was signed") from None


def _check_vm(theirs: str, ours: str, what: str) -> None:
    if theirs != ours:
        raise Refused(f"{what} is for VM {theirs!r}, this agent runs {ours!r}")


# -- the offer (destination -> source) ---------------------------------------------------


@dataclass(frozen=True)
class Offer:
    raw: bytes
    offer_id: bytes
    hpke_public: bytes
    host: bytes  # the destination's host key (Ed25519 public)
    vm: str

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


def make_offer(host_key: Ed25519PrivateKey, vm: str, offer_id: bytes, hpke_private: bytes) -> str:
    """The destination's signed offer (base64) for a fresh 32-byte HPKE private key."""
    if len(offer_id) != 16:
        raise SealError("offer id must be 16 bytes")
    vm_raw = _vm_bytes(vm)
    body = (
        OFFER_HEAD.pack(
            OFFER_MAGIC,
            offer_id,
            _raw_public(X25519PrivateKey.from_private_bytes(hpke_private)),
            _raw_public(host_key),
            len(vm_raw),
        )
        + vm_raw
    )
    return base64.b64encode(body + host_key.sign(OFFER_CONTEXT + body)).decode()


def parse_offer(offer_b64: object) -> Offer:
    """The offer's fields, unverified (for logs and for :func:`verify_offer`)."""
    raw = _b64decode(offer_b64, "offer")
    if len(raw) < OFFER_HEAD.size + 1 + SIGNATURE:
        raise Malformed(f"offer is {len(raw)} bytes, too short")
    magic, offer_id, hpke_public, host, vm_len = OFFER_HEAD.unpack_from(raw)
    if magic != OFFER_MAGIC:
        raise Malformed("not a keyagent migration offer (v2)")
    if len(raw) != OFFER_HEAD.size + vm_len + SIGNATURE or vm_len == 0:
        raise Malformed(f"offer is {len(raw)} bytes, its VM name says {OFFER_HEAD.size + vm_len + SIGNATURE}")
    vm = _vm_field(raw, OFFER_HEAD.size, vm_len, "offer")
    return Offer(raw, offer_id, hpke_public, host, vm)


def verify_offer(offer_b64: object, vm: str, trusted: dict[bytes, str]) -> tuple[Offer, str]:
    """The source's checks: a trusted destination signed it, for our VM.  -> (offer, host name)."""
    offer = parse_offer(offer_b64)
    name = _check_signer(offer.host, trusted, "offer", "destination")
    _verify(offer.host, offer.raw[-SIGNATURE:], OFFER_CONTEXT + offer.raw[:-SIGNATURE], "offer")
    _check_vm(offer.vm, vm, "offer")
    try:
        X25519PublicKey.from_public_bytes(offer.hpke_public)
    except ValueError:
        raise Refused("offer holds an invalid HPKE public key") from None
    return offer, name


# -- the cookie (source -> destination) ------------------------------------------------


@dataclass(frozen=True)
class Cookie:
    raw: bytes
    offer_hash: bytes
    host: bytes  # the source's host key (Ed25519 public)
    vm: str
    sealed: bytes  # enc | ct


def _psk_info(offer_hash: bytes, source_host: bytes, vm_raw: bytes) -> bytes:
    return PSK_INFO + offer_hash + source_host + bytes([len(vm_raw)]) + vm_raw


def seal(offer: Offer, vm: str, psk: bytes, host_key: Ed25519PrivateKey) -> str:
    """The source's cookie (base64): ``psk`` sealed to a verified offer, signed."""
    if not MIN_PSK <= len(psk) <= MAX_PSK:
        raise SealError(f"PSK must be {MIN_PSK}..{MAX_PSK} bytes")
    vm_raw = _vm_bytes(vm)
    source_host = _raw_public(host_key)
    digest = offer.digest
    sealed = _suite().encrypt(
        psk, X25519PublicKey.from_public_bytes(offer.hpke_public), info=_psk_info(digest, source_host, vm_raw)
    )
    body = COOKIE_HEAD.pack(COOKIE_MAGIC, digest, source_host, len(vm_raw)) + vm_raw + sealed
    return base64.b64encode(body + host_key.sign(COOKIE_CONTEXT + body)).decode()


def parse_cookie(cookie_b64: object) -> Cookie:
    raw = _b64decode(cookie_b64, "cookie")
    if len(raw) < COOKIE_HEAD.size + 1 + ENC + MIN_PSK + TAG + SIGNATURE:
        raise Malformed(f"cookie is {len(raw)} bytes, too short")
    magic, offer_hash, host, vm_len = COOKIE_HEAD.unpack_from(raw)
    if magic != COOKIE_MAGIC:
        raise Malformed("not a keyagent migration cookie (v2)")
    sealed_len = len(raw) - COOKIE_HEAD.size - vm_len - SIGNATURE
    if vm_len == 0 or not ENC + MIN_PSK + TAG <= sealed_len <= ENC + MAX_PSK + TAG:
        raise Malformed(f"cookie is {len(raw)} bytes: no room for a sealed PSK")
    vm = _vm_field(raw, COOKIE_HEAD.size, vm_len, "cookie")
    sealed = raw[COOKIE_HEAD.size + vm_len : -SIGNATURE]
    return Cookie(raw, offer_hash, host, vm, sealed)


def verify_cookie(cookie_b64: object, vm: str, trusted: dict[bytes, str]) -> tuple[Cookie, str]:
    """The destination's checks: a trusted source signed it, for our VM.  -> (cookie, host name).

    Which offer it answers (``cookie.offer_hash``) is the caller's to look up.
    """
    cookie = parse_cookie(cookie_b64)
    name = _check_signer(cookie.host, trusted, "cookie", "source")
    _verify(cookie.host, cookie.raw[-SIGNATURE:], COOKIE_CONTEXT + cookie.raw[:-SIGNATURE], "cookie")
    _check_vm(cookie.vm, vm, "cookie")
    return cookie, name


def open_cookie(cookie: Cookie, offer: Offer, hpke_private: bytes) -> bytes:
    """The PSK from a verified cookie, with the private key of the offer it answers."""
    if not hmac.compare_digest(cookie.offer_hash, offer.digest):
        raise Refused("cookie answers another offer")
    key = X25519PrivateKey.from_private_bytes(hpke_private)
    try:
        return _suite().decrypt(cookie.sealed, key, info=_psk_info(offer.digest, cookie.host, cookie.vm.encode()))
    except (InvalidTag, ValueError):
        raise Refused("cookie does not open: not sealed to this offer's key") from None
