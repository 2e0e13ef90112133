"""Public SEV-SNP test data: where it is, and the values its sources give.

Sources (values only; no code copied):
- virtee/sev @ 9cf2adb tests/certs_data: a real Milan attestation report and
  its VCEK (fixtures/snp, see its README).
- virtee/sev-snp-measure tests/test_id_block.py and tests/keyfile: the ID
  block and key digests its test keys give for a known launch digest.
"""

import base64
from pathlib import Path

SNP_DATA = Path(__file__).resolve().parents[2] / "fixtures" / "snp"


def milan_report() -> bytes:
    """virtee/sev's real Milan report (0x4A0 bytes)."""
    return bytes.fromhex((SNP_DATA / "report_milan.hex").read_text().strip())


def milan_vcek() -> bytes:
    return (SNP_DATA / "vcek_milan.der").read_bytes()


# Fields of the Milan report, read off virtee/sev's report_milan.hex.
MILAN_MEASUREMENT = bytes.fromhex(
    "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f"
)
MILAN_POLICY = 0x30000
MILAN_REPORT_DATA = bytes.fromhex(
    "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c64581"
    "0b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd"
)
MILAN_CHIP_ID_PREFIX = bytes.fromhex("d49554ec717f4e5b")

# sev-snp-measure tests/test_id_block.py
ID_KEY = SNP_DATA / "id_key_test.pem"
AUTHOR_KEY = SNP_DATA / "author_key_test.pem"
IDBLOCK_LD = base64.b64decode("B28FLQi9p6cAqipgjFyqawDrrSl7bWioWkWx5mmlWLZ+G5HShKMB/mPE+gdQRn7t")
IDBLOCK_POLICY = 0x30000  # snp-create-id-block's fixed policy
IDBLOCK_B64 = (
    "B28FLQi9p6cAqipgjFyqawDrrSl7bWioWkWx5mmlWLZ+G5HShKMB/mPE+gdQRn7t"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABAAAAAAAAAAAAAwAAAAAA"
)
IDBLOCK_ID_KEY_DIGEST = base64.b64decode("hwt+NcU/inLQ0yL3WrKvgmJ5Kq9leWIs5BMcPyHyied8sFYKXjuQs5MuZ07HCcsU")
IDBLOCK_AUTHOR_KEY_DIGEST = base64.b64decode("YxEcNLv8Ckk4+aAJvQdJgNgXIyPmFZnJ/TNtqGcySOHcqY0L6PdjdqEGuK/UwKBX")
