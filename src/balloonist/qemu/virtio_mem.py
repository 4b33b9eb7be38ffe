"""A VM resized through virtio-mem, for guests a balloon cannot serve.

A balloon lends memory back from inside a guest that keeps its full size; virtio-mem
changes the size itself: the guest boots with its boot memory and QEMU offers a
hot-pluggable region beside it (``-device virtio-mem-pci``), which the guest's
``virtio_mem`` driver plugs and unplugs in blocks as the host asks
(``requested-size``). Passthrough devices and huge pages, which defeat a balloon,
do not defeat it: unplugged memory is simply not there.

:class:`VirtioMemQMP` is a :class:`~balloonist.daemon.vm_ports.VmPort` like
:class:`~balloonist.qemu.qmp.BalloonQMP`, so the daemon drives such a VM with the
same scheduler, pacing and safety rules; its target is the guest's whole memory,
boot memory plus what is plugged. The VM keeps its virtio-balloon device for the
guest's statistics, and its balloon is never inflated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from qemu.qmp import EventListener
from qemu.qmp.message import Message

from balloonist.errors import FatalBackendError
from balloonist.qemu.qmp import COMMAND_TIMEOUT_S, BalloonQMP
from balloonist.units import MIB

#: The id the launcher gives the device, and its QOM path.
VMEM_ID: Final = "vmem0"
VMEM_QOM_PATH: Final = f"/machine/peripheral/{VMEM_ID}"
#: The block the guest plugs and unplugs: x86's transparent huge page (QEMU's default
#: there, spelled out so sizes can be checked before QEMU starts).
BLOCK_BYTES: Final = 2 * MIB


def requested_bytes(guest_bytes: int, boot_bytes: int, region_bytes: int) -> int:
    """The region's requested size that gives the guest ``guest_bytes`` in all, in
    whole blocks, rounded down (a target is never exceeded) and within the region."""
    wanted = max(0, guest_bytes - boot_bytes) // BLOCK_BYTES * BLOCK_BYTES
    return min(wanted, region_bytes)


def _ours(event: Message) -> bool:
    data = event.get("data")
    return isinstance(data, dict) and (
        data.get("qom-path") == VMEM_QOM_PATH or data.get("id") == VMEM_ID
    )


class VirtioMemQMP(BalloonQMP):
    """A VM's virtio-mem device over QMP: ``set_target`` asks for a size, and the
    guest's memory is its boot memory plus what is plugged now (``size``).

    The plugged size is read again only after QEMU said it changed: every change
    sends ``MEMORY_DEVICE_SIZE_CHANGE`` (at most one a second per device, the last
    held back to the end of the second, so a change is never more than a second
    from its event). Events are taken before the read, so one that comes during it
    has the next read made too: the size known is never older than the last event.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        name: str,
        boot_bytes: int,
        region_bytes: int,
        timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        super().__init__(socket_path, name=name, timeout_s=timeout_s)
        self.boot_bytes = boot_bytes
        self.region_bytes = region_bytes
        self._plugged_bytes: int | None = None  # as last read; None: read it
        self._sizes = self._listener()
        self._client.register_listener(self._sizes)
        self.reads = 0  # times the size was read (for tests: events save the rest)

    @staticmethod
    def _listener() -> EventListener:
        return EventListener("MEMORY_DEVICE_SIZE_CHANGE", event_filter=_ours)

    def _changed(self) -> bool:
        """Whether QEMU said the size changed since the last look. The listener is
        swapped for a fresh one each time (no await in between, so no event falls
        between them): a listener keeps every event it ever saw."""
        old, self._sizes = self._sizes, self._listener()
        self._client.register_listener(self._sizes)
        events = old.clear()
        self._client.remove_listener(old)
        return bool(events)

    async def connect(self) -> None:
        self._plugged_bytes = None  # what changed while it was away sent no event here
        await super().connect()

    async def set_target(self, guest_bytes: int) -> None:
        """Ask the guest to hold ``guest_bytes`` of memory in all (``requested-size``)."""
        if guest_bytes <= 0:
            raise ValueError(f"target must be positive, got {guest_bytes}")
        size = requested_bytes(guest_bytes, self.boot_bytes, self.region_bytes)
        await self._execute(
            "qom-set", {"path": VMEM_QOM_PATH, "property": "requested-size", "value": size}
        )

    async def actual_bytes(self) -> int:
        """Its memory now: boot memory plus the region's plugged ``size``, read again
        if QEMU said it changed (see the class docstring)."""
        if self._changed() or self._plugged_bytes is None:
            self._plugged_bytes = None  # until read: a read that fails is made again
            self.reads += 1
            reply = await self._execute("qom-get", {"path": VMEM_QOM_PATH, "property": "size"})
            plugged = reply if isinstance(reply, int) and not isinstance(reply, bool) else -1
            if not 0 <= plugged <= self.region_bytes:
                raise FatalBackendError(
                    f"{self.name}: virtio-mem reports no usable size: {reply!r}"
                )
            self._plugged_bytes = plugged
        return self.boot_bytes + self._plugged_bytes


__all__ = ["BLOCK_BYTES", "VMEM_ID", "VMEM_QOM_PATH", "VirtioMemQMP", "requested_bytes"]
