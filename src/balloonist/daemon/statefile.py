"""``daemon-state.json``: what a daemon restarted after a crash resumes from.

After every period in which anything changed, the daemon records each guest's spec
(with the live changes operators made, see :class:`~balloonist.daemon.control.GuestChange`),
where its balloon stands (actual size and the last target applied) and, for a backend
whose clock survives a restart (the simulator), the policy's working-set estimates.
The file is written atomically (a temporary file in the same directory, fsync, rename,
fsync of the directory), so a daemon killed at any moment, SIGKILL included, leaves
either the previous period's file or this one's, never a torn one.

On start the daemon reads it back. A file that cannot be read or parsed, or fails the
schema below, is *corrupt*: it is logged as one error line and renamed aside to
``daemon-state.json.corrupt-<timestamp>`` (never overwritten), and the daemon starts
fresh. A valid file written by another backend or for another scenario is set aside
the same way (``.other-<timestamp>``), with a warning. What a valid file restores is
described in :mod:`balloonist.daemon.service`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Final, Literal

from pydantic import Field, ValidationError

from balloonist.atomicfile import fsync_dir, remove_leftovers, write_atomic
from balloonist.config import MAX_CPUS_NAMES, MIN_CPUS_NAMES, Strict, format_loc
from balloonist.daemon.backend import GuestState
from balloonist.daemon.control import GuestChange
from balloonist.errors import BalloonistError
from balloonist.model import GuestSpec
from balloonist.policy.workingset import EstimateState

log = logging.getLogger("balloonist.daemon")

STATE_FILE: Final = "daemon-state.json"
FORMAT: Final = 1


class SavedChange(Strict):
    """Live changes to a guest's spec, as given (None: not changed live)."""

    min_bytes: int | None = Field(default=None, ge=0)
    max_bytes: int | None = Field(default=None, ge=0)
    shares: int | None = Field(default=None, ge=1)
    min_cpus: int | None = Field(default=None, ge=1, validation_alias=MIN_CPUS_NAMES)
    max_cpus: int | None = Field(default=None, ge=1, validation_alias=MAX_CPUS_NAMES)
    cpu_shares: int | None = Field(default=None, ge=1)


class SavedEstimate(Strict):
    fast_bytes: float = Field(ge=0)
    slow_bytes: float = Field(ge=0)
    observed_at_s: float


class SavedGuest(Strict):
    memory_bytes: int = Field(gt=0)
    min_bytes: int = Field(ge=0)
    max_bytes: int = Field(ge=0)
    shares: int = Field(ge=1)
    changed: SavedChange = SavedChange()
    allocated_bytes: int | None = Field(default=None, ge=0)
    balloon_bytes: int | None = Field(default=None, ge=0)
    balloon_target_bytes: int | None = Field(default=None, ge=0)
    estimate: SavedEstimate | None = None


def saved_guest(
    spec: GuestSpec,
    state: GuestState | None,
    live: GuestChange,
    estimate: tuple[EstimateState, float] | None,
) -> SavedGuest:
    """What the state file records of one guest: its spec, the live changes in effect,
    where it was, and (simulator) its working-set averages and when they were taken."""
    return SavedGuest(
        memory_bytes=spec.memory_bytes,
        min_bytes=spec.min_bytes,
        max_bytes=spec.limit_bytes,
        shares=spec.shares,
        changed=SavedChange.model_validate(dataclasses.asdict(live)),
        allocated_bytes=state.allocated_bytes if state else None,
        balloon_bytes=state.balloon_bytes if state else None,
        balloon_target_bytes=state.balloon_target_bytes if state else None,
        estimate=(
            SavedEstimate(
                fast_bytes=estimate[0].fast_bytes,
                slow_bytes=estimate[0].slow_bytes,
                observed_at_s=estimate[1],
            )
            if estimate is not None
            else None
        ),
    )


class SavedPolicy(Strict):
    name: str
    tax_rate: float = Field(ge=0.0, lt=1.0)  # in effect
    changed_tax_rate: float | None = Field(default=None, ge=0.0, lt=1.0)  # set live


class SavedState(Strict):
    format: Literal[1]
    backend: Literal["qemu", "libvirt", "sim"]
    scenario: str | None = None  # the simulator's scenario name
    periods: int = Field(ge=0)  # periods run, across restarts
    time_s: float | None = None  # the backend's own clock (the simulator's)
    saved_at: str  # wall-clock time of writing, for people
    policy: SavedPolicy
    guests: dict[str, SavedGuest]

    def same_content(self, other: SavedState | None) -> bool:
        """Equal but for the bookkeeping fields (periods, saved_at)."""
        if other is None:
            return False
        skip = {"periods", "saved_at"}
        return self.model_dump(exclude=skip) == other.model_dump(exclude=skip)


def save_state(path: Path, state: SavedState) -> None:
    write_atomic(path, state.model_dump_json(indent=2) + "\n")


def load_state(path: Path, *, backend: str, scenario: str | None) -> SavedState | None:
    """The saved state, or None to start fresh (no file, or one set aside).

    Raises BalloonistError only if a file that must be set aside cannot be renamed:
    starting anyway would overwrite it.
    """
    for tmp in remove_leftovers(path):
        log.info("removed %s, left by a write that was cut short", tmp.name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        _corrupt(path, f"cannot read it: {exc}")
        return None
    try:
        state = SavedState.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = format_loc(err["loc"])
        why = " ".join(str(err["msg"]).split())
        _corrupt(path, f"{where}: {why}" if where else why)
        return None
    if state.backend != backend or state.scenario != scenario:
        theirs = state.backend + (f" scenario {state.scenario!r}" if state.scenario else "")
        ours = backend + (f" scenario {scenario!r}" if scenario else "")
        aside = set_aside(path, "other")
        log.warning(
            "%s was written by a %s daemon, this is a %s one; set aside as %s; starting fresh",
            path,
            theirs,
            ours,
            aside.name,
        )
        return None
    return state


def _corrupt(path: Path, why: str) -> None:
    aside = set_aside(path, "corrupt")
    log.error("%s is corrupt (%s); set aside as %s; starting fresh", path, why, aside.name)


def set_aside(path: Path, label: str) -> Path:
    """Rename ``path`` to ``<name>.<label>-<timestamp>``, never over an existing file."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        aside = path.with_name(f"{path.name}.{label}-{stamp}" + (f"-{n}" if n else ""))
        if aside.exists():
            continue
        try:
            os.rename(path, aside)
            fsync_dir(path.parent)
        except OSError as exc:
            raise BalloonistError(
                f"{path} cannot be used and cannot be set aside ({exc.strerror}); "
                "move it away and start again"
            ) from exc
        return aside
    raise BalloonistError(f"{path}: too many files set aside already; clean up {path.parent}")


__all__ = [
    "FORMAT",
    "STATE_FILE",
    "SavedChange",
    "SavedEstimate",
    "SavedGuest",
    "SavedPolicy",
    "SavedState",
    "load_state",
    "save_state",
    "saved_guest",
    "set_aside",
]
