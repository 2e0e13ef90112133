"""sev-snp-measure (installed by the test extra) as an independent oracle."""

from pathlib import Path

from sevsnpmeasure import guest, vcpu_types
from sevsnpmeasure.sev_mode import SevMode


def oracle_digest(
    firmware: Path,
    *,
    vcpus: int,
    vcpu_type: str,
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    guest_features: int = 0x1,
) -> bytes:
    """sev-snp-measure --mode snp --vmm-type QEMU for the same inputs."""
    return guest.calc_launch_digest(
        SevMode.SEV_SNP,
        vcpus,
        vcpu_types.CPU_SIGS[vcpu_type],
        str(firmware),
        str(kernel) if kernel else None,
        str(initrd) if initrd else None,
        append,
        guest_features,
    )
