"""The SEV guest policy bits the guest owner checks against its digest.

Guest policy (AMD SEV API, "Guest Policy"), a u32 the PSP binds into the
launch measurement:

    bit 0  NODBG     bit 1  NOKS     bit 2  ES     bit 3  NOSEND
    bit 4  DOMAIN    bit 5  SEV      bits 16-23  API_MAJOR, API_MINOR (minimum)

Bit 2 decides what the launch digest covers: QEMU 7.2 runs an SEV-ES guest
exactly when the policy has it (target/i386/sev.c ``sev_es_enabled``), and
only then measures one VMSA per vCPU after the firmware.  A digest computed
with VMSAs therefore belongs with a policy that has the bit, and one without
VMSAs with a policy that does not; any other pairing can never verify, and
says that the owner's configuration is wrong, not that the host lied.
"""

from __future__ import annotations

__all__ = ["SEV_POLICY_ES", "es_mismatch"]

SEV_POLICY_ES = 0x4


def es_mismatch(sev_es: bool, policy: int) -> str | None:
    """Why an (SEV-ES or SEV) digest cannot go with ``policy``, or None."""
    has_es = bool(policy & SEV_POLICY_ES)
    if sev_es and not has_es:
        return f"an SEV-ES digest (VMSAs measured) needs a policy with the SEV-ES bit 0x4; policy 0x{policy:x} has none"
    if has_es and not sev_es:
        return f"policy 0x{policy:x} has the SEV-ES bit 0x4, but the digest is an SEV digest (no VMSAs measured)"
    return None
