"""Public test vectors for the SEV formats, transcribed as constants.

Sources (values only; no code copied):
- sevctl = github.com/virtee/sevctl @ 8b47f3a (v0.6.2): tests/secretbuild.rs,
  tests/measurementbuild.rs, tests/data/{secret,measurement}/*.
- virtee/sev = github.com/virtee/sev @ 9cf2adb: src/session/mod.rs and
  src/session/key.rs unit tests.
"""

import base64
import uuid
from pathlib import Path

# sevctl's tests/data, copied unchanged into fixtures/sevctl (see its README).
SEVCTL_DATA = Path(__file__).resolve().parents[2] / "fixtures" / "sevctl"
SEVCTL_OVMF_NAME = "OVMF.amdsev.fd_trimmed_edk2-ovmf-20220126gitbb1bba3d77-4.el9"


def sevctl_file(name: str) -> bytes:
    """One of sevctl's data files; a missing one is a broken checkout, not a skip."""
    return (SEVCTL_DATA / name).read_bytes()


# --- sevctl tests/measurementbuild.rs -------------------------------------
# tests/data/measurement/tik1.bin
SEVCTL_MEASURE_TIK = bytes.fromhex("3569cf61a32a602b87185ac6e0f55913")
SEVCTL_MEASURE_NONCE = base64.b64decode("wxP6tRHCFrFQWxsuqZA8QA==")
SEVCTL_MEASURE_API = (1, 40, 40)  # --api-major 0x01 --api-minor 40 --build-id 40
SEVCTL_MEASURE_POLICY = 0x03

# (launch digest, expected `measurement build` output, base64 MEASURE||MNONCE)
# 1. --launch-digest given directly.
SEVCTL_DIGEST_GIVEN = base64.b64decode("xkvRAfyaSizgonxAjZIAkR8TmolUabBKQKb6KJCDDSM=")
SEVCTL_BLOB_GIVEN = "lswbxWxI9gckya16JQvdFtpYmNO4b+3inAPpqsgoBI7DE/q1EcIWsVBbGy6pkDxA"
# 2. --firmware tests/data/OVMF.amdsev.fd_trimmed_edk2-ovmf-20220126gitbb1bba3d77-4.el9
#    digest = SHA-256 of that 4096-byte file (computed from the fixture).
SEVCTL_DIGEST_FIRMWARE = bytes.fromhex("2f6fc6065f4abc131eb4fb2b5090a542636eae84a94c0db0fdd5f405cb372ff5")
SEVCTL_BLOB_FIRMWARE = "oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA"
# 3. firmware + --kernel vmlinuz-fake --initrd initrd-fake
#    --cmdline "foo bar baz fake kernel=cmdline": digest = SHA-256(firmware ||
#    padded SEV hashes table), computed from the fixtures.
SEVCTL_DIGEST_KERNEL = bytes.fromhex("4b47fec6f851487c33714c8a00a832a1b705ad0a7cac4a647388eccfa9f0c570")
SEVCTL_BLOB_KERNEL = "h3auYbWQnVW7EGLWN4Hf9SN0oEYMPU2sK4bLnefWPwvDE/q1EcIWsVBbGy6pkDxA"
# 4. SEV-ES: policy 0x05, API 1.49 build 6, 4 vCPUs, vmsa0.bin + 3 x vmsa1.bin;
#    the nonce comes from the expected blob itself.
SEVCTL_ES_API = (1, 49, 6)
SEVCTL_ES_POLICY = 0x05
SEVCTL_DIGEST_ES = bytes.fromhex("847b5ab6db136ea67dc5a95478ebe7e5ebbe93e9e74bdb1284165f9007a4e367")
SEVCTL_BLOB_ES = "/o0nzDKE5XgtVnUZWPhUea/WZYrTKLExR7KCwuMdbActvpWfXTFk21KMZIAAhQny"

# --- sevctl tests/secretbuild.rs -----------------------------------------
SEVCTL_SECRET_TIK = bytes.fromhex("c6d5a9956133050912b24bbe5c372686")  # tests/data/secret/tik1.bin
SEVCTL_SECRET_TEK = bytes.fromhex("52a869b79ab9c13bb6a92b0561619cb3")  # tests/data/secret/tek1.bin
SEVCTL_SECRET_BLOB = base64.b64decode("TLeA7607lZQntLjRY1/i+sbtdSZ+75zxpz4Px9hzpBLwItF5Q2o4prA++3ZZv9ZS")
SEVCTL_SECRET_IV = base64.b64decode("rFR07U3TLH2YnsUj2SVZ7A==")
SEVCTL_SECRET1 = (uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b"), b"MY-LUKS-PASSPHRASE")  # secret1.txt
SEVCTL_SECRET2 = (uuid.UUID("736869e5-aaaa-4973-92ec-06879ce3da0b"), b"SOME OTHER SECRET")  # secret2.txt
# one secret (secret1)
SEVCTL_HEADER_ONE = "AAAAAKxUdO1N0yx9mJ7FI9klWey8FSzeYQ4X8K71VzNKLU/KQsIsQxLjtbhaPUewqshX5Q=="
SEVCTL_PAYLOAD_ONE = "0U3e5PcXv0UW+H4tSBFKOdCYfKE1+j38Bc2fuO16mYiyI+sWx7INfn+lgYj56GL12yyinDa+lVfCCwD/2w5cPA=="
# two secrets (secret1, secret2)
SEVCTL_HEADER_TWO = "AAAAAKxUdO1N0yx9mJ7FI9klWeyZ3r0dOEKHUOhIRqzGYYvTJgdMtBPL1nK6GD9aGET7Ng=="
SEVCTL_PAYLOAD_TWO = (
    "0U3e5PcXv0UW+H4tSBFKObWYfKE1+j38Bc2fuO16mYiyI+sWx7INfn+lgYj56GL12yyinDa+lVfCC+WWs332lpLNUX1ZI3YK"
    "7vYgtys4X+uGxEIlkIQ90v8/w8ZFmQMe"
)
# secret3.txt / secret4.txt are 16343 / 16344 bytes: both tables pad to 16384.
SEVCTL_SECRET3_LEN = 16343
SEVCTL_SECRET4_LEN = 16344

# --- virtee/sev src/session/mod.rs `verify` test ---------------------------
VIRTEE_VERIFY_DIGEST = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
VIRTEE_VERIFY_MEASURE = bytes.fromhex("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea")
VIRTEE_VERIFY_MNONCE = bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554")
VIRTEE_VERIFY_TIK = bytes.fromhex("66320db73158a35a255d051758e95ed4")
VIRTEE_VERIFY_API = (0x00, 0x12, 0x0F)
VIRTEE_VERIFY_POLICY = 0

# --- virtee/sev src/session/key.rs `derive` and `mac` tests ---------------
# KDF(key=0^16, label "sev-master-secret", context=0^16, 16 bytes)
VIRTEE_KDF_MASTER = bytes.fromhex("ab4d269fcc62bedb4511d56c386ce706")
# HMAC-SHA256(0^16, 0^4) == the policy MAC of policy 0 with TIK 0^16
VIRTEE_MAC_ZERO = bytes.fromhex("aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")

# --- virtee/sev src/session/mod.rs `session` test -------------------------
# TEK = TIK = 0^16, policy 0, nonce = IV = 0^16, Z (ECDH shared secret) = 0^16
VIRTEE_SESSION_WRAP_TK = bytes.fromhex("2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4")
VIRTEE_SESSION_WRAP_MAC = bytes.fromhex("3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d")
VIRTEE_SESSION_POLICY_MAC = VIRTEE_MAC_ZERO
