"""Runs inside a test guest (the host's root over 9p; see test_agent_vm.py), stdlib only.

Does by hand what the balloon agent does, so the host's reclaim path can be tested
without the agent:

1. maps MIB of anonymous memory, without transparent huge pages, and mlocks it (which
   faults every page in); mlocked pages are not migrated once
   ``vm.compact_unevictable_allowed`` is 0, so their frames stay put;
2. reads each page's frame number (PFN) from /proc/self/pagemap and fills the page with
   the agent's mark: the token (8 bytes), the PFN (8 bytes LE), then the token repeated
   to the end of the 4096 bytes (``page_mark``, the same as the agent's and the host's;
   a host test checks);
3. writes one JSON line ``{"token": HEX, "ranges": [[start, count], ...]}`` to the
   virtio-serial port /dev/virtio-ports/PORT_NAME;
4. waits for a line back from the host (sent after it punched), counts the pages that
   now read as all zeros, prints ``GUEST-LOCK zeroed=N of=M``, and holds the memory
   until the VM stops.

Usage: python3 guest_lock_pages.py MIB TOKEN_HEX PORT_NAME
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
import sys
import time

PAGE_BYTES = 4096
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63


def page_mark(token: bytes, pfn: int) -> bytes:
    """All of page ``pfn`` while the agent holds it: token, PFN (8 bytes LE), token * 510."""
    if len(token) != 8:
        raise ValueError(f"a token is 8 bytes, got {len(token)}")
    return token + pfn.to_bytes(8, "little") + token * (PAGE_BYTES // 8 - 2)


def main(argv: list[str]) -> int:
    mib, token_hex, port_name = int(argv[1]), argv[2], argv[3]
    token = bytes.fromhex(token_hex)
    count = mib * 1024 * 1024 // PAGE_BYTES
    try:
        with open("/proc/sys/vm/compact_unevictable_allowed", "w") as fh:
            fh.write("0\n")
    except OSError as exc:
        print(f"GUEST-LOCK warning: compaction may move pages: {exc}", flush=True)
    memory = mmap.mmap(-1, count * PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_NOHUGEPAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(count * PAGE_BYTES)) != 0:
        print(f"GUEST-LOCK error: mlock: errno {ctypes.get_errno()}", flush=True)
        return 1
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(address // PAGE_BYTES * 8)
        entries = struct.unpack(f"<{count}Q", fh.read(count * 8))
    if not all(entry & PRESENT and entry & PFN_MASK for entry in entries):
        print("GUEST-LOCK error: pagemap shows pages missing (or no PFNs: not root?)", flush=True)
        return 1
    pfns = [entry & PFN_MASK for entry in entries]
    for i, pfn in enumerate(pfns):
        memory[i * PAGE_BYTES : (i + 1) * PAGE_BYTES] = page_mark(token, pfn)
    ranges: list[list[int]] = []
    for pfn in sorted(pfns):
        if ranges and ranges[-1][0] + ranges[-1][1] == pfn:
            ranges[-1][1] += 1
        else:
            ranges.append([pfn, 1])
    print(f"GUEST-LOCK locked={count} ranges={len(ranges)}", flush=True)
    with open(f"/dev/virtio-ports/{port_name}", "r+b", buffering=0) as port:
        port.write(json.dumps({"token": token_hex, "ranges": ranges}).encode() + b"\n")
        port.readline()
    zero_page = bytes(PAGE_BYTES)
    zeroed = sum(
        1 for i in range(count) if memory[i * PAGE_BYTES : (i + 1) * PAGE_BYTES] == zero_page
    )
    print(f"GUEST-LOCK zeroed={zeroed} of={count}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
