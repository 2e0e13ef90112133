"""QEMU ``secret`` objects encrypted under the master key.

QEMU's ``-object secret,keyid=MASTER,iv=IV,data=CIPHERTEXT`` decrypts with
AES-256-CBC and PKCS#7 padding (``crypto/secret_common.c``); the master key
is a 32-byte secret object QEMU already holds.  The agent encrypts here, in
its own memory, so plaintext never reaches QEMU's monitor, a log or the
event log.
"""

from __future__ import annotations

from agent.common.secret import Secret

MASTER_KEY_LEN = 32  # AES-256
IV_LEN = 16  # one AES block, fresh from os.urandom for every secret


def encrypt(master: Secret, plaintext: Secret, iv: bytes) -> Secret:
    """AES-256-CBC with PKCS#7 padding, as QEMU's ``secret`` ``keyid=`` expects."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext.reveal()) + padder.finalize()
    enc = Cipher(algorithms.AES(master.reveal()), modes.CBC(iv)).encryptor()
    return Secret(enc.update(padded) + enc.finalize())
