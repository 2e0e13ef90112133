"""Test SNP authorities (ARK/ASK/VCEK made here, RSA 2048 for speed) and reports they sign."""

from __future__ import annotations

import functools

from agent.sev.snp_report import Tcb
from agent.sev.snp_sign import TestAuthority, build_report, encode_tcb

CHIP_ID = bytes(range(64))
TCB = {
    "milan": Tcb(bootloader=3, tee=0, snp=8, microcode=115),
    "genoa": Tcb(bootloader=7, tee=0, snp=14, microcode=72),
    "turin": Tcb(bootloader=1, tee=0, snp=3, microcode=0x44, fmc=2),
}


def authority(product: str = "milan") -> TestAuthority:
    """One test authority per product for the whole session."""
    return _authority(product)


def vcek(product: str = "milan", chip_id: bytes = CHIP_ID):
    """(private key, certificate) of a VCEK for ``chip_id`` at the product's test TCB."""
    return _vcek(product, chip_id)


# Cached on positional arguments only, so vcek() and vcek("milan") are one VCEK.
@functools.cache
def _authority(product: str) -> TestAuthority:
    return TestAuthority.make(product, key_size=2048)


@functools.cache
def _vcek(product: str, chip_id: bytes):
    return authority(product).issue_vcek(chip_id, TCB[product])


def signed_report(product: str = "milan", **fields) -> bytes:
    """A report signed by the product's test VCEK, TCB and chip id matching it unless overridden."""
    key, _ = vcek(product)
    values = dict(
        reported_tcb=encode_tcb(TCB[product], product),
        chip_id=CHIP_ID,
        policy=0x30000,
        measurement=b"\x11" * 48,
        report_data=b"\x22" * 64,
        host_data=b"\x33" * 32,
    )
    values.update(fields)
    return build_report(key, **values)
