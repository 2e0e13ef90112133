"""The expected SEV / SEV-ES launch digest (GCTX.LD) of a QEMU 7.2 guest.

The PSP hashes, with SHA-256, every byte the hypervisor passes through
LAUNCH_UPDATE_DATA and LAUNCH_UPDATE_VMSA, in order.  The launch measurement
is an HMAC over this digest (see DESIGN.md), so the guest owner computes the
digest from the images it expects and compares.

What QEMU 7.2 + KVM feed in, in order:

1. the firmware image, whole (hw/i386 x86_firmware_configure ->
   sev_encrypt_flash on the -bios ROM or pflash unit 0);
2. with ``-kernel`` and ``sev-guest,kernel-hashes=on``: the 176-byte padded
   kernel hashes table (sev_add_kernel_loader_hashes).  QEMU writes it into
   the guest RAM area OVMF names (not into the flash image) and measures it as
   a separate update after the firmware, so it is appended, not patched in;
3. for SEV-ES (policy bit 2): one VMSA page per vCPU, the BSP first
   (sev_launch_get_measure -> KVM_SEV_LAUNCH_UPDATE_VMSA).

libvirt's virt-qemu-sev-validate, sevctl ``measurement build`` and
sev-snp-measure (``--mode sev|seves``) compute the same thing.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes

from agent.common.errors import SevFormatError
from agent.sev.hashes_table import PADDED_SIZE, kernel_hashes_table
from agent.sev.ovmf import FirmwareError, OvmfImage
from agent.sev.vmsa import VmsaOptions, vmsa_pages


def launch_data(
    firmware: bytes,
    *,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    append: str | bytes | None = None,
    sev_es: bool = False,
    vcpus: int = 1,
    vcpu_sig: int | None = None,
    vmsa_options: VmsaOptions = VmsaOptions(),
) -> list[bytes]:
    """The measured updates, in order (each one LAUNCH_UPDATE_* call)."""
    if kernel is None and (initrd is not None or append is not None):
        raise SevFormatError("an initrd or a command line is only measured with a kernel")
    image = OvmfImage(firmware)
    parts = [image.data]
    if kernel is not None:
        parts.append(_hashes_table(image, kernel, initrd, append))
    if sev_es:
        if vcpu_sig is None:
            raise SevFormatError("SEV-ES needs the vCPU signature (or family/model/stepping)")
        reset = image.sev_es_reset_address()
        if reset is None:
            raise FirmwareError(
                "firmware has no SEV-ES reset block: it cannot start an SEV-ES guest"
                + (f" ({image.table_problem})" if image.table_problem else "")
            )
        parts.extend(vmsa_pages(vcpus, vcpu_sig, reset, vmsa_options))
    return parts


def launch_digest(
    firmware: bytes,
    *,
    kernel: bytes | None = None,
    initrd: bytes | None = None,
    append: str | bytes | None = None,
    sev_es: bool = False,
    vcpus: int = 1,
    vcpu_sig: int | None = None,
    vmsa_options: VmsaOptions = VmsaOptions(),
) -> bytes:
    """SHA-256 of the launch data: the digest the PSP's measurement covers."""
    digest = hashes.Hash(hashes.SHA256())
    for part in launch_data(
        firmware,
        kernel=kernel,
        initrd=initrd,
        append=append,
        sev_es=sev_es,
        vcpus=vcpus,
        vcpu_sig=vcpu_sig,
        vmsa_options=vmsa_options,
    ):
        digest.update(part)
    return digest.finalize()


def _hashes_table(image: OvmfImage, kernel: bytes, initrd: bytes | None, append: str | bytes | None) -> bytes:
    # QEMU refuses to start rather than boot an unmeasured kernel; so do we,
    # rather than hand out a digest no real launch can produce.
    area = image.hashes_table_area()
    if area is None:
        why = image.table_problem or "its GUID table has no SEV hashes-table entry"
        raise FirmwareError(f"firmware cannot measure a kernel: {why}")
    if area.base == 0 or area.size < PADDED_SIZE:
        raise FirmwareError(f"firmware hashes-table area is invalid (base={area.base:#x} size={area.size:#x})")
    return kernel_hashes_table(kernel, initrd, append)
