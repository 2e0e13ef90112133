"""A stand-in for the AMD Secure Processor's part of an SEV / SEV-ES launch.

SEV hardware is not available where keyagent is tested, so this class does
what the PSP firmware does for one guest between LAUNCH_START and
LAUNCH_FINISH, with the real cryptography (:mod:`agent.sev`):

* LAUNCH_MEASURE: ``MEASURE = HMAC-SHA256(TIK, 0x04 || api || build ||
  policy || digest || MNONCE)``, handed out as ``MEASURE || MNONCE``;
* LAUNCH_SECRET: check the packet header's MAC against the TIK and the
  MEASURE it reported, then decrypt the payload with the TEK;
* LAUNCH_FINISH: the guest runs; no more secrets.

:class:`Platform` is the PSP's own identity: the PDH key pair (whose
private half never leaves it) and a PEK / OCA / CEK chain it signs itself,
exported like PDH_CERT_EXPORT.  Its :meth:`Platform.launch_start` is
LAUNCH_START with a guest owner's session: it unwraps TEK and TIK from the
GODH certificate and the session blob (:func:`agent.sev.session.open_session`).

The session keys (TIK, TEK) never leave this object except through the MAC
and decryption results; errors carry the firmware status code that QEMU
prints (``fw_error=N 'text'``), never key or payload bytes.  No I/O, no
clock: the caller decides when LAUNCH_MEASURE happens.
"""

from __future__ import annotations

import enum
import os
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from agent.common.errors import SimError
from agent.common.secret import Secret
from agent.sev.cert import (
    ALGO_ECDH_SHA256,
    ALGO_ECDSA_SHA256,
    USAGE_CEK,
    USAGE_OCA,
    USAGE_PDH,
    USAGE_PEK,
    Certificate,
    PlatformChain,
)
from agent.sev.measurement import measurement_blob, split_blob
from agent.sev.packet import PacketError, open_packet, parse_header
from agent.sev.sizes import PACKET_HEADER_LEN

if TYPE_CHECKING:
    from agent.tools.sim.amd import SimAmd

__all__ = ["SevRet", "FW_ERROR_TEXT", "SEV_STATES", "FwError", "Psp", "Platform", "SEV_POLICY_ES"]

#: Guest policy bit 2: the guest is an SEV-ES guest (QEMU ``SEV_POLICY_ES``).
SEV_POLICY_ES = 0x4

#: QAPI ``SevState`` in declaration order (qapi/misc-target.json): QEMU prints
#: the index with ``%x`` in "SEV: Not in correct state. (LSECRET) %x".
SEV_STATES = ("uninit", "launch-update", "launch-secret", "running", "send-update", "receive-update")


class SevRet(enum.IntEnum):
    """Firmware status codes (Linux ``include/uapi/linux/psp-sev.h``)."""

    SUCCESS = 0
    INVALID_PLATFORM_STATE = 1
    INVALID_GUEST_STATE = 2
    INVALID_CONFIG = 3
    INVALID_LEN = 4
    ALREADY_OWNED = 5
    INVALID_CERTIFICATE = 6
    POLICY_FAILURE = 7
    INACTIVE = 8
    INVALID_ADDRESS = 9
    BAD_SIGNATURE = 10
    BAD_MEASUREMENT = 11
    ASID_OWNED = 12
    INVALID_ASID = 13
    WBINVD_REQUIRED = 14
    DFFLUSH_REQUIRED = 15
    INVALID_GUEST = 16
    INVALID_COMMAND = 17
    ACTIVE = 18
    HWSEV_RET_PLATFORM = 19
    HWSEV_RET_UNSAFE = 20
    UNSUPPORTED = 21
    INVALID_PARAM = 22
    RESOURCE_LIMIT = 23
    SECURE_DATA_INVALID = 24


#: QEMU's ``sev_fw_errlist`` (target/i386/sev.c), the text after fw_error=N.
FW_ERROR_TEXT = {
    SevRet.SUCCESS: "",
    SevRet.INVALID_PLATFORM_STATE: "Platform state is invalid",
    SevRet.INVALID_GUEST_STATE: "Guest state is invalid",
    SevRet.INVALID_CONFIG: "Platform configuration is invalid",
    SevRet.INVALID_LEN: "Buffer too small",
    SevRet.ALREADY_OWNED: "Platform is already owned",
    SevRet.INVALID_CERTIFICATE: "Certificate is invalid",
    SevRet.POLICY_FAILURE: "Policy is not allowed",
    SevRet.INACTIVE: "Guest is not active",
    SevRet.INVALID_ADDRESS: "Invalid address",
    SevRet.BAD_SIGNATURE: "Bad signature",
    SevRet.BAD_MEASUREMENT: "Bad measurement",
    SevRet.ASID_OWNED: "ASID is already owned",
    SevRet.INVALID_ASID: "Invalid ASID",
    SevRet.WBINVD_REQUIRED: "WBINVD is required",
    SevRet.DFFLUSH_REQUIRED: "DF_FLUSH is required",
    SevRet.INVALID_GUEST: "Guest handle is invalid",
    SevRet.INVALID_COMMAND: "Invalid command",
    SevRet.ACTIVE: "Guest is active",
    SevRet.HWSEV_RET_PLATFORM: "Hardware error",
    SevRet.HWSEV_RET_UNSAFE: "Hardware unsafe",
    SevRet.UNSUPPORTED: "Feature not supported",
    SevRet.INVALID_PARAM: "Invalid parameter",
    SevRet.RESOURCE_LIMIT: "Required firmware resource depleted",
    SevRet.SECURE_DATA_INVALID: "Part-specific integrity check failure",
}

#: What the kernel's KVM_MEMORY_ENCRYPT_OP returns when the firmware reports
#: an error status (``-EIO``); QEMU prints it as ``ret=-5``.
KVM_RET_FW_ERROR = -5


class FwError(SimError):
    """The firmware refused a command; ``code`` is its status."""

    def __init__(self, code: SevRet, why: str) -> None:
        super().__init__(f"{code.name}: {why}")
        self.code = code
        self.why = why  # for our logs only; never holds key or payload bytes

    @property
    def text(self) -> str:
        return FW_ERROR_TEXT.get(self.code, "unknown error")


class Psp:
    """One guest's launch context inside the PSP."""

    def __init__(
        self,
        tik: Secret,
        tek: Secret,
        *,
        digest: bytes,
        policy: int,
        api_major: int,
        api_minor: int,
        build_id: int,
        mnonce: bytes | None = None,
        handle: int = 1,
    ) -> None:
        if len(tik) != 16 or len(tek) != 16:
            raise ValueError("TIK and TEK must be 16 bytes each")
        self._tik = tik
        self._tek = tek
        self.digest = bytes(digest)
        self.policy = policy
        self.api_major = api_major
        self.api_minor = api_minor
        self.build_id = build_id
        self.handle = handle
        self._mnonce = bytes(mnonce) if mnonce is not None else os.urandom(16)
        if len(self._mnonce) != 16:
            raise ValueError("MNONCE must be 16 bytes")
        self._blob: bytes | None = None
        # LAUNCH_START has run when QEMU's monitor comes up.
        self.state = "launch-update"

    @property
    def state_index(self) -> int:
        return SEV_STATES.index(self.state)

    @property
    def measurement(self) -> bytes | None:
        """The 48-byte LAUNCH_MEASURE blob, once taken (QEMU: state >= launch-secret)."""
        return self._blob

    def launch_measure(self) -> bytes:
        """LAUNCH_MEASURE: close the launch digest and MAC it with the TIK."""
        if self.state != "launch-update":
            raise FwError(SevRet.INVALID_GUEST_STATE, f"LAUNCH_MEASURE in state {self.state}")
        self._blob = measurement_blob(
            self._tik.reveal(), self.api_major, self.api_minor, self.build_id, self.policy, self.digest, self._mnonce
        )
        self.state = "launch-secret"
        return self._blob

    def launch_secret(self, header: bytes, ciphertext: bytes) -> Secret:
        """LAUNCH_SECRET: the plaintext the PSP writes into guest memory.

        Refuses (``FwError``) a packet whose length is wrong, whose flags are
        not zero, or whose MAC does not verify against the TIK and the
        MEASURE this PSP reported.  Nothing changes on a refusal.
        """
        if self.state != "launch-secret" or self._blob is None:
            raise FwError(SevRet.INVALID_GUEST_STATE, f"LAUNCH_SECRET in state {self.state}")
        if len(header) != PACKET_HEADER_LEN:
            raise FwError(SevRet.INVALID_LEN, f"packet header is {len(header)} bytes, not {PACKET_HEADER_LEN}")
        if not ciphertext or len(ciphertext) % 16:
            raise FwError(SevRet.INVALID_LEN, f"payload is {len(ciphertext)} bytes, not a multiple of 16")
        flags, _iv, _mac = parse_header(header)
        if flags != 0:
            raise FwError(SevRet.INVALID_PARAM, f"packet flags 0x{flags:x}")
        measure, _mnonce = split_blob(self._blob)
        try:
            plaintext = open_packet(self._tik.reveal(), self._tek.reveal(), measure, header, ciphertext)
        except PacketError as exc:
            raise FwError(SevRet.BAD_MEASUREMENT, str(exc)) from None
        return Secret(plaintext)

    def launch_finish(self) -> None:
        """LAUNCH_FINISH: the guest is running; the launch context is closed."""
        if self.state not in ("launch-update", "launch-secret"):
            raise FwError(SevRet.INVALID_GUEST_STATE, f"LAUNCH_FINISH in state {self.state}")
        self.state = "running"

    def wipe(self) -> None:
        """Forget the session keys (at shutdown)."""
        self._tik.wipe()
        self._tek.wipe()


#: Which firmware status a refused session gets (SessionError.kind -> status).
#: The SEV API lists INVALID_CERTIFICATE for an unusable GODH, POLICY_FAILURE
#: for a policy the owner did not MAC; a wrap MAC that does not verify is
#: reported here as BAD_MEASUREMENT (an integrity check failing).
_SESSION_STATUS = {
    "certificate": SevRet.INVALID_CERTIFICATE,
    "length": SevRet.INVALID_LEN,
    "wrap-mac": SevRet.BAD_MEASUREMENT,
    "policy": SevRet.POLICY_FAILURE,
}


class Platform:
    """The simulated PSP's platform keys: the PDH and a chain that vouches for it.

    Real platforms have an OCA (the owner's CA, self-signed unless the
    platform was adopted), a CEK signed by AMD's ASK and a PEK signed by both;
    the PEK signs the PDH.  Here OCA, CEK and PEK are made fresh for every
    Platform, and the CEK is signed by the simulator's own AMD
    (:class:`agent.tools.sim.amd.SimAmd`: ``amd``, or the one shared per process),
    as AMD's key server would sign a real one.  The chain reports that
    signed CEK, as if the management layer had put it in.  The PDH key is
    either given (so a restarted simulator keeps accepting sessions made for
    its PDH) or fresh.  Only the private PDH key matters to a launch; the
    others exist to sign.
    """

    def __init__(
        self,
        pdh_private_key: ec.EllipticCurvePrivateKey | None = None,
        *,
        api_major: int = 0,
        api_minor: int = 0,
        amd: SimAmd | None = None,
    ) -> None:
        if pdh_private_key is None:
            pdh_private_key = ec.generate_private_key(ec.SECP384R1())
        elif (
            not isinstance(pdh_private_key, ec.EllipticCurvePrivateKey)
            or pdh_private_key.curve.name != ec.SECP384R1.name
        ):
            raise ValueError("the PDH private key must be an EC key on P-384")
        self._pdh_key = pdh_private_key
        self._amd = amd

        def new(usage: int, algo: int = ALGO_ECDSA_SHA256) -> tuple[ec.EllipticCurvePrivateKey, Certificate]:
            key = ec.generate_private_key(ec.SECP384R1())
            cert = Certificate.from_public_key(
                key.public_key(), usage=usage, algo=algo, api_major=api_major, api_minor=api_minor
            )
            return key, cert

        oca_key, oca = new(USAGE_OCA)
        oca = oca.signed(oca_key, USAGE_OCA)
        cek_key, cek = new(USAGE_CEK)
        pek_key, pek = new(USAGE_PEK)
        pek = pek.signed(oca_key, USAGE_OCA).signed(cek_key, USAGE_CEK)
        pdh = Certificate.from_public_key(
            pdh_private_key.public_key(),
            usage=USAGE_PDH,
            algo=ALGO_ECDH_SHA256,
            api_major=api_major,
            api_minor=api_minor,
        )
        self.pdh_cert: Certificate = pdh.signed(pek_key, USAGE_PEK)
        self.unsigned_cek = cek  # as PDH_CERT_EXPORT gives it: no ASK signature
        self._pek, self._oca = pek, oca
        self._chain: PlatformChain | None = None

    @property
    def amd(self) -> SimAmd:
        from agent.tools.sim.amd import shared_amd

        if self._amd is None:
            self._amd = shared_amd()
        return self._amd

    @property
    def chain(self) -> PlatformChain:
        """PEK || OCA || CEK, the CEK signed by the simulated AMD's ASK (made on first use)."""
        if self._chain is None:
            self._chain = PlatformChain(pek=self._pek, oca=self._oca, cek=self.amd.sign_cek(self.unsigned_cek))
        return self._chain

    def __repr__(self) -> str:
        return "Platform(<PDH key pair>)"

    def launch_start(self, godh_cert: bytes, session: bytes, policy: int) -> tuple[Secret, Secret]:
        """LAUNCH_START with an owner's session: ``(tik, tek)``, or FwError.

        The error names the check that failed (never key bytes), with the
        status the firmware would return.
        """
        from agent.sev.session import SessionError, open_session

        try:
            tek, tik = open_session(self._pdh_key, bytes(godh_cert), bytes(session), policy)
        except SessionError as exc:
            raise FwError(_SESSION_STATUS.get(exc.kind, SevRet.INVALID_PARAM), str(exc)) from None
        return Secret(tik), Secret(tek)
