"""The ``qemu`` marker on every test that starts a real qemu-system-x86_64,
and the ``slow`` tests left out unless asked for.

A test that needs QEMU says so with a skipif naming ``qemu-system-x86_64``
(``tests.e2e.qemu.QEMU`` is None without it); the libvirt end-to-end tests
start QEMU through libvirtd.  This hook adds the marker to all of them, so
``pytest -m "not qemu"`` runs the fast suite.

The slow property tests run only when the ``-m`` expression names ``slow``
(``-m slow``): a ``-m`` of one's own (``-m "not qemu"``) replaces the one in
``addopts``, so "not slow" cannot live there.
"""

from __future__ import annotations

import pytest

QEMU_MODULES = {"tests/e2e/test_libvirt.py"}


def _starts_qemu(item: pytest.Item) -> bool:
    if item.nodeid.split("::", 1)[0] in QEMU_MODULES:
        return True
    return any("qemu-system-x86_64" in str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _starts_qemu(item) and item.get_closest_marker("qemu") is None:
            item.add_marker(pytest.mark.qemu)
    if "slow" not in (config.getoption("markexpr") or ""):
        slow = [item for item in items if item.get_closest_marker("slow") is not None]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if item.get_closest_marker("slow") is None]
