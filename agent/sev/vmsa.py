"""SEV-ES initial VMSA pages: the vCPU register state the PSP measures.

Under SEV-ES, QEMU 7.2 calls KVM_SEV_LAUNCH_UPDATE_VMSA once the machine is
built; KVM encrypts and measures each vCPU's save area (one 4 KiB page per
vCPU, in vCPU index order, the boot processor first).  The guest owner
rebuilds these pages from what it knows: the reset state of an x86 CPU as KVM
and QEMU set it, the AP reset address OVMF publishes, and the guest CPU's
CPUID signature (family/model/stepping), which QEMU leaves in RDX at reset.

Field layout: AMD APM Vol. 2, Table B-4 (VMSA layout, state save area for
SEV-ES), named as Linux ``struct sev_es_save_area`` (arch/x86/include/asm/
svm.h) and sev-snp-measure's vmsa.py.  Values: the reset state KVM produces
for a QEMU guest, as in libvirt's virt-qemu-sev-validate, sevctl ``vmsa
build --userspace qemu`` (virtee/sev ``Vmsa::init_amd64/init_kvm/init_qemu``)
and sev-snp-measure (``--vmm-type QEMU``).

What KVM puts in a VMSA besides the reset state depends on the VM type
QEMU creates, which the caller selects:

- ``fpu_init``: QEMU 9.1 and later create SEV-ES guests with
  ``KVM_SEV_INIT2`` (unless ``sev-guest,legacy-vm-type=on``), and only for
  such a VM does KVM store the reset FPU state in the VMSA: MXCSR = 0x1f80,
  x87 FCW = 0x37f (sev-snp-measure models only this).  QEMU 7.2 uses
  ``KVM_SEV_ES_INIT`` (Debian 12; sevctl's and libvirt's vectors): both stay
  zero, whatever the host kernel.  Default: off, the QEMU 7.2 case.
- ``sev_features``: the SEV_FEATURES word; 0 for a plain SEV-ES guest.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from agent.common.errors import SevFormatError

PAGE_SIZE = 4096

# The BSP starts at the architectural reset vector.
BSP_RESET_ADDRESS = 0xFFFFFFF0

# struct vmcb_seg: selector, attrib, limit, base
VMCB_SEG = "HHIQ"

# struct sev_es_save_area, in order.  (name, struct format); the offset of
# each field is noted from the APM table so a misplaced field shows in review.
SAVE_AREA_FIELDS: tuple[tuple[str, str], ...] = (
    ("es", VMCB_SEG),  # 0x000
    ("cs", VMCB_SEG),  # 0x010
    ("ss", VMCB_SEG),  # 0x020
    ("ds", VMCB_SEG),  # 0x030
    ("fs", VMCB_SEG),  # 0x040
    ("gs", VMCB_SEG),  # 0x050
    ("gdtr", VMCB_SEG),  # 0x060
    ("ldtr", VMCB_SEG),  # 0x070
    ("idtr", VMCB_SEG),  # 0x080
    ("tr", VMCB_SEG),  # 0x090
    ("vmpl0_ssp", "Q"),  # 0x0a0
    ("vmpl1_ssp", "Q"),  # 0x0a8
    ("vmpl2_ssp", "Q"),  # 0x0b0
    ("vmpl3_ssp", "Q"),  # 0x0b8
    ("u_cet", "Q"),  # 0x0c0
    ("reserved_0xc8", "2s"),  # 0x0c8
    ("vmpl", "B"),  # 0x0ca
    ("cpl", "B"),  # 0x0cb
    ("reserved_0xcc", "4s"),  # 0x0cc
    ("efer", "Q"),  # 0x0d0
    ("reserved_0xd8", "104s"),  # 0x0d8
    ("xss", "Q"),  # 0x140
    ("cr4", "Q"),  # 0x148
    ("cr3", "Q"),  # 0x150
    ("cr0", "Q"),  # 0x158
    ("dr7", "Q"),  # 0x160
    ("dr6", "Q"),  # 0x168
    ("rflags", "Q"),  # 0x170
    ("rip", "Q"),  # 0x178
    ("dr0", "Q"),  # 0x180
    ("dr1", "Q"),  # 0x188
    ("dr2", "Q"),  # 0x190
    ("dr3", "Q"),  # 0x198
    ("dr0_addr_mask", "Q"),  # 0x1a0
    ("dr1_addr_mask", "Q"),  # 0x1a8
    ("dr2_addr_mask", "Q"),  # 0x1b0
    ("dr3_addr_mask", "Q"),  # 0x1b8
    ("reserved_0x1c0", "24s"),  # 0x1c0
    ("rsp", "Q"),  # 0x1d8
    ("s_cet", "Q"),  # 0x1e0
    ("ssp", "Q"),  # 0x1e8
    ("isst_addr", "Q"),  # 0x1f0
    ("rax", "Q"),  # 0x1f8
    ("star", "Q"),  # 0x200
    ("lstar", "Q"),  # 0x208
    ("cstar", "Q"),  # 0x210
    ("sfmask", "Q"),  # 0x218
    ("kernel_gs_base", "Q"),  # 0x220
    ("sysenter_cs", "Q"),  # 0x228
    ("sysenter_esp", "Q"),  # 0x230
    ("sysenter_eip", "Q"),  # 0x238
    ("cr2", "Q"),  # 0x240
    ("reserved_0x248", "32s"),  # 0x248
    ("g_pat", "Q"),  # 0x268
    ("dbgctl", "Q"),  # 0x270
    ("br_from", "Q"),  # 0x278
    ("br_to", "Q"),  # 0x280
    ("last_excp_from", "Q"),  # 0x288
    ("last_excp_to", "Q"),  # 0x290
    ("reserved_0x298", "80s"),  # 0x298
    ("pkru", "I"),  # 0x2e8
    ("tsc_aux", "I"),  # 0x2ec
    ("reserved_0x2f0", "24s"),  # 0x2f0
    ("rcx", "Q"),  # 0x308
    ("rdx", "Q"),  # 0x310
    ("rbx", "Q"),  # 0x318
    ("reserved_0x320", "Q"),  # 0x320
    ("rbp", "Q"),  # 0x328
    ("rsi", "Q"),  # 0x330
    ("rdi", "Q"),  # 0x338
    ("r8", "Q"),  # 0x340
    ("r9", "Q"),  # 0x348
    ("r10", "Q"),  # 0x350
    ("r11", "Q"),  # 0x358
    ("r12", "Q"),  # 0x360
    ("r13", "Q"),  # 0x368
    ("r14", "Q"),  # 0x370
    ("r15", "Q"),  # 0x378
    ("reserved_0x380", "16s"),  # 0x380
    ("guest_exit_info_1", "Q"),  # 0x390
    ("guest_exit_info_2", "Q"),  # 0x398
    ("guest_exit_int_info", "Q"),  # 0x3a0
    ("guest_nrip", "Q"),  # 0x3a8
    ("sev_features", "Q"),  # 0x3b0
    ("vintr_ctrl", "Q"),  # 0x3b8
    ("guest_exit_code", "Q"),  # 0x3c0
    ("virtual_tom", "Q"),  # 0x3c8
    ("tlb_id", "Q"),  # 0x3d0
    ("pcpu_id", "Q"),  # 0x3d8
    ("event_inj", "Q"),  # 0x3e0
    ("xcr0", "Q"),  # 0x3e8
    ("reserved_0x3f0", "16s"),  # 0x3f0
    # FPU save area
    ("x87_dp", "Q"),  # 0x400
    ("mxcsr", "I"),  # 0x408
    ("x87_ftw", "H"),  # 0x40c
    ("x87_fsw", "H"),  # 0x40e
    ("x87_fcw", "H"),  # 0x410
    ("x87_fop", "H"),  # 0x412
    ("x87_ds", "H"),  # 0x414
    ("x87_cs", "H"),  # 0x416
    ("x87_rip", "Q"),  # 0x418
    ("fpreg_x87", "80s"),  # 0x420
    ("fpreg_xmm", "256s"),  # 0x470
    ("fpreg_ymm", "256s"),  # 0x570
)  # ends at 0x670; the rest of the page is zero

SAVE_AREA = struct.Struct("<" + "".join(fmt for _, fmt in SAVE_AREA_FIELDS))


def field_offset(name: str) -> int:
    """Byte offset of a save-area field (for tests and debugging)."""
    fmt = "<"
    for field, field_fmt in SAVE_AREA_FIELDS:
        if field == name:
            return struct.calcsize(fmt)
        fmt += field_fmt
    raise KeyError(name)


def _zero(fmt: str) -> object:
    if fmt == VMCB_SEG:
        return (0, 0, 0, 0)
    if fmt.endswith("s"):
        return b""
    return 0


def pack_save_area(**values: object) -> bytes:
    """One VMSA page: the named fields set, everything else zero."""
    unknown = set(values) - {name for name, _ in SAVE_AREA_FIELDS}
    if unknown:
        raise KeyError(f"unknown VMSA fields: {sorted(unknown)}")
    flat: list[object] = []
    for name, fmt in SAVE_AREA_FIELDS:
        value = values.get(name, _zero(fmt))
        if fmt == VMCB_SEG:
            flat.extend(value)  # type: ignore[arg-type]
        else:
            flat.append(value)
    area = SAVE_AREA.pack(*flat)
    return area + bytes(PAGE_SIZE - len(area))


# Segment attributes as KVM stores them in the VMCB (type | S | P, ...).
_DATA_SEG_ATTR = 0x93  # present, S, read/write, accessed
_CODE_SEG_ATTR = 0x9B  # present, S, code, read, accessed
_LDTR_ATTR = 0x82  # present, LDT
_TR_ATTR = 0x8B  # present, busy 32-bit TSS
# Reset values KVM/QEMU leave in the save area.
_EFER_SVME = 0x1000  # KVM sets EFER.SVME for SEV-ES guests
_CR4_MCE = 0x40  # KVM enables CR4.MCE
_CR0_ET = 0x10
_DR7_RESET = 0x400
_DR6_RESET = 0xFFFF0FF0
_RFLAGS_RESET = 0x2
_PAT_RESET = 0x0007040600070406  # APM Vol. 2 A.3
_XCR0_RESET = 0x1
_MXCSR_RESET = 0x1F80
_FCW_RESET = 0x37F


def cpu_signature(family: int, model: int, stepping: int) -> int:
    """CPUID Fn0000_0001_EAX from family/model/stepping, as QEMU encodes it.

    QEMU (target/i386/cpu.c x86_cpuid_version_set_*): a family above 0xf is
    base family 0xf plus the extended family; the model's high nibble goes to
    the extended model field.
    """
    if not 0 <= family <= 0xFF + 0xF:
        raise SevFormatError(f"vCPU family {family} out of range 0..{0xFF + 0xF}")
    if not 0 <= model <= 0xFF:
        raise SevFormatError(f"vCPU model {model} out of range 0..255")
    if not 0 <= stepping <= 0xF:
        raise SevFormatError(f"vCPU stepping {stepping} out of range 0..15")
    if family > 0xF:
        fam = 0xF00 | ((family - 0xF) << 20)
    else:
        fam = family << 8
    return fam | ((model & 0xF) << 4) | ((model >> 4) << 16) | stepping


@dataclass(frozen=True)
class VmsaOptions:
    """What KVM puts in a VMSA beyond the architectural reset state (by VM type)."""

    fpu_init: bool = False
    sev_features: int = 0


def build_vmsa(eip: int, vcpu_sig: int, options: VmsaOptions = VmsaOptions()) -> bytes:
    """The VMSA page of a vCPU that starts at ``eip`` (real mode, CS.sel 0xf000)."""
    if not 0 <= vcpu_sig <= 0xFFFFFFFF:
        raise SevFormatError(f"vCPU signature {vcpu_sig:#x} is not a 32-bit value")
    if not 0 <= eip <= 0xFFFFFFFF:
        raise SevFormatError(f"reset address {eip:#x} is not a 32-bit value")
    data_seg = (0, _DATA_SEG_ATTR, 0xFFFF, 0)
    fields: dict[str, object] = dict(
        es=data_seg,
        cs=(0xF000, _CODE_SEG_ATTR, 0xFFFF, eip & 0xFFFF0000),
        ss=data_seg,
        ds=data_seg,
        fs=data_seg,
        gs=data_seg,
        gdtr=(0, 0, 0xFFFF, 0),
        ldtr=(0, _LDTR_ATTR, 0xFFFF, 0),
        idtr=(0, 0, 0xFFFF, 0),
        tr=(0, _TR_ATTR, 0xFFFF, 0),
        efer=_EFER_SVME,
        cr4=_CR4_MCE,
        cr0=_CR0_ET,
        dr7=_DR7_RESET,
        dr6=_DR6_RESET,
        rflags=_RFLAGS_RESET,
        rip=eip & 0xFFFF,
        g_pat=_PAT_RESET,
        rdx=vcpu_sig,
        sev_features=options.sev_features,
        xcr0=_XCR0_RESET,
    )
    if options.fpu_init:
        fields.update(mxcsr=_MXCSR_RESET, x87_fcw=_FCW_RESET)
    return pack_save_area(**fields)


def vmsa_pages(
    vcpus: int, vcpu_sig: int, ap_reset_address: int, options: VmsaOptions = VmsaOptions()
) -> Iterator[bytes]:
    """The VMSA pages in the order KVM measures them: BSP, then each AP.

    QEMU (sev_es_set_reset_vector) points every vCPU but index 0 at the AP
    reset address from OVMF: CS base = addr & 0xffff0000, IP = addr & 0xffff.
    """
    if vcpus < 1:
        raise SevFormatError("an SEV-ES guest needs at least one vCPU")
    bsp = build_vmsa(BSP_RESET_ADDRESS, vcpu_sig, options)
    yield bsp
    if vcpus > 1:
        ap = build_vmsa(ap_reset_address, vcpu_sig, options)
        for _ in range(vcpus - 1):
            yield ap
