"""Both monitor carriers offer what agent.app uses of a Monitor.

mypy proves it (agent/io/monitor.py's TYPE_CHECKING block); this keeps the
names honest where mypy is not run."""

import inspect

from agent.io.libvirt_monitor import LibvirtConnection
from agent.io.monitor import Monitor
from agent.io.qmp import QmpConnection

MEMBERS = ("qemu_version", "events", "execute", "wait_disconnected", "close")


def test_monitor_protocol_lists_what_the_app_uses():
    assert all(hasattr(Monitor, name) for name in MEMBERS)


def test_qmp_and_libvirt_connections_have_the_monitor_methods_as_coroutines():
    for cls in (QmpConnection, LibvirtConnection):
        for name in ("execute", "wait_disconnected", "close"):
            assert inspect.iscoroutinefunction(getattr(cls, name)), (cls.__name__, name)
        assert isinstance(inspect.getattr_static(cls, "qemu_version"), property), cls.__name__
