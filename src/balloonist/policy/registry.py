"""Build a policy from its configured name: the one place names map to classes.

``oracle`` and ``oracle-fair`` are not built here: they need the whole scenario (future
workloads), which only the simulator has, so the simulator constructs them itself.
"""

from __future__ import annotations

from typing import Final

from balloonist.errors import ConfigError
from balloonist.policy import Policy
from balloonist.policy.baselines import HostSwapPolicy, MomPolicy, ProxmoxPolicy, StaticPolicy
from balloonist.policy.demand import DemandPolicy
from balloonist.policy.names import ONLINE_POLICY_NAMES
from balloonist.policy.shares import SharesPolicy

#: Names ``make_policy`` builds, in the order the docs list them.
POLICY_NAMES: Final = ONLINE_POLICY_NAMES
#: The bounds: built by the simulator (``sim/oracle.py``), which has the whole scenario.
_SIMULATOR_ONLY: Final = ("oracle", "oracle-fair")


def make_policy(name: str, *, tax_rate: float) -> Policy:
    """The policy called ``name``; ``tax_rate`` applies to those that tax idle memory."""
    if name == "demand":
        return DemandPolicy(tax_rate=tax_rate)
    if name == "shares":
        return SharesPolicy(tax_rate=tax_rate)
    if name == "static":
        return StaticPolicy()
    if name == "host-swap":
        return HostSwapPolicy(tax_rate=tax_rate)
    if name == "proxmox":
        return ProxmoxPolicy()
    if name == "mom":
        return MomPolicy()
    if name in _SIMULATOR_ONLY:
        raise ConfigError(
            f"the {name} policy needs the scenario (it reads future workloads); "
            "only the simulator can build it",
            where="policy.name",
        )
    raise ConfigError(
        f"unknown policy {name!r} (choose from {', '.join((*POLICY_NAMES, *_SIMULATOR_ONLY))})",
        where="policy.name",
    )
