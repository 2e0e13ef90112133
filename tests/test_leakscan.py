"""The leak scanner finds a secret however it was encoded."""

import base64
import os

from tests.leakscan import LeakScan, find

SECRET = b"correct horse battery staple"


def test_finds_raw_hex_and_base64_at_every_alignment():
    assert find(SECRET, b"x" + SECRET) == "raw"
    assert find(SECRET, SECRET.hex().encode())
    assert find(SECRET, SECRET.hex().upper().encode())
    for k in range(3):
        blob = base64.b64encode(os.urandom(k) + SECRET + os.urandom(5))
        assert find(SECRET, blob), k


def test_clean_text_has_no_leak():
    assert find(SECRET, b"nothing to see " * 100) is None


def test_scan_reports_where(tmp_path):
    (tmp_path / "f").write_bytes(b"..." + SECRET.hex().encode())
    scan = LeakScan(dirs=[str(tmp_path)])
    scan.secret("pass", SECRET)
    assert scan.leaks() == [f"pass found in {tmp_path / 'f'} as hex"]
