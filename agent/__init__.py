"""keyagent: the secrets sidecar for QEMU virtual machines."""

__version__ = "0.1.0"
