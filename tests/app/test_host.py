"""``keyagent host`` (agent.app.host): the directory, each VM's life, isolation, the host's socket."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from agent.app.config import load_config
from agent.app.host import Host, HostOptions, check_host_args
from agent.app.metrics import Metrics
from agent.app.sidecar import Sidecar
from agent.common.errors import UsageError
from agent.core.actions import Finish
from agent.io.http import Request
from tests.app.runtime_fakes import FakeMonitor, ScriptedFlow


class FakeSidecar:
    """What the host uses of a Sidecar: run() until stopped, stop(), metrics."""

    def __init__(self, cfg, opts, fail: BaseException | None = None, code: int = 0) -> None:
        self.cfg, self.opts = cfg, opts
        self.done = asyncio.Event()
        self.exit_code, self.exit_reason = code, ""
        self.runtime = None
        self.metrics = Metrics()
        self.stopped_by: str | None = None
        self.fail = fail

    async def run(self) -> int:
        if self.fail is not None:
            raise self.fail
        await self.done.wait()
        return self.exit_code

    def stop(self, why: str) -> None:
        self.stopped_by = why
        self.done.set()


class Made(dict):
    """The sidecars a host made, by VM name; ``plan`` says how a name behaves."""

    def __init__(self, **plan) -> None:
        super().__init__()
        self.plan = plan

    def __call__(self, cfg, opts, extras):
        sidecar = FakeSidecar(cfg, opts, **self.plan.get(cfg.vm_name, {}))
        self[cfg.vm_name] = sidecar
        return sidecar


def write(conf, name: str, text: str) -> None:
    (conf / name).write_text(text)


def vm_toml(tmp_path, vm: str, extra: str = "") -> str:
    return f'[vm]\nqmp = "unix:{tmp_path}/{vm}.qmp"\n{extra}'


@pytest.fixture
def conf(tmp_path):
    d = tmp_path / "conf"
    d.mkdir()
    return d


def states(host: Host) -> dict[str, tuple[str, str]]:
    """By file name (without .toml): state and the last result's reason."""
    return {
        e["config"].removesuffix(".toml"): (e["state"], (e["result"] or {}).get("reason", ""))
        for e in host.vms_answer()["vms"]
    }


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# -- the directory ---------------------------------------------------------------


async def test_a_new_file_starts_its_vm_and_a_removed_one_is_stopped_then_forgotten(tmp_path, conf):
    made = Made()
    host = Host(HostOptions(str(conf)), make_sidecar=made)
    write(conf, "a.toml", vm_toml(tmp_path, "a"))
    write(conf, "notes.txt", "not a VM")
    write(conf, ".b.toml", "an editor's file")
    host.scan()
    await settle()
    assert states(host) == {"a": ("running", "")}
    write(conf, "b.toml", vm_toml(tmp_path, "b"))
    host.scan()
    await settle()
    assert sorted(made) == ["a", "b"]
    os.unlink(conf / "a.toml")
    host.scan()
    assert made["a"].stopped_by == "removed"
    await settle()
    assert states(host)["a"] == ("stopped", "removed")
    assert made["b"].stopped_by is None  # nobody else noticed
    host.scan()
    assert list(states(host)) == ["b"]
    await host.stop_all("SIGTERM")
    assert made["b"].stopped_by == "SIGTERM"


async def test_one_scan_lists_the_keyring_once_for_every_vm_it_starts(tmp_path, conf, monkeypatch):
    from agent.io import keyring

    listings = []
    monkeypatch.setattr(keyring, "find", lambda prefix: listings.append(prefix) or [(7, "keyagent:a:master")])
    made = Made()
    host = Host(HostOptions(str(conf)), make_sidecar=made)
    for vm in ("a", "b", "c"):
        write(conf, f"{vm}.toml", vm_toml(tmp_path, vm, f'run_dir = "{tmp_path}/run-{vm}"\n'))
    host.scan()
    assert listings == ["keyagent:"]
    assert all(made[vm].opts.keyring_listing == [(7, "keyagent:a:master")] for vm in "abc")
    host.scan()  # nothing new: no listing
    assert listings == ["keyagent:"]
    await host.stop_all("SIGTERM")


async def test_a_vm_is_configured_from_the_bytes_its_digest_was_taken_of_read_once(tmp_path, conf, monkeypatch):
    import hashlib

    from agent.io import files

    reads = []
    real = files.read_regular_file
    monkeypatch.setattr(files, "read_regular_file", lambda path, *a: reads.append(path) or real(path, *a))
    made = Made()
    host = Host(HostOptions(str(conf)), make_sidecar=made)
    text = vm_toml(tmp_path, "a")
    write(conf, "a.toml", text)
    host.scan()
    assert reads == [str(conf / "a.toml")]
    assert host.vms["a.toml"].digest == hashlib.sha256(text.encode()).digest()
    assert made["a"].cfg.source == str(conf / "a.toml")
    await host.stop_all("SIGTERM")


async def test_a_changed_file_is_taken_only_on_reload(tmp_path, conf):
    made = Made()
    host = Host(HostOptions(str(conf)), make_sidecar=made)
    write(conf, "a.toml", vm_toml(tmp_path, "a"))
    host.scan()
    await settle()
    first = made["a"]
    write(conf, "a.toml", vm_toml(tmp_path, "a", "run_dir = 'elsewhere'\n"))
    host.scan()
    await settle()
    assert made["a"] is first and first.stopped_by is None
    host.scan(reload=True)
    assert first.stopped_by == "changed"
    await settle()
    host.scan()  # the old one has ended: the new one starts
    await settle()
    assert made["a"] is not first
    assert made["a"].cfg.vm_run_dir == str(conf / "elsewhere")
    host.scan(reload=True)  # unchanged: left alone
    assert made["a"].stopped_by is None
    await host.stop_all("SIGTERM")


async def test_a_file_fixed_and_reloaded_starts_its_vm(tmp_path, conf):
    made = Made()
    host = Host(HostOptions(str(conf)), make_sidecar=made)
    write(conf, "a.toml", "[vm\n")
    host.scan()
    state, reason = states(host)["a"]
    assert state == "failed" and "invalid TOML" in reason and "\n" not in reason
    write(conf, "a.toml", vm_toml(tmp_path, "a"))
    host.scan()
    assert "a" not in made  # a changed file waits for SIGHUP
    host.scan(reload=True)
    await settle()
    assert states(host)["a"] == ("running", "")
    await host.stop_all("SIGTERM")


# -- what a file must say ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "libvirt", "reason"),
    [
        ("[vm]\nrun_dir = 'r'\n", None, '[vm] qmp = "unix:PATH" is required'),
        ("[vm]\nqmp = 'tcp:1:2'\n", None, "[vm] qmp must be unix:PATH"),
        ("[vm]\nqmp = 'unix:/q'\ndomain = 'd'\n", None, "[vm] domain is only for --libvirt"),
        ("[vm]\nqmp = 'unix:/q'\n", "qemu:///system", "[vm] domain is required with --libvirt"),
        ("[vm]\nqmp = 3\n", None, "[vm] qmp must be a non-empty string"),
        ("[vm]\nqmp = 'unix:/q'\nbogus = 1\n", None, "unknown key [vm] bogus"),
        ("[vm]\nqmp = 'unix:/q'\n[sev]\ntimeout_s = -1\n", None, "[sev] timeout_s must be at least"),
    ],
)
async def test_a_bad_file_fails_its_vm_with_one_line(conf, text, libvirt, reason):
    made = Made()
    host = Host(HostOptions(str(conf), libvirt=libvirt), make_sidecar=made)
    write(conf, "bad.toml", text)
    write(conf, "good.toml", "[vm]\ndomain = 'g'\n" if libvirt else "[vm]\nqmp = 'unix:/g'\n")
    host.scan()
    await settle()
    got = states(host)
    assert got["bad"][0] == "failed" and reason in got["bad"][1] and "\n" not in got["bad"][1]
    assert got["good"] == ("running", "")
    await host.stop_all("SIGTERM")


async def test_the_vm_name_is_the_files_unless_vm_name_says_otherwise(tmp_path, conf):
    made = Made()
    host = Host(HostOptions(str(conf), event_log_dir=str(tmp_path)), make_sidecar=made)
    write(conf, "plain.toml", vm_toml(tmp_path, "p", "run_dir = 'rd'\n"))
    write(conf, "other.toml", vm_toml(tmp_path, "o", "name = 'named'\n"))
    write(conf, "two.toml", vm_toml(tmp_path, "t", "name = 'named'\n"))
    write(conf, "bad name!.toml", vm_toml(tmp_path, "x"))
    host.scan()
    await settle()
    got = states(host)
    assert got["plain"] == ("running", "") and got["other"] == ("running", "")
    assert made["plain"].opts.control_path == str(conf / "rd" / "control.sock")
    assert made["plain"].opts.event_log == str(tmp_path / "plain.jsonl")
    assert made["plain"].opts.qmp_path == f"{tmp_path}/p.qmp"
    assert made["plain"].opts.own_signals is False
    assert made["named"].opts.control_path is None  # no run_dir: no control socket, as with keyagent run
    two = next(e for e in host.vms_answer()["vms"] if e["config"] == "two.toml")
    assert two["state"] == "failed" and "already the VM of other.toml" in two["result"]["reason"]
    bad = next(e for e in host.vms_answer()["vms"] if e["config"] == "bad name!.toml")
    assert bad["state"] == "failed" and "no [vm] name" in bad["result"]["reason"]
    await host.stop_all("SIGTERM")


def test_the_config_loader_hands_the_hosts_keys_back_and_still_checks_the_rest(tmp_path):
    path = tmp_path / "v.toml"
    path.write_text("[vm]\nqmp = 'unix:/q'\nname = 'v1'\n")
    extras = dict.fromkeys([("vm", "qmp"), ("vm", "name"), ("vm", "domain")])
    cfg = load_config(str(path), None, extras)
    assert cfg.vm_name == "v1"
    assert extras == {("vm", "qmp"): "unix:/q", ("vm", "name"): "v1", ("vm", "domain"): None}
    with pytest.raises(UsageError, match=r"unknown key \[vm\] qmp"):
        load_config(str(path))  # keyagent run knows no [vm] qmp


# -- isolation ---------------------------------------------------------------------


async def test_a_vm_that_raises_or_fails_is_marked_and_no_other_notices(tmp_path, conf):
    made = Made(boom={"fail": RuntimeError("a bug\nsecond line")}, refused={"fail": UsageError("run_dir is locked")})
    host = Host(HostOptions(str(conf)), make_sidecar=made)
    for vm in ("boom", "refused", "ok"):
        write(conf, f"{vm}.toml", vm_toml(tmp_path, vm))
    host.scan()
    await settle()
    got = states(host)
    assert got["boom"] == ("failed", "internal error: RuntimeError: a bug")
    assert got["refused"] == ("failed", "run_dir is locked")
    assert got["ok"] == ("running", "")
    await host.stop_all("SIGTERM")
    assert states(host)["ok"] == ("stopped", "SIGTERM")


class ScriptedSidecar(Sidecar):
    """The real Sidecar over a fake monitor, running one scripted flow."""

    flow: ScriptedFlow
    monitor: FakeMonitor

    async def open_monitor(self, events):
        self.monitor = FakeMonitor()

        async def close():
            return None

        self.monitor.close = close  # type: ignore[attr-defined]
        return self.monitor

    def start_flows(self, rt) -> None:
        rt.start_flow("work", self.flow)


class Exploding(ScriptedFlow):
    def handle(self, event):
        raise ValueError("flow step broke")


async def real_host(tmp_path, conf, flows: dict[str, ScriptedFlow]):
    made: dict[str, ScriptedSidecar] = {}

    def make(cfg, opts, extras):
        sidecar = made[cfg.vm_name] = ScriptedSidecar(cfg, opts)
        sidecar.flow = flows[cfg.vm_name]
        return sidecar

    host = Host(HostOptions(str(conf), event_log_dir=str(tmp_path)), make_sidecar=make)
    for vm in flows:
        write(conf, f"{vm}.toml", vm_toml(tmp_path, vm, f"run_dir = '../run-{vm}'\n"))
    host.scan()
    for _ in range(50):
        await asyncio.sleep(0.01)
        if all(s.runtime is not None for s in made.values()):
            break
    return host, made


async def test_one_sidecars_loop_raising_or_its_qemu_going_fail_that_vm_only(tmp_path, conf):
    flows = {
        "bad": Exploding(),
        "gone": ScriptedFlow([], [Finish(1, "QEMU gone")]),
        "fine": ScriptedFlow([Finish(0, "ok")]),
    }
    host, made = await real_host(tmp_path, conf, flows)
    made["gone"].monitor.disconnect("QMP connection lost")
    for _ in range(100):
        await asyncio.sleep(0.01)
        got = states(host)
        if got["bad"][0] == "failed" and got["gone"][0] == "failed":
            break
    got = states(host)
    assert got["bad"] == ("failed", "internal error: ValueError: flow step broke")
    assert got["gone"][0] == "failed" and got["gone"][1].startswith("QEMU went away")
    fine = next(e for e in host.vms_answer()["vms"] if e["name"] == "fine")
    assert fine["state"] == "running" and fine["result"] == {"flow": "work", "code": 0, "reason": "ok"}
    assert (tmp_path / "run-fine" / "control.sock").exists()
    # each VM its own event log, ended with its own exit record
    last = json.loads((tmp_path / "bad.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "exit" and last["code"] == 1
    await host.stop_all("SIGTERM")
    assert states(host)["fine"][0] == "stopped"
    assert not (tmp_path / "run-fine" / "control.sock").exists()


async def test_two_vms_on_one_run_dir_the_second_is_refused(tmp_path, conf):
    host, made = await real_host(tmp_path, conf, {"one": ScriptedFlow()})
    write(conf, "two.toml", vm_toml(tmp_path, "two", "run_dir = '../run-one'\n"))
    made_two: list = []
    host.make_sidecar = lambda cfg, opts, extras: made_two.append(ScriptedSidecar(cfg, opts)) or made_two[-1]
    host.scan()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if states(host)["two"][0] == "failed":
            break
    state, reason = states(host)["two"]
    assert state == "failed" and "run_dir" in reason and "\n" not in reason
    assert states(host)["one"] == ("running", "")
    await host.stop_all("SIGTERM")


async def test_a_vm_on_a_run_dir_a_sidecar_holds_is_refused(tmp_path, conf):
    from agent.io.rundir import lock_run_dir, prepare_run_dir

    held = lock_run_dir(prepare_run_dir(str(tmp_path / "run-mine")))  # as a keyagent run would hold it
    try:
        host, _ = await real_host(tmp_path, conf, {"mine": ScriptedFlow()})
        for _ in range(100):
            await asyncio.sleep(0.01)
            if states(host)["mine"][0] == "failed":
                break
        state, reason = states(host)["mine"]
        assert state == "failed" and "run_dir" in reason
        assert not (tmp_path / "run-mine" / "control.sock").exists()
        await host.stop_all("SIGTERM")
    finally:
        held.release()


# -- the host's own socket -----------------------------------------------------------


def get(path: str) -> Request:
    return Request("GET", path, {}, b"", (os.getpid(), os.geteuid(), os.getegid()))


async def test_the_hosts_socket_answers_vms_health_readiness_and_metrics_with_a_vm_label(tmp_path, conf):
    made = Made()
    host = Host(HostOptions(str(conf)), make_sidecar=made)
    assert (await host.handle(get("/readyz"))).status == 503  # before the first scan
    write(conf, "a.toml", vm_toml(tmp_path, "a"))
    write(conf, "b.toml", "nonsense")
    host.scan()
    await settle()
    made["a"].metrics.flow_started("sev-launch")
    assert (await host.handle(get("/healthz"))).status == 200
    assert (await host.handle(get("/readyz"))).status == 200
    answer = await host.handle(get("/v1/vms"))
    vms = json.loads(answer.body)["vms"]
    assert [(v["name"], v["state"]) for v in vms] == [("a", "running"), ("b", "failed")]
    metrics = (await host.handle(get("/metrics"))).body.decode()
    assert 'keyagent_flows_started_total{kind="sev-launch",vm="a"} 1.0' in metrics
    assert 'keyagent_host_vms{state="failed"} 1.0' in metrics
    assert (await host.handle(get("/v1/status"))).status == 404
    await host.stop_all("SIGTERM")


def test_a_sidecars_metrics_carry_no_vm_label():
    m = Metrics()
    m.flow_started("sev-launch")
    assert b'keyagent_flows_started_total{kind="sev-launch"} 1.0' in m.render()[0]


async def test_sigterm_ends_the_host_with_0_after_every_vm_and_sighup_rereads(tmp_path, conf):
    made = Made()
    control = tmp_path / "host.sock"
    host = Host(HostOptions(str(conf), control_path=str(control), poll_s=0.05), make_sidecar=made)
    write(conf, "a.toml", vm_toml(tmp_path, "a"))
    run = asyncio.ensure_future(host.run())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if "a" in made:
            break
    assert control.exists()
    write(conf, "a.toml", vm_toml(tmp_path, "a", "name = 'a'\n"))
    first = made["a"]
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if made["a"] is not first:
            break
    assert first.stopped_by == "changed" and made["a"] is not first
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(run, 5) == 0
    assert made["a"].stopped_by == "SIGTERM"
    assert not control.exists()


async def test_while_a_host_runs_the_collector_waits_for_more_allocations_and_is_python_s_own_after(tmp_path, conf):
    import gc

    from agent.app.host import HOST_GC_THRESHOLD0

    before = gc.get_threshold()
    host = Host(HostOptions(str(conf), poll_s=0.05), make_sidecar=Made())
    run = asyncio.ensure_future(host.run())
    for _ in range(100):
        await asyncio.sleep(0.01)
        if host.scanned:
            break
    assert gc.get_threshold() == (HOST_GC_THRESHOLD0, *before[1:])
    host.on_signal("SIGTERM")
    assert await asyncio.wait_for(run, 5) == 0
    assert gc.get_threshold() == before


# -- bad host arguments ----------------------------------------------------------------


def test_bad_host_arguments_are_one_line_before_anything_is_made(tmp_path, conf):
    with pytest.raises(UsageError, match="--config-dir .* is not a directory"):
        check_host_args(HostOptions(str(tmp_path / "nope")))
    with pytest.raises(UsageError, match="--event-log-dir .* is not a directory"):
        check_host_args(HostOptions(str(conf), event_log_dir=str(tmp_path / "nope")))
    with pytest.raises(UsageError, match="control socket directory"):
        check_host_args(HostOptions(str(conf), control_path=str(tmp_path / "nope" / "h.sock")))
    assert sorted(os.listdir(tmp_path)) == ["conf"]


def test_ctl_vms_prints_one_line_per_vm():
    from agent.cli.ctl import _vms_table

    table = _vms_table(
        {
            "vms": [
                {"name": "a", "state": "running", "flows": [], "result": {"flow": "launch", "code": 0, "reason": ""}},
                {"name": "bb", "state": "failed", "flows": [], "result": {"flow": None, "code": 1, "reason": "x\ny"}},
                {"name": "c", "state": "starting", "flows": ["launch"], "result": None},
            ]
        }
    )
    assert table.splitlines() == [
        "NAME  STATE     FLOWS   RESULT",
        "a     running   -       launch: 0",
        "bb    failed    -       1 x y",
        "c     starting  launch  -",
    ]


async def test_the_hosts_worker_threads_are_all_running_before_any_vm_needs_one():
    import threading

    from agent.app.host import _start_workers

    loop = asyncio.get_running_loop()
    _start_workers(loop)
    await asyncio.sleep(0.05)
    workers = [t for t in threading.enumerate() if t.name.startswith("keyagent-host")]
    assert len(workers) == min(32, (os.cpu_count() or 1) + 4)
    assert (await loop.run_in_executor(None, lambda: threading.current_thread().name)).startswith("keyagent-host")


@pytest.mark.parametrize("sev", [False, True])
async def test_a_vm_stopped_while_its_qemu_monitor_is_not_there_yet_ends_at_once(tmp_path, sev):
    import time

    from agent.app.sidecar import SidecarOptions

    path = tmp_path / "vm.toml"
    path.write_text('[vm]\nname = "vm1"\n' + ('[sev]\nowner_url = "http://127.0.0.1:9"\n' if sev else ""))
    opts = SidecarOptions(qmp_path=str(tmp_path / "no-qemu-yet.sock"), control_path=None, event_log=None)
    opts.qmp_timeout, opts.own_signals = 60.0, False
    sidecar = Sidecar(load_config(str(path)), opts)
    run = asyncio.ensure_future(sidecar.run())
    await asyncio.sleep(0.2)  # waiting for the monitor, retrying
    start = time.monotonic()
    sidecar.stop("removed")
    code = await asyncio.wait_for(run, 5)
    assert time.monotonic() - start < 2  # not when the 60 s qmp timeout runs out
    assert (code, sidecar.exit_reason) == ((1, "stopped by removed before the launch completed") if sev else (0, ""))
