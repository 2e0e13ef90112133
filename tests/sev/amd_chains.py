"""Real AMD platform chains (fixtures/sev/) and small helpers to damage them."""

from __future__ import annotations

from pathlib import Path

from agent.sev.cert import Certificate, PlatformChain

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures" / "sev"
NAMES = ("pdh", "pek", "oca", "cek")
REAL_PRODUCTS = ("naples", "rome")


def real_certs(product: str) -> dict[str, bytes]:
    """The PDH, PEK, OCA and CEK of a real ``product`` platform, raw bytes."""
    return {name: (FIXTURES / product / f"{name}.cert").read_bytes() for name in NAMES}


def parse(certs: dict[str, bytes]) -> tuple[Certificate, PlatformChain]:
    """(PDH, chain); ValueError as the parsers raise it."""
    chain = PlatformChain.from_bytes(certs["pek"] + certs["oca"] + certs["cek"])
    return Certificate.from_bytes(certs["pdh"]), chain


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)
