"""``keyagent bench --smoke --json``: the command keeps working (CI runs tiny counts).

The figures themselves are not checked: a smoke run on a shared machine says
nothing about them.  What is checked is the shape of the report.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.tools.bench import TARGETS, format_table, percentile

KEYS = (
    "launch_ratio",
    "launch_added_ms_p50",
    "idle_rss_mb",
    "startup_ms",
    "replay_events_per_s",
    "replay_html_records_per_s",
    "migration_ratio",
    "migration_fixed_ms",
    "density_launch_p99_ms",
    "density_rss_mb_total",
    "host_density_ratio",
    "host_density_p99_ms",
    "host_rss_kb_per_vm",
    "agent_cpu_ms_per_launch",
    "owner_secret_rps_sqlite",
    "owner_secret_rps_postgresql",
    "owner_p99_ms",
)


# Its migration figure runs two real QEMUs where qemu-system-x86_64 is installed.
@pytest.mark.qemu
def test_smoke_run_prints_every_figure_as_json_and_exits_0():
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "--smoke", "--json"], capture_output=True, text=True, timeout=150
    )
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
    report = json.loads(out.stdout)
    assert report["errors"] == {}
    assert set(KEYS) <= set(report) and set(TARGETS) == set(KEYS)
    for key in KEYS:
        if (
            key in report["skipped"]
        ):  # migration without QEMU, host mode in a build without it, PostgreSQL without its binaries
            assert report[key] is None and report["skipped"][key]
        elif key in ("launch_added_ms_p50", "host_rss_kb_per_vm"):
            # A difference of two medians (of two RSS readings): noise can make it negative.
            assert isinstance(report[key], (int, float)), key
        else:
            assert isinstance(report[key], (int, float)) and report[key] > 0, key
    assert set(report["targets_met"]) == set(KEYS)
    assert all(v in (True, False, None) for v in report["targets_met"].values())
    assert report["targets_met"]["density_rss_mb_total"] is None  # reported, no target
    assert report["mode"] == "smoke" and report["machine"]["nproc"] >= 1
    assert "| launch_ratio |" in format_table(report)


def test_unknown_figure_is_a_usage_error():
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "--only", "speed"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"keyagent: error: --only: unknown figure 'speed' (known: {', '.join(KEYS)})"
    ]


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 99) == 99 and percentile(values, 50) == 50
    assert percentile([7.0], 99) == 7.0
