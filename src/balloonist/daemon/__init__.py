"""The host daemon: the scheduler over real QEMU guests."""
