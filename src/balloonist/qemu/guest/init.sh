#!/bin/busybox sh
# init of balloonist's test and demo guests (busybox initramfs).
# Kernel command line:
#   balloonist.work=SCHEDULE (see touchmem.c), balloonist.grow=MIB_PER_S
#   balloonist.root=9p    the root becomes the host's filesystem, read-only over virtio-9p
#                         (tag hostroot), with fresh proc, sys, dev and tmpfs /tmp, /run
#   balloonist.run=/PATH  9p root only: run this program once booted, with one argument per
#   balloonist.arg=VALUE  balloonist.arg (in order); its output goes to the console, then
#                         "BALLOONIST-RUN-EXIT <status>". Values are never evaluated by sh.
#   balloonist.noballoon  do not load the balloon driver: a guest whose balloon never moves
# With balloonist.root=9p this script runs twice: as /init in the initramfs (stage 1),
# which mounts the share and switch_roots to a copy of itself in /run/balloonist
# (stage 2, argument --stage2), so that busybox and touchmem survive the switch.
if [ "$1" = "--stage2" ]; then
    BIN=/run/balloonist/bin
    /run/balloonist/busybox --install -s "$BIN"
    export PATH="$BIN"
else
    BIN=/bin
    /bin/busybox --install -s /bin
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
fi

work=""
grow=0
root=""
noballoon=""
run=""
set --
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        balloonist.work=*) work="${arg#*=}" ;;
        balloonist.grow=*) grow="${arg#*=}" ;;
        balloonist.root=*) root="${arg#*=}" ;;
        balloonist.run=*) run="${arg#*=}" ;;
        balloonist.arg=*) set -- "$@" "${arg#*=}" ;;
        balloonist.noballoon) noballoon=1 ;;
    esac
done

if [ "$BIN" = /bin ]; then
    # Order matters: each module needs the ones before it.
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
             virtio_balloon virtio_console virtio_mem; do
        if [ "$m" = virtio_balloon ] && [ -n "$noballoon" ]; then continue; fi
        insmod "/lib/modules/$m.ko" || echo "BALLOONIST-ERROR insmod $m"
    done
    if [ "$root" = 9p ]; then
        for m in netfs fscache 9pnet 9pnet_virtio 9p; do
            insmod "/lib/modules/$m.ko" || echo "BALLOONIST-ERROR insmod $m"
        done
        # msize: 9pnet_virtio's largest message (125 pages); the default 8 KiB makes
        # every read many round trips. cache=loose: the host's files do not change
        # under a short-lived test guest, and Python starts several times faster.
        mkdir -p /newroot
        if mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose \
                hostroot /newroot; then
            mount -t proc proc /newroot/proc
            mount -t sysfs sysfs /newroot/sys
            mount -t devtmpfs devtmpfs /newroot/dev
            mkdir -p /newroot/dev/shm /newroot/dev/pts
            mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
            mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
            mount -t tmpfs -o mode=755 tmpfs /newroot/run
            mkdir -p /newroot/run/balloonist/bin
            cp /bin/busybox /init /newroot/run/balloonist/
            cp /bin/touchmem /newroot/run/balloonist/bin/
            exec switch_root /newroot /run/balloonist/busybox sh /run/balloonist/init --stage2
        fi
        echo "BALLOONIST-ERROR mount 9p root; staying in the initramfs"
    fi
fi

# virtio-serial ports appear a moment after the driver binds (the host announces them);
# without udev, make the /dev/virtio-ports/NAME links ourselves. Bounded wait, and only
# when the VM has a virtio-serial device at all.
if ls /sys/bus/virtio/drivers/virtio_console/ 2>/dev/null | grep -q '^virtio'; then
    tries=0
    while [ "$tries" -lt 50 ] && [ -z "$(cat /sys/class/virtio-ports/*/name 2>/dev/null)" ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    mkdir -p /dev/virtio-ports
    for port in /sys/class/virtio-ports/*; do
        [ -e "$port/name" ] || continue
        name="$(cat "$port/name")"
        [ -n "$name" ] || continue
        ln -sf "../${port##*/}" "/dev/virtio-ports/$name"
        echo "BALLOONIST-PORT ${port##*/} $name"
    done
fi

echo "BALLOONIST-READY"
if [ -n "$work" ]; then
    "$BIN/touchmem" "$work" "$grow" &
fi
if [ -n "$run" ] && [ "$BIN" != /bin ]; then
    case "$run" in
        /*)
            (
                cd /
                env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                    HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
                    "$run" "$@" </dev/null
                echo "BALLOONIST-RUN-EXIT $?"
            ) &
            ;;
        *) echo "BALLOONIST-ERROR balloonist.run must be an absolute path" ;;
    esac
elif [ -n "$run" ]; then
    echo "BALLOONIST-ERROR balloonist.run needs balloonist.root=9p"
fi
while true; do
    echo "BALLOONIST-MEM $(awk '/^(MemTotal|MemFree|MemAvailable):/ {printf "%s%s ", $1, $2}' /proc/meminfo)"
    sleep 1
done
