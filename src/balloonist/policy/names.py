"""The online policies' names, in the order the docs list them.

Apart from the registry so the CLI can build its help and check ``--policy`` without
importing a single policy (and so numpy).
"""

from __future__ import annotations

from typing import Final

ONLINE_POLICY_NAMES: Final = ("demand", "shares", "static", "host-swap", "proxmox", "mom")
