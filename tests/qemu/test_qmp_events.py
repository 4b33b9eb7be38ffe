"""QMP events: VirtioMemQMP follows QEMU's MEMORY_DEVICE_SIZE_CHANGE, reading the
plugged size again only after an event (an event that comes while it reads has the
next read made too), and no connection keeps events nobody listens for. QEMU's side
is a stand-in here (its QMP socket is not needed: the events go to the listener as
QEMU's dispatch would put them); the real device is tests/qemu/test_virtio_mem_vm.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.message import Message

from balloonist.errors import TransientBackendError
from balloonist.qemu.qmp import BalloonQMP
from balloonist.qemu.virtio_mem import VMEM_ID, VMEM_QOM_PATH, VirtioMemQMP
from balloonist.units import MIB

BOOT = 256 * MIB


class _Qemu:
    """The device: its plugged size, and the event each change sends."""

    def __init__(self, vm: VirtioMemQMP) -> None:
        self.vm = vm
        self.plugged = 0
        self.during_read: int | None = None  # a change that lands while a read runs
        self.fail_next = False

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert (command, arguments) == ("qom-get", {"path": VMEM_QOM_PATH, "property": "size"})
        if self.fail_next:
            self.fail_next = False
            raise TransientBackendError("vm: QMP qom-get timed out")
        size = self.plugged
        if self.during_read is not None:
            await self.change(self.during_read)
            self.during_read = None
        return size

    async def change(
        self, plugged: int, *, path: str = VMEM_QOM_PATH, device: str = VMEM_ID
    ) -> None:
        if path == VMEM_QOM_PATH:
            self.plugged = plugged
        data = {"id": device, "size": plugged, "qom-path": path}
        await self.vm._sizes.put(Message({"event": "MEMORY_DEVICE_SIZE_CHANGE", "data": data}))


def test_the_size_is_read_again_only_after_qemu_says_it_changed() -> None:
    async def run() -> None:
        vm = VirtioMemQMP(Path("/nonexistent"), name="vm", boot_bytes=BOOT, region_bytes=512 * MIB)
        qemu = _Qemu(vm)
        vm._execute = qemu.execute  # type: ignore[method-assign]
        assert await vm.actual_bytes() == BOOT  # first look: read
        assert await vm.actual_bytes() == BOOT and vm.reads == 1  # no event: not read
        await qemu.change(128 * MIB)
        assert await vm.actual_bytes() == BOOT + 128 * MIB and vm.reads == 2
        assert await vm.actual_bytes() == BOOT + 128 * MIB and vm.reads == 2
        # Another device's event is not ours.
        await qemu.change(64 * MIB, path="/machine/peripheral/other", device="other")
        assert await vm.actual_bytes() == BOOT + 128 * MIB and vm.reads == 2
        # A change while the size is read: the read gave the old size, and its event
        # has the next look read again.
        qemu.during_read = 256 * MIB
        await qemu.change(192 * MIB)
        assert await vm.actual_bytes() == BOOT + 192 * MIB
        assert await vm.actual_bytes() == BOOT + 256 * MIB and vm.reads == 4
        # The listener keeps no history past a look.
        assert not vm._sizes.history
        # A read that fails after an event is made again, though no event follows.
        await qemu.change(320 * MIB)
        qemu.fail_next = True
        with pytest.raises(TransientBackendError):
            await vm.actual_bytes()
        assert await vm.actual_bytes() == BOOT + 320 * MIB

    asyncio.run(run())


def test_a_connection_keeps_no_event_nobody_listens_for() -> None:
    # qemu.qmp's client keeps every event in its default listener for its lifetime;
    # the daemon's connections live for days (measured: 10 BALLOON_CHANGE events kept
    # per VM in a 75 s run).
    qmp = BalloonQMP(Path("/nonexistent"), name="vm")
    change = Message({"event": "BALLOON_CHANGE", "data": {"actual": BOOT}})
    assert not qmp._client.events.accept(change)
