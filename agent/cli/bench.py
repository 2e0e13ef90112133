"""``keyagent bench``: the agent's cost next to a bare qemu.qmp floor (:mod:`agent.tools.bench`)."""

from __future__ import annotations


def register(sub) -> None:
    from agent.tools.bench import FULL, MIGRATION_FILL_MB, MIGRATION_RAM_MB, SMOKE

    p = sub.add_parser("bench", help="measure the agent's cost next to a bare qemu.qmp floor")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--smoke", action="store_true", help="tiny counts, to check that the command works (CI)")
    p.add_argument(
        "--launches",
        type=int,
        metavar="N",
        help=f"launches per side (default {FULL['launches']}, smoke {SMOKE['launches']})",
    )
    p.add_argument(
        "--density",
        type=int,
        metavar="N",
        help=f"sidecars launching at once (default {FULL['density']}, smoke {SMOKE['density']})",
    )
    p.add_argument(
        "--migrations",
        type=int,
        metavar="N",
        help=f"migrations per side (default {FULL['migrations']}, smoke {SMOKE['migrations']})",
    )
    p.add_argument(
        "--replay-events", type=int, metavar="N", help=f"events in the generated log (default {FULL['replay_events']})"
    )
    p.add_argument(
        "--migration-fill-mb",
        type=int,
        metavar="N",
        help="MiB of random contents in the migrated guest's RAM "
        f"(default {MIGRATION_FILL_MB['full']}, smoke {MIGRATION_FILL_MB['smoke']}; "
        f"RAM is {MIGRATION_RAM_MB} MiB)",
    )
    p.add_argument("--only", metavar="KEY,...", help="measure only these figures")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs of every process)")
    p.set_defaults(func=run)


def run(args) -> int:
    from agent.tools.bench import run as bench

    return bench(args)
