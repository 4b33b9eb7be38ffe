"""Real QEMU/KVM guests: guest assets, the QMP adapter and the VM launcher."""
