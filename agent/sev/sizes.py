"""Sizes of the SEV launch messages, without the crypto that builds them.

The core checks the lengths of what the guest owner and QEMU send before it
passes them on (``agent.core.owner_answer``, ``agent.core.launch``); it
imports them from here, not from ``agent.sev.packet``/``measurement``, so an
idle sidecar does not load ``cryptography`` (README: memory of an idle
sidecar).  Names and layouts as in AMD's SEV API specification (#55766).
"""

from __future__ import annotations

import struct

#: Table 55, the packet header QEMU's ``sev-inject-launch-secret`` takes:
#: FLAGS u32, IV[16], MAC[32]
PACKET_HEADER = struct.Struct("<I16s32s")
PACKET_HEADER_LEN = PACKET_HEADER.size  # 52

#: LAUNCH_MEASURE's blob (``query-sev-launch-measure``): MEASURE[32] || MNONCE[16]
MEASURE_LEN = 32
MNONCE_LEN = 16
MEASUREMENT_LEN = MEASURE_LEN + MNONCE_LEN  # 48
