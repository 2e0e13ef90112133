"""The migrate verbs in one process: two agents (a QEMU that says yes to everything), a
carrier between them.  What the carrier tries, and what each refusal leaves behind: no
keys.psk on either side, and the offer or the PSK still there for the real request."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.app import control
from agent.app.verbs.migrate import ControlError, MigrationControl
from agent.crypto import seal
from agent.io.secretref import UNRESTRICTED
from tests.hostkeys import Host, make_host, make_pair

URI = "tcp:127.0.0.1:4444"


class YesQmp:
    """A QEMU that says yes to everything (the verbs need answers, not a VM)."""

    async def execute(self, command, args=None):
        return {}


@dataclass
class Agent:
    ctl: MigrationControl
    run_dir: Path

    def key_files(self) -> list[Path]:
        return sorted(self.run_dir.rglob("keys.psk"))

    def psk(self) -> bytes:
        (path,) = self.key_files()
        return bytes.fromhex(path.read_text().strip().split(":")[1])


@contextlib.asynccontextmanager
async def agent(tmp: Path, name: str, vm: str, host: Host | None, clock=None):
    from agent.app.config import load_config
    from agent.app.eventlog import EventLog
    from agent.app.runtime import Runtime
    from agent.app.sidecar import Sidecar, SidecarOptions

    run_dir = tmp / f"{name}-run"
    run_dir.mkdir(mode=0o700)
    flags = {"vm_name": vm, "vm_run_dir": str(run_dir), "migration_offer_lifetime_s": "60"}
    if host is not None:
        flags |= {"migration_host_key": str(host.key), "migration_trusted_hosts": str(host.trusted)}
    cfg = load_config(None, flags)
    sidecar = Sidecar(cfg, SidecarOptions(qmp_path=str(tmp / "qmp.sock"), control_path=None, event_log=None))
    rt = sidecar.runtime = Runtime(qmp=YesQmp(), event_log=EventLog(None), run_dir=str(run_dir), log=sidecar.log)
    sidecar.run_dir = str(run_dir)
    dispatch = asyncio.ensure_future(rt.dispatch())
    ctl = MigrationControl(sidecar, **({"clock": clock} if clock else {}))
    # The verbs are called as a control peer of our own uid would call them:
    # references resolve without the ref_dirs limit (agent.app.control).
    access = control._ACCESS.set(UNRESTRICTED)
    try:
        yield Agent(ctl, run_dir)
    finally:
        control._ACCESS.reset(access)
        with contextlib.suppress(ControlError):
            await ctl.cancel({})
        rt.close()
        dispatch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatch


def refused(call, *args) -> ControlError:
    with pytest.raises(ControlError) as err:
        call(*args)
    assert "\n" not in err.value.error
    return err.value


async def refused_async(coro) -> ControlError:
    with pytest.raises(ControlError) as err:
        await coro
    assert "\n" not in err.value.error
    return err.value


@pytest.fixture
def hosts(tmp_path):
    src, dst = make_pair(tmp_path)
    carrier = make_host(tmp_path, "carrier")
    return src, dst, carrier


async def test_trusting_hosts_hand_over_one_psk(tmp_path, hosts):
    src_host, dst_host, _ = hosts
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "dst", "vm1", dst_host) as dst:
        offer = dst.ctl.prepare({})["offer"]
        cookie = src.ctl.begin({"offer": offer})["cookie"]
        status, body = await dst.ctl.accept({"cookie": cookie, "uri": URI})
        assert (status, body["status"]) == (200, "listening")
        assert dst.psk() == src.ctl.source_psk.reveal()


async def test_a_swapped_offer_gets_no_cookie_and_the_source_has_no_psk(tmp_path, hosts):
    src_host, _dst_host, carrier = hosts
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "evil", "vm1", carrier) as evil:
        err = refused(src.ctl.begin, {"offer": evil.ctl.prepare({})["offer"]})
        assert err.status == 403 and "unknown destination" in err.error
        assert src.ctl.source_psk is None
        err = await refused_async(src.ctl.start({"uri": URI}))
        assert err.status == 409 and src.key_files() == []


async def test_a_cookie_forged_with_the_carriers_key_writes_no_psk(tmp_path, hosts):
    _src_host, dst_host, carrier = hosts
    async with agent(tmp_path, "dst", "vm1", dst_host) as dst:
        offer = dst.ctl.prepare({})["offer"]
        forged = seal.seal(seal.parse_offer(offer), "vm1", b"c" * 32, carrier.private())
        err = await refused_async(dst.ctl.accept({"cookie": forged, "uri": URI}))
        assert err.status == 403 and "unknown source" in err.error
        assert dst.key_files() == [] and len(dst.ctl.offers) == 1


async def test_a_replayed_cookie_is_refused(tmp_path, hosts):
    src_host, dst_host, _ = hosts
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "dst", "vm1", dst_host) as dst:
        cookie = src.ctl.begin({"offer": dst.ctl.prepare({})["offer"]})["cookie"]
        assert (await dst.ctl.accept({"cookie": cookie, "uri": URI}))[0] == 200
        await dst.ctl.cancel({})
        await asyncio.sleep(0.05)
        assert dst.key_files() == []
        err = await refused_async(dst.ctl.accept({"cookie": cookie, "uri": URI}))
        assert err.status == 409 and "no pending offer" in err.error
        assert dst.key_files() == []


async def test_a_cookie_moved_to_another_vm_is_refused(tmp_path, hosts):
    """The carrier hands vm1's cookie to the agent of vm2 on the same trusted host."""
    src_host, dst_host, _ = hosts
    async with (
        agent(tmp_path, "src", "vm1", src_host) as src,
        agent(tmp_path, "dst1", "vm1", dst_host) as dst1,
        agent(tmp_path, "dst2", "vm2", dst_host) as dst2,
    ):
        dst2.ctl.prepare({})
        cookie = src.ctl.begin({"offer": dst1.ctl.prepare({})["offer"]})["cookie"]
        err = await refused_async(dst2.ctl.accept({"cookie": cookie, "uri": URI}))
        assert err.status == 403 and "for VM 'vm1', this agent runs 'vm2'" in err.error
        assert dst2.key_files() == []


async def test_an_offer_for_another_vm_is_refused_by_the_source(tmp_path, hosts):
    src_host, dst_host, _ = hosts
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "dst", "vm2", dst_host) as dst:
        err = refused(src.ctl.begin, {"offer": dst.ctl.prepare({})["offer"]})
        assert err.status == 403 and "for VM 'vm2'" in err.error


async def test_a_cookie_from_a_source_the_destination_does_not_trust_is_refused(tmp_path):
    src_host, dst_host = make_host(tmp_path, "src"), make_host(tmp_path, "dst")
    src_host.trust(dst_host)  # one way only
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "dst", "vm1", dst_host) as dst:
        cookie = src.ctl.begin({"offer": dst.ctl.prepare({})["offer"]})["cookie"]
        err = await refused_async(dst.ctl.accept({"cookie": cookie, "uri": URI}))
        assert err.status == 403 and "unknown source" in err.error
        assert dst.key_files() == []


async def test_an_offer_from_a_destination_the_source_does_not_trust_is_refused(tmp_path):
    src_host, dst_host = make_host(tmp_path, "src"), make_host(tmp_path, "dst")
    dst_host.trust(src_host)  # one way only
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "dst", "vm1", dst_host) as dst:
        err = refused(src.ctl.begin, {"offer": dst.ctl.prepare({})["offer"]})
        assert err.status == 403 and "unknown destination" in err.error
        assert src.ctl.source_psk is None


async def test_a_cookie_for_an_expired_offer_is_refused(tmp_path, hosts):
    src_host, dst_host, _ = hosts
    now = [1000.0]
    async with (
        agent(tmp_path, "src", "vm1", src_host) as src,
        agent(tmp_path, "dst", "vm1", dst_host, clock=lambda: now[0]) as dst,
    ):
        cookie = src.ctl.begin({"offer": dst.ctl.prepare({})["offer"]})["cookie"]
        now[0] += 61  # offer_lifetime_s is 60
        err = await refused_async(dst.ctl.accept({"cookie": cookie, "uri": URI}))
        assert err.status == 409 and "expired" in err.error
        assert dst.ctl.offers == {} and dst.key_files() == []


async def test_a_tampered_cookie_does_not_spend_the_offer(tmp_path, hosts):
    src_host, dst_host, _ = hosts
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "dst", "vm1", dst_host) as dst:
        cookie = src.ctl.begin({"offer": dst.ctl.prepare({})["offer"]})["cookie"]
        raw = bytearray(base64.b64decode(cookie))
        raw[-70] ^= 1  # inside the sealed PSK
        err = await refused_async(dst.ctl.accept({"cookie": base64.b64encode(bytes(raw)).decode(), "uri": URI}))
        assert err.status == 403 and "signature does not verify" in err.error
        assert (await dst.ctl.accept({"cookie": cookie, "uri": URI}))[0] == 200


@pytest.mark.parametrize("bad", [{"uri": "tcp:nope"}, {"multifd": "yes"}, {"postcopy": 1}, {"multifd_channels": 0}])
async def test_accept_with_a_bad_option_leaves_the_cookie_for_the_corrected_retry(tmp_path, hosts, bad):
    src_host, dst_host, _ = hosts
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "dst", "vm1", dst_host) as dst:
        cookie = src.ctl.begin({"offer": dst.ctl.prepare({})["offer"]})["cookie"]
        err = await refused_async(dst.ctl.accept({"cookie": cookie, "uri": URI, **bad}))
        assert err.status == 400 and dst.key_files() == []
        status, body = await dst.ctl.accept({"cookie": cookie, "uri": URI})
        assert (status, body["status"]) == (200, "listening")


@pytest.mark.parametrize("bad", [{"uri": "tcp:nope"}, {"multifd": "yes"}])
async def test_start_with_a_bad_option_leaves_the_psk_for_the_corrected_retry(tmp_path, hosts, bad):
    src_host, dst_host, _ = hosts
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "dst", "vm1", dst_host) as dst:
        src.ctl.begin({"offer": dst.ctl.prepare({})["offer"]})
        err = await refused_async(src.ctl.start({"uri": URI, **bad}))
        assert err.status == 400 and src.ctl.source_psk is not None
        status, body = await src.ctl.start({"uri": URI})
        assert (status, body["status"]) == (200, "started")


async def test_accept_while_a_migration_runs_leaves_the_cookie(tmp_path, hosts):
    src_host, dst_host, _ = hosts
    async with agent(tmp_path, "src", "vm1", src_host) as src, agent(tmp_path, "dst", "vm1", dst_host) as dst:
        cookie = src.ctl.begin({"offer": dst.ctl.prepare({})["offer"]})["cookie"]
        psk = tmp_path / "psk.bin"
        psk.write_bytes(os.urandom(32))
        assert (await dst.ctl.accept({"psk_ref": f"file:{psk}", "uri": URI}))[0] == 200
        err = await refused_async(dst.ctl.accept({"cookie": cookie, "uri": URI}))
        assert err.status == 409 and "already in progress" in err.error
        assert len(dst.ctl.offers) == 1


@pytest.mark.parametrize("verb", ["prepare", "begin"])
async def test_without_host_keys_prepare_and_begin_say_what_to_configure(tmp_path, verb):
    async with agent(tmp_path, "a", "vm1", None) as a:
        err = refused(getattr(a.ctl, verb), {"offer": "x"})
        assert err.status == 400
        for words in (
            "[migration] host_key",
            "trusted_hosts",
            "--migration-host-key",
            "--migration-trusted-hosts",
            "--psk-file",
        ):
            assert words in err.error
