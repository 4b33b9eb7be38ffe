#!/bin/sh
# Runs in a host-root test guest: fills $1 MiB of the guest's tmpfs with one repeated
# byte, so every filled page is like every other, in this guest and the next (KSM can
# merge them all); says so on the console, then keeps the memory.
dd if=/dev/zero bs=1M count="$1" 2>/dev/null | tr '\0' 'b' > /dev/shm/fill
echo "BALLOONIST-FILLED $1"
exec sleep 1000000
