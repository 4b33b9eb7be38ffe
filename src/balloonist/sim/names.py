"""Every policy name the simulator runs: the online ones, then its bounds.

Light on purpose, like :mod:`balloonist.policy.names`: the CLI reads it at start.
"""

from __future__ import annotations

from typing import Final

from balloonist.policy.names import ONLINE_POLICY_NAMES

#: The bounds the simulator runs in its instant move mode (``sim/oracle.py``).
ORACLE_NAMES: Final = ("oracle", "oracle-fair")
POLICY_NAMES: Final = (*ONLINE_POLICY_NAMES, *ORACLE_NAMES)
