"""The RFC 7919 ``ffdhe2048`` group, as the ``dh-params.pem`` QEMU reads.

A server-side ``tls-creds-psk`` whose directory has no ``dh-params.pem``
makes QEMU generate DH parameters inside ``object-add`` (80-300 ms measured,
QEMU blocked).  RFC 7919 defines its groups from the digits of e, so the
prime is computed here from its definition rather than pasted in:

    p = 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1,  g = 2

The test suite checks p against the RFC's published leading and trailing
words and that p and (p - 1) / 2 are (probable) primes.
"""

from __future__ import annotations

from functools import lru_cache

FFDHE2048_OFFSET = 560316


def _floor_e_times_2_pow(bits: int) -> int:
    """floor(e * 2^bits), exactly, from e = sum 1/k! with guard bits."""
    guard = 64
    scale = 1 << (bits + guard)
    total, term, k = 0, scale, 0
    while term:
        total += term
        k += 1
        term //= k
    return total >> guard


@lru_cache(maxsize=1)
def ffdhe2048_prime() -> int:
    return 2**2048 - 2**1984 + (_floor_e_times_2_pow(1918) + FFDHE2048_OFFSET) * 2**64 - 1


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # leading 0: positive
    return b"\x02" + _der_length(len(body)) + body


@lru_cache(maxsize=1)
def ffdhe2048_pem() -> str:
    """PKCS#3 ``DHParameter ::= SEQUENCE { prime INTEGER, base INTEGER }`` as PEM.

    GnuTLS (``gnutls_dh_params_import_pkcs3``) wants "BEGIN DH PARAMETERS";
    cryptography's DH serialisation is deprecated and may write the X9.42
    form, so the two-integer DER sequence is written here.
    """
    import base64
    import textwrap

    body = _der_integer(ffdhe2048_prime()) + _der_integer(2)
    der = b"\x30" + _der_length(len(body)) + body
    lines = textwrap.wrap(base64.b64encode(der).decode(), 64)
    return "-----BEGIN DH PARAMETERS-----\n" + "\n".join(lines) + "\n-----END DH PARAMETERS-----\n"
