"""``keyagent replay LOG --html/--svg/--summary``: the event log drawn.

The pictures are checked twice: as text (well-formed, self-contained, the
right steps, no secret) and, where chromium is installed, as a page a
browser loads (tests/browser.py): what the loaded DOM shows.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests import leakscan
from tests.browser import dump_dom, needs_chromium, screenshot
from tests.tracegen import TRACES, LogWriter, big_log, flow_records, replay_with_secrets, retry_loop

ALL_TRACES = sorted(TRACES.glob("*.jsonl"))
REFUSED = TRACES / "launch-refused-quit.jsonl"
RETRIED = TRACES / "launch-measurement-retried.jsonl"
SVG_NS = "{http://www.w3.org/2000/svg}"
LANES = ["control peer", "agent", "QEMU", "guest owner", "swtpm"]
REFUSAL = "guest owner refused: measurement does not match (HTTP 403)"

PACKET_SECRET = hashlib.sha256(b"replayviz test: launch secret").digest() * 3  # 96 bytes
PSK = hashlib.sha256(b"replayviz test: migration psk").digest()


def replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "replay", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def arrows_in_log(path: Path) -> int:
    """Records drawn as arrows between two lanes: QMP commands and what
    QEMU answers or sends, owner requests and answers, control traffic."""
    n = 0
    for line in path.read_text().splitlines():
        r = json.loads(line)
        body = r.get("event") or r.get("action") or {}
        if body.get("type") in (
            "SendQmp",
            "QmpReply",
            "QmpError",
            "QmpEvent",
            "QmpDisconnected",
            "PostOwner",
            "OwnerReleased",
            "OwnerRefused",
            "OwnerFailed",
            "ControlRequest",
            "ControlReply",
        ):
            n += 1
    return n


def svg_root(text: str) -> ET.Element:
    return ET.fromstring(text.split("?>", 1)[1] if text.startswith("<?xml") else text)


def texts(root: ET.Element, cls: str) -> list[str]:
    return ["".join(e.itertext()) for e in root.iter(f"{SVG_NS}text") if cls in (e.get("class") or "").split()]


# -- the summary ------------------------------------------------------------------------------


def test_summary_prints_each_flow_with_its_result():
    out = replay(REFUSED, "--summary")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == ["ID", "VM", "FLOW", "START", "DURATION", "RESULT"]
    assert row.split()[:3] == ["launch", "vm1", "sev-launch"]
    assert row.endswith(f"failed: {REFUSAL}")


def test_summary_of_several_vm_logs_names_flows_by_vm(tmp_path):
    logs = []
    for vm, trace in (("vm17", "launch-refused-quit"), ("vm18", "launch-good")):
        log = LogWriter(vm)
        log.copy_flow(flow_records(trace), "launch")
        log.exit()
        logs.append(log.write(tmp_path / f"{vm}.jsonl"))
    out = replay(*logs, "--summary")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {"vm17/launch", "vm18/launch"}
    assert "failed: guest owner refused" in rows["vm17/launch"]
    assert " ok: launched" in rows["vm18/launch"]


def test_a_directory_stands_for_the_logs_in_it(tmp_path):
    logs = tmp_path / "events"
    logs.mkdir()
    for vm, trace in (("vm2", "launch-good"), ("vm1", "launch-refused-quit")):
        log = LogWriter(vm)
        log.copy_flow(flow_records(trace), "launch")
        log.write(logs / f"{vm}.jsonl")
    (logs / "notes.txt").write_text("not a log")
    out = replay(logs, "--summary")
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()[1:]] == ["vm1/launch", "vm2/launch"]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = replay(empty, "--summary")
    assert out.returncode == 2 and "without event logs" in out.stderr


# -- the SVG of one flow ----------------------------------------------------------------------


def test_svg_of_a_refused_launch_shows_lanes_arrows_and_the_failure(tmp_path):
    out_svg = tmp_path / "launch.svg"
    out = replay(REFUSED, "--svg", out_svg, "--flow", "launch")
    assert out.returncode == 0, out.stderr
    root = svg_root(out_svg.read_text())
    assert texts(root, "lane-name") == LANES
    arrows = [e for e in root.iter(f"{SVG_NS}line") if "arrow" in (e.get("class") or "").split()]
    assert len(arrows) == arrows_in_log(REFUSED) == 10
    assert texts(root, "failtext") == [f"✗ failed here: {REFUSAL}"]
    failing = [e for e in root.iter(f"{SVG_NS}line") if "failing" in (e.get("class") or "")]
    assert len(failing) == 1 and "owner refused" not in failing[0].get("class")
    assert texts(root, "state") == ["query-status", "query-sev", "measure", "ask-owner", "quitting", "failed"]


@pytest.mark.parametrize("trace", ALL_TRACES, ids=lambda p: p.stem)
def test_every_recorded_trace_draws_as_well_formed_svg(trace):
    from agent.app.eventlog import read_records
    from agent.tools import replayviz

    report = replayviz.build([(str(trace), list(read_records(str(trace))))])
    for flow in report.flows:
        root = svg_root(replayviz.standalone_svg(flow))
        assert texts(root, "lane-name") == LANES
        assert (flow.result == "failed") == bool(texts(root, "failtext"))
    page = replayviz.page(report)
    assert page.count('class="flow-row"') == len(report.flows)


def test_unknown_flow_id_is_one_line_exit_two_and_writes_nothing(tmp_path):
    out_svg = tmp_path / "x.svg"
    out = replay(REFUSED, "--svg", out_svg, "--flow", "launch-7")
    assert out.returncode == 2
    assert out.stderr.strip() == "keyagent: error: no flow 'launch-7' in the log; flows: launch"
    assert not out_svg.exists()


# -- the HTML page ----------------------------------------------------------------------------


def test_html_page_is_self_contained(tmp_path):
    page = tmp_path / "p.html"
    assert replay(*ALL_TRACES, "--html", page).returncode == 0
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text and "@import" not in text
    assert re.findall(r"url\((?!#)", text) == []
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) == {"http://www.w3.org/2000/svg"}
    assert " src=" not in text and 'href="http' not in text


def test_retries_fold_into_one_arrow_with_a_count(tmp_path):
    out_svg = tmp_path / "r.svg"
    assert replay(RETRIED, "--svg", out_svg).returncode == 0  # one flow: --flow not needed
    root = svg_root(out_svg.read_text())
    measures = [t for t in texts(root, "label") if "query-sev-launch-measure" in t]
    # three failed tries folded into one (send, error), then the one that worked (send, reply)
    assert len(measures) == 4
    assert texts(root, "foldtext") == ["×3"]


def test_a_long_retry_loop_folds_to_one_row(tmp_path):
    log = LogWriter()
    recs = flow_records("launch-measurement-retried")
    log.copy_flow(recs, "launch", repeat=retry_loop(recs, 500))
    log.exit()
    path = log.write(tmp_path / "l.jsonl")
    assert replay("--check", path).returncode == 0  # the generated log is one the flow replays
    out_svg = tmp_path / "l.svg"
    assert replay(path, "--svg", out_svg).returncode == 0
    root = svg_root(out_svg.read_text())
    assert texts(root, "foldtext") == ["×500"]
    assert len([t for t in texts(root, "label") if "query-sev-launch-measure" in t]) == 4


def test_secrets_are_drawn_as_redacted_lengths_never_as_bytes(tmp_path):
    launch = replay_with_secrets(tmp_path / "launch.jsonl", "launch-good", {"OwnerReleased": PACKET_SECRET})
    migration = replay_with_secrets(tmp_path / "mig.jsonl", "migration-source-completed-multifd", {"KeyProvided": PSK})
    page, svg = tmp_path / "p.html", tmp_path / "m.svg"
    assert replay(launch, migration, "--html", page).returncode == 0
    assert replay(migration, "--svg", svg).returncode == 0
    html_text, svg_text = page.read_text(), svg.read_text()
    assert "[redacted, 96 bytes]" in html_text
    assert "key psk [redacted, 32 bytes]" in svg_text
    assert "keys.psk [redacted, 70 bytes]" in svg_text  # qemu:<64 hex digits>\n
    scan = leakscan.LeakScan()
    scan.secret("launch secret", PACKET_SECRET)
    scan.secret("psk", PSK)
    for name in (launch, migration, page, svg):
        scan.file(str(name))
    scan.check()


def lazy_diagrams(page: str) -> list[str]:
    """The diagrams a page keeps to draw on demand (gzip, base64, JSON)."""
    import base64
    import gzip

    m = re.search(r'<script type="application/x-keyagent-lazy" id="ka-lazy">([^<]*)</script>', page)
    return json.loads(gzip.decompress(base64.b64decode(m.group(1)))) if m else []


def test_diagrams_kept_for_later_are_the_same_and_hold_no_secrets(tmp_path):
    from agent.app.eventlog import read_records
    from agent.tools import replayviz

    launch = replay_with_secrets(tmp_path / "launch.jsonl", "launch-good", {"OwnerReleased": PACKET_SECRET})
    migration = replay_with_secrets(tmp_path / "mig.jsonl", "migration-source-completed-multifd", {"KeyProvided": PSK})
    logs = [(str(p), list(read_records(str(p)))) for p in (launch, migration)]
    eager = replayviz.page(replayviz.build(logs))
    later = replayviz.page(replayviz.build(logs), eager_rows=0)
    assert lazy_diagrams(eager) == []
    kept = lazy_diagrams(later)
    assert len(kept) == 2 and later.count('<div data-lazy="') == 2
    assert kept == re.findall(r'<div class="diagram">(.*?)</div></details>', eager, re.S)
    scan = leakscan.LeakScan()
    scan.secret("launch secret", PACKET_SECRET)
    scan.secret("psk", PSK)
    scan.text("page", later)
    scan.text("kept", "".join(kept))
    scan.check()


def test_a_readable_but_odd_log_still_draws(tmp_path):
    """Records replay --check refuses (unknown kind, a non-object event, an
    event for a flow never created) are drawn as they are."""
    log = LogWriter()
    log.add({"kind": "flow", "flow": "x", "flow_kind": "no-such-flow", "params": []}, 0.001)
    log.add({"kind": "event", "flow": "x", "event": [1, 2]}, 0.001)
    log.add({"kind": "action", "flow": "y", "action": {"type": "SwtpmStart", "args": {"fd": 3}}}, 0.001)
    log.add({"kind": "event", "flow": "y", "event": {"type": "Mystery", "n": {"redacted": 5}}}, 0.001)
    log.add({"kind": "event", "flow": "y", "event": {"type": "QmpEvent", "name": "\x01<b>&"}}, 0.001)
    log.add({"kind": "note", "text": "not a flow record"}, 0.001)
    path = log.write(tmp_path / "odd.jsonl")
    page, svg = tmp_path / "p.html", tmp_path / "y.svg"
    assert replay(path, "--html", page).returncode == 0
    assert replay(path, "--svg", svg, "--flow", "y").returncode == 0
    root = svg_root(svg.read_text())
    swtpm = [
        e for e in root.iter(f"{SVG_NS}line") if "arrow" in e.get("class", "") and abs(float(e.get("x2")) - 1067) < 5
    ]
    assert len(swtpm) == 1  # the swtpm action is drawn to the swtpm lane
    assert "Mystery n=[redacted, 5 bytes]" in "".join(root.itertext())
    assert "&lt;b&gt;&amp;" in svg.read_text()
    summary = replay(path, "--summary").stdout
    assert "no-such-flow" in summary and "unfinished" in summary


def test_summary_prints_no_control_characters_from_the_log(tmp_path):
    log = LogWriter()
    log.copy_flow(flow_records("launch-refused-quit"), "launch\x1b[2J\ud800")
    path = log.write(tmp_path / "esc.jsonl")
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "replay", str(path), "--summary"], capture_output=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert b"\x1b" not in out.stdout and "launch\ufffd[2J\ufffd" in out.stdout.decode()


@pytest.mark.parametrize(
    "args, words",
    [
        (["{missing}", "--html", "{out}"], "cannot read"),
        (["{cut}", "--html", "{out}"], "truncated at line"),
        (["{log}", "--html", "{tmp}/no/such/dir/x.html"], "no directory"),
        (["{log}", "--html", "{log}"], "it is the log being read"),
        (["{log}", "--html", "{out}", "--summary"], "not allowed with"),
        (["{log}", "--flow", "launch"], "--flow goes with --svg"),
        (["{log}", "{log}", "--check"], "several logs only with"),
        (["{log}", "{log}", "--svg", "{out}"], "--svg needs --flow ID"),
    ],
)
def test_bad_input_is_one_line_exit_two_and_writes_nothing(tmp_path, args, words):
    cut = tmp_path / "cut.jsonl"
    cut.write_text(REFUSED.read_text()[:700])
    log = tmp_path / "log.jsonl"
    log.write_text(REFUSED.read_text())
    before = sorted(p.name for p in tmp_path.iterdir())
    names = {"missing": tmp_path / "nope.jsonl", "cut": cut, "log": log, "out": tmp_path / "out.html", "tmp": tmp_path}
    out = replay(*(a.format(**names) for a in args))
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert log.read_text() == REFUSED.read_text()


def test_the_picture_is_not_imported_on_the_agent_path():
    code = (
        "import sys, agent.cli.main, agent.app.sidecar, agent.cli.run, agent.cli.launch, agent.app.replay\n"
        "assert 'agent.tools.replayviz' not in sys.modules, 'imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# -- in a browser -----------------------------------------------------------------------------


def _flow_svgs(dom: str) -> list[ET.Element]:
    """The diagrams the loaded page shows, parsed (the DOM dump is HTML; each
    inline svg in it is well-formed XML), each with its lane header."""
    shown = []
    for head, body in re.findall(r'<div class="lanes">(<svg.*?</svg>)</div>(<svg class="ka".*?</svg>)', dom, re.S):
        both = ET.Element("diagram")
        both.extend([svg_root(head), svg_root(body)])
        shown.append(both)
    return shown


@needs_chromium
def test_browser_shows_the_refused_launch_and_its_reason(tmp_path):
    page = tmp_path / "refused.html"
    assert replay(REFUSED, "--html", page).returncode == 0
    dom = dump_dom(page, tmp_path / "profile")
    [svg] = _flow_svgs(dom)
    assert texts(svg, "lane-name") == LANES
    assert len([e for e in svg.iter(f"{SVG_NS}line") if "arrow" in e.get("class", "")]) == 10
    assert texts(svg, "failtext") == [f"✗ failed here: {REFUSAL}"]
    assert f'<td class="result-failed">failed: {REFUSAL}</td>' in dom
    assert '<a href="#f1">launch</a>' in dom and 'id="f1"' in dom
    assert 'data-loaded-ms="' in dom  # the page's script ran to the end


@needs_chromium
def test_browser_page_holds_no_secret_bytes(tmp_path):
    launch = replay_with_secrets(tmp_path / "launch.jsonl", "launch-good", {"OwnerReleased": PACKET_SECRET})
    migration = replay_with_secrets(
        tmp_path / "mig.jsonl", "migration-destination-completed-sealed", {"KeyProvided": PSK}
    )
    page = tmp_path / "p.html"
    assert replay(launch, migration, "--html", page).returncode == 0
    dom = dump_dom(page, tmp_path / "profile")
    assert "[redacted, 96 bytes]" in dom and "[redacted, 32 bytes]" in dom
    scan = leakscan.LeakScan()
    scan.secret("launch secret", PACKET_SECRET)
    scan.secret("psk", PSK)
    scan.text("dom", dom)
    scan.check()


@needs_chromium
def test_browser_loads_a_100k_record_log(tmp_path):
    """Not timed (keyagent's speed is measured by bench, not by tests): the
    page loads, lists every flow, draws the first ones, keeps the rest for
    when they are opened, and draws one when its link is followed."""
    log, info = big_log(tmp_path / "big.jsonl")
    assert info["records"] >= 99_900
    page = tmp_path / "big.html"
    assert replay(log, "--html", page).returncode == 0
    dom = dump_dom(page, tmp_path / "profile")
    assert dom.count('<tr class="flow-row">') == info["flows"]
    assert dom.count('class="result-failed"') == info["refused"]
    drawn = _flow_svgs(dom)
    assert 10 < len(drawn) < 200
    # the failed flows are drawn first
    assert all(texts(svg, "failtext") == [f"✗ failed here: {REFUSAL}"] for svg in drawn)
    assert dom.count('<div data-lazy="') == info["flows"] - len(drawn)
    for anchor, check in (
        ("f1", lambda svg: texts(svg, "foldtext") == [f"×{info['retries']}"]),
        # the last refused launch: f1 is the retried one, then good (even) and refused (odd) alternate
        (f"f{info['flows'] - (1 - info['flows'] % 2)}", lambda svg: len(texts(svg, "failtext")) == 1),
    ):
        opened = dump_dom(page, tmp_path / "profile", fragment=f"#{anchor}", settle_ms=10_000)
        start = opened.index(f'id="{anchor}"')
        [svg] = _flow_svgs(opened[start : opened.index("</section>", start)])
        assert texts(svg, "lane-name") == LANES and check(svg), anchor


@needs_chromium
def test_browser_screenshot_of_a_refused_launch(tmp_path):
    page = tmp_path / "refused.html"
    assert replay(REFUSED, "--html", page).returncode == 0
    png = screenshot(page, tmp_path / "refused.png", tmp_path / "profile")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@needs_chromium
def test_browser_draws_the_standalone_svg(tmp_path):
    svg = tmp_path / "launch.svg"
    assert replay(REFUSED, "--svg", svg, "--flow", "launch").returncode == 0
    dom = dump_dom(svg, tmp_path / "profile")
    root = svg_root(dom[dom.index("<svg") :])
    assert texts(root, "lane-name") == LANES
    assert texts(root, "failtext") == [f"✗ failed here: {REFUSAL}"]
    png = screenshot(svg, tmp_path / "launch.png", tmp_path / "profile", size="1150,800")
    assert png.startswith(b"\x89PNG")


def test_summary_into_a_pipe_closed_early_exits_quietly(tmp_path):
    log = LogWriter()
    good = flow_records("launch-good")
    for n in range(1500):  # a summary longer than a pipe's buffer
        log.copy_flow(good, f"launch-{n}")
    path = log.write(tmp_path / "many.jsonl")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "replay", str(path), "--summary"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline().split()[0] == b"ID"
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == b""


def test_a_real_refused_launch_is_drawn_with_its_wall_clock_start(tmp_path):
    """The agent, the simulator and the owner for real (as tests/e2e do): the
    log of a refused launch says when it started, the page shows the refusal,
    and none of the owner's keys or the disk passphrase is in it."""
    import datetime

    from tests.e2e.harness import DISK_PASS, World

    world = World(tmp_path)
    try:
        world.simulator()
        agent = world.agent(world.owner(digest=hashlib.sha256(b"other firmware").digest()))
        before = datetime.datetime.now(datetime.UTC)
        assert agent.wait() == 1, agent.stderr
    finally:
        world.close()
    log = tmp_path / "events.jsonl"
    assert "wall" in json.loads(log.read_text().splitlines()[0])
    out = replay(log, "--summary")
    assert out.returncode == 0, out.stderr
    row = out.stdout.splitlines()[1].split()
    assert row[:3] == ["launch", "vm1", "sev-launch"]
    started = datetime.datetime.strptime(f"{row[3]} {row[4]}", "%Y-%m-%d %H:%M:%S.%fZ")
    assert abs(started.replace(tzinfo=datetime.UTC) - before) < datetime.timedelta(seconds=30)
    assert "failed: guest owner refused" in out.stdout
    page = tmp_path / "refused.html"
    assert replay(log, "--html", page).returncode == 0
    assert "✗ failed here: guest owner refused" in page.read_text()
    scan = leakscan.LeakScan()
    for name, secret in (("disk passphrase", DISK_PASS), ("TIK", world.tik), ("TEK", world.tek)):
        scan.secret(name, secret)
    scan.file(str(page))
    scan.file(str(log))
    scan.check()
