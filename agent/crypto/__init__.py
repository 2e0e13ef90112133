"""The agent's own crypto: the PSK hand-over (seal), host keys, secret objects (cryptography only)."""
