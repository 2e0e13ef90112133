"""The simulator's own AMD: an ARK and an ASK of its own, in AMD's format.

A real platform's CEK is signed by AMD's ASK, which no test can do.  The
simulator therefore plays AMD too: it makes an ARK (self-signed) and an ASK
(signed by the ARK) with RSA-4096 and RSASSA-PSS/SHA-384, exactly as Rome
and later parts have them, and signs its platforms' CEKs with that ASK.  A
guest owner trusts this root only when told to (``[platform] amd_roots =
DIR``, the files :meth:`SimAmd.write_roots` writes); the real AMD roots in
the package never vouch for it.

Making two RSA-4096 keys takes about a second, so one :class:`SimAmd` is
shared per process (:func:`shared_amd`) unless a caller brings its own.
"""

from __future__ import annotations

import os
import threading

from cryptography.hazmat.primitives.asymmetric import rsa

from agent.sev.ca import USAGE_ARK, AmdRoots, make_ca_certificate, sign_cek
from agent.sev.cert import USAGE_ASK, Certificate

__all__ = ["SimAmd", "shared_amd", "SIM_PRODUCT"]

#: the product name of the simulator's root (``sim-ark.cert``, ``sim-ask.cert``)
SIM_PRODUCT = "sim"


class SimAmd:
    """An ARK and ASK key pair with their AMD-format certificates."""

    def __init__(self, bits: int = 4096, product: str = SIM_PRODUCT) -> None:
        self.product = product
        ark_key = rsa.generate_private_key(65537, bits)
        self._ask_key = rsa.generate_private_key(65537, bits)
        ark_id, ask_id = os.urandom(16), os.urandom(16)
        self.ark = make_ca_certificate(
            ark_key.public_key(), key_id=ark_id, usage=USAGE_ARK, signer_id=ark_id, signer_key=ark_key
        )
        self.ask = make_ca_certificate(
            self._ask_key.public_key(), key_id=ask_id, usage=USAGE_ASK, signer_id=ark_id, signer_key=ark_key
        )
        del ark_key  # the ARK signed the ASK; nothing else needs it

    def __repr__(self) -> str:
        return f"SimAmd(product={self.product!r})"

    def roots(self) -> AmdRoots:
        return AmdRoots.from_bytes(self.product, self.ark.to_bytes(), self.ask.to_bytes())

    def sign_cek(self, cek: Certificate) -> Certificate:
        """What AMD's key server hands out: the CEK with the ASK's signature."""
        return sign_cek(cek, self._ask_key)

    def write_roots(self, directory: str) -> list[str]:
        """``<product>-ark.cert`` and ``<product>-ask.cert`` (public, 0644) in ``directory``."""
        os.makedirs(directory, mode=0o755, exist_ok=True)
        written = []
        for kind, cert in (("ark", self.ark), ("ask", self.ask)):
            path = os.path.join(directory, f"{self.product}-{kind}.cert")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(cert.to_bytes())
            written.append(path)
        return written


_shared: SimAmd | None = None
_lock = threading.Lock()


def shared_amd() -> SimAmd:
    """The process's simulated AMD, made on first use."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = SimAmd()
        return _shared
