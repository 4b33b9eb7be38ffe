"""The daemon runs the host's page sharing (KSM) by how much memory is free, and never
fights an administrator who runs it by hand.

Who manages KSM is one state (:class:`KsmMode`):

- **managing**: balloonist found KSM stopped when it started and sets it every period
  (:func:`balloonist.ksm.ksm_setting`); when it stops, it puts back the knobs it found.
  While it manages KSM it keeps a claim (:class:`KsmClaim`, ``ksm.json`` in the state
  directory): the knobs it found and the ones it last wrote. A daemon that died
  without putting KSM back leaves the claim, and the next one, finding the knobs
  still as written there, takes KSM back over (and puts back what the first found).
- **left alone**: KSM was already running when balloonist started (an administrator,
  ksmtuned, another daemon), or its knobs changed under balloonist (someone wrote
  them): balloonist reads the figures but writes nothing, from then on. Said once, in
  the log and in the status.
- **off**: ``[ksm] mode = "off"``: not touched.
- **unavailable**: the kernel has no KSM, or the host refused a write (not root).

Reading or writing the knobs can fail; each failure is counted
(``FailureCounter.KSM_ERRORS``) and the period goes on without KSM's figures.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, Protocol

from balloonist.atomicfile import write_atomic
from balloonist.errors import BackendError, FatalBackendError, StateError
from balloonist.ksm import KsmKnobs, KsmParams, KsmTotals, ksm_setting

log = logging.getLogger("balloonist.daemon")


class KsmMode(enum.Enum):
    NEW = "new"
    MANAGING = "managing"
    LEFT_ALONE = "left alone"
    OFF = "off"
    UNAVAILABLE = "unavailable"
    CLOSED = "closed"


_MOVES: Final[dict[KsmMode, frozenset[KsmMode]]] = {
    KsmMode.NEW: frozenset({KsmMode.MANAGING, KsmMode.LEFT_ALONE, KsmMode.UNAVAILABLE}),
    KsmMode.MANAGING: frozenset({KsmMode.LEFT_ALONE, KsmMode.UNAVAILABLE}),
    KsmMode.LEFT_ALONE: frozenset(),
    KsmMode.OFF: frozenset(),
    KsmMode.UNAVAILABLE: frozenset(),
    KsmMode.CLOSED: frozenset(),
}


class KsmHost(Protocol):
    """The kernel's KSM (``balloonist.ksm.SysKernelKsm``; a fake in tests)."""

    def available(self) -> bool: ...

    def knobs(self) -> KsmKnobs: ...

    def set_knobs(self, knobs: KsmKnobs) -> None: ...

    def totals(self) -> KsmTotals: ...


class KsmClaim:
    """The knobs balloonist found and last wrote, in ``path``, while it manages KSM."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[KsmKnobs, KsmKnobs] | None:
        """(found, written) of an earlier daemon; None if there is none or it is unreadable."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return KsmKnobs(**data["found"]), KsmKnobs(**data["written"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, found: KsmKnobs, written: KsmKnobs) -> None:
        try:
            write_atomic(
                self.path, json.dumps({"found": asdict(found), "written": asdict(written)})
            )
        except OSError as exc:
            log.warning("KSM: cannot keep the claim in %s: %s", self.path, exc)

    def clear(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("KSM: cannot remove the claim %s: %s", self.path, exc)


@dataclass(frozen=True)
class KsmStatus:
    """KSM on the host as the last period left it."""

    mode: KsmMode
    knobs: KsmKnobs | None  # as read; None when they could not be read
    totals: KsmTotals | None
    #: Why balloonist does not manage it, for people; None while it does.
    reason: str | None = None


class KsmControl:
    """KSM's knobs, set every period from the VMs' free share of memory."""

    def __init__(
        self,
        host: KsmHost,
        params: KsmParams,
        *,
        enabled: bool = True,
        claim: KsmClaim | None = None,
    ) -> None:
        self._host = host
        self._claim = claim
        self.params = params
        self._mode = KsmMode.NEW if enabled else KsmMode.OFF
        self._reason: str | None = (
            None if enabled else 'turned off in host.toml ([ksm] mode = "off")'
        )
        self._found: KsmKnobs | None = None  # what it was when balloonist took it over
        self._expected: KsmKnobs | None = None  # what balloonist last left it at
        self._knobs: KsmKnobs | None = None
        self._totals: KsmTotals | None = None
        self.errors = 0

    @property
    def mode(self) -> KsmMode:
        return self._mode

    def status(self) -> KsmStatus:
        return KsmStatus(self._mode, self._knobs, self._totals, self._reason)

    def step(self, free_fraction: float | None) -> None:
        """One period: read the knobs and totals, and set the knobs for
        ``free_fraction`` if balloonist manages KSM (None: not known this period,
        the knobs stay as they are)."""
        if self._mode in (KsmMode.OFF, KsmMode.UNAVAILABLE, KsmMode.CLOSED):
            return
        try:
            self._step(free_fraction)
        except FatalBackendError as exc:
            self.errors += 1
            self._leave(KsmMode.UNAVAILABLE, str(exc))
        except BackendError as exc:
            self.errors += 1
            self._knobs = self._totals = None
            log.warning("KSM: %s", exc)

    def close(self) -> None:
        """Put back the knobs balloonist found, unless someone changed them since."""
        if self._mode is KsmMode.MANAGING and self._found is not None:
            try:
                if self._host.knobs() == self._expected:
                    self._host.set_knobs(self._found)
                if self._claim is not None:
                    self._claim.clear()
            except BackendError as exc:
                self.errors += 1
                log.warning("KSM: not put back as found: %s", exc)
        self._move(KsmMode.CLOSED)

    def _step(self, free_fraction: float | None) -> None:
        if self._mode is KsmMode.NEW:
            self._start()
        if self._mode is KsmMode.UNAVAILABLE:
            return
        knobs = self._host.knobs()
        if self._mode is KsmMode.MANAGING and knobs != self._expected:
            self._leave(
                KsmMode.LEFT_ALONE,
                f"its settings were changed outside balloonist ({_describe(knobs)})",
            )
        if self._mode is KsmMode.MANAGING and free_fraction is not None:
            wanted = ksm_setting(free_fraction, knobs.running, self.params)
            if wanted != knobs:
                self._host.set_knobs(wanted)
                if self._claim is not None and self._found is not None:
                    self._claim.save(self._found, wanted)
                if wanted.running != knobs.running:
                    log.info(
                        "KSM %s: %.0f%% of the VMs' memory is free",
                        "started" if wanted.running else "stopped",
                        free_fraction * 100,
                    )
                knobs = self._expected = wanted
        self._knobs = knobs
        self._totals = self._host.totals()

    def _start(self) -> None:
        if not self._host.available():
            self._leave(KsmMode.UNAVAILABLE, "this kernel has no KSM (/sys/kernel/mm/ksm)")
            return
        found = self._host.knobs()
        earlier = self._claim.load() if self._claim is not None else None
        if earlier is not None and earlier[1] == found:
            # An earlier daemon managed it and died before putting it back.
            self._found, self._expected = earlier[0], found
            self._move(KsmMode.MANAGING)
            log.info("KSM: taken back over from a daemon that did not stop cleanly")
            return
        if self._claim is not None:
            self._claim.clear()  # stale: someone set KSM since
        if found.run != 0:
            self._leave(
                KsmMode.LEFT_ALONE,
                f"it was already running when balloonist started ({_describe(found)}): "
                "an administrator or ksmtuned manages it",
            )
            return
        self._found = self._expected = found
        self._move(KsmMode.MANAGING)
        log.info("KSM: balloonist runs it by free memory (%s)", _describe(found))

    def _leave(self, to: KsmMode, reason: str) -> None:
        if self._claim is not None and self._mode is KsmMode.MANAGING:
            self._claim.clear()  # no longer balloonist's to put back
        self._move(to)
        self._reason = reason
        log.warning("KSM %s: %s", to.value, reason)

    def _move(self, to: KsmMode) -> None:
        """Along one of ``_MOVES``, or to CLOSED from anywhere; anything else is a bug."""
        if to is not KsmMode.CLOSED and to not in _MOVES[self._mode]:
            raise StateError("KSM control", self._mode, to)
        self._mode = to


def _describe(knobs: KsmKnobs) -> str:
    return f"run={knobs.run}, pages_to_scan={knobs.pages_to_scan}, sleep {knobs.sleep_ms} ms"


__all__ = ["KsmClaim", "KsmControl", "KsmHost", "KsmMode", "KsmStatus"]
