#!/bin/busybox sh
# init of balloonist's test and demo guests (busybox initramfs).
# Kernel command line: balloonist.work=SCHEDULE (see touchmem.c), balloonist.grow=MIB_PER_S.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Order matters: each module needs the ones before it.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         virtio_balloon virtio_console; do
    insmod "/lib/modules/$m.ko" || echo "BALLOONIST-ERROR insmod $m"
done
work=""
grow=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        balloonist.work=*) work="${arg#*=}" ;;
        balloonist.grow=*) grow="${arg#*=}" ;;
    esac
done
echo "BALLOONIST-READY"
if [ -n "$work" ]; then
    /bin/touchmem "$work" "$grow" &
fi
while true; do
    echo "BALLOONIST-MEM $(awk '/^(MemTotal|MemFree|MemAvailable):/ {printf "%s%s ", $1, $2}' /proc/meminfo)"
    sleep 1
done
