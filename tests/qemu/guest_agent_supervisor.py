"""Runs inside a test guest (the host's root over 9p), stdlib only: starts the balloon
agent and obeys commands the test drops as files into a host directory, which the
guest sees through the 9p share.

Commands are files named ``<n>-<verb>[-<arg>]``, obeyed once each, in order of n:

- ``kill``: SIGKILL the agent (as the OOM killer or a crash would);
- ``term``: SIGTERM the agent (as ``systemctl stop`` would) and wait for it to exit;
- ``start``: start the agent again;
- ``hog-<MiB>``: start a process that writes MiB of anonymous memory at 32 MiB/s, holds
  it 5 s and exits 0 (a process the guest's OOM killer would end with -9);
- ``work-<N>``: start N processes that keep a CPU busy counting, each printing once a
  second ``SUPERVISOR work id=I n=COUNT cpu=CPU online=LIST``: its count so far, the
  CPU it last ran on, and the guest's ``/sys/devices/system/cpu/online``.

Everything it does is printed on the console as ``SUPERVISOR ...`` lines.

Usage: python3 guest_agent_supervisor.py AGENT_PYZ CONTROL_DIR [agent args...]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

HOG = """
import sys, time
mib = int(sys.argv[1])
chunks = []
for _ in range(mib):
    chunk = bytearray(1 << 20)
    for i in range(0, 1 << 20, 4096):
        chunk[i] = 1
    chunks.append(chunk)
    time.sleep(1 / 32)
print(f"SUPERVISOR hog holds {mib} MiB", flush=True)
time.sleep(5)
"""


WORK = """
import sys, time
me, count, next_s = sys.argv[1], 0, time.monotonic() + 1.0
while True:
    count += 1
    if count % 10000 == 0 and time.monotonic() >= next_s:
        with open("/proc/self/stat") as f:
            cpu = f.read().rsplit(")", 1)[1].split()[36]  # field 39: processor
        with open("/sys/devices/system/cpu/online") as f:
            online = f.read().strip()
        print(f"SUPERVISOR work id={me} n={count} cpu={cpu} online={online}", flush=True)
        next_s = time.monotonic() + 1.0
"""


def say(text: str) -> None:
    print(f"SUPERVISOR {text}", flush=True)


def main(argv: list[str]) -> int:
    pyz, control, agent_args = argv[1], argv[2], argv[3:]

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, pyz, *agent_args])
        say(f"agent started pid={process.pid}")
        return process

    agent: subprocess.Popen[bytes] | None = start()
    hogs: list[subprocess.Popen[bytes]] = []
    done: set[str] = set()
    while True:
        try:
            names = os.listdir(control)
        except OSError:
            names = []
        for name in sorted((n for n in names if n not in done), key=lambda n: int(n.split("-")[0])):
            done.add(name)
            verb = name.split("-")[1:]
            if verb == ["kill"] and agent is not None:
                agent.send_signal(signal.SIGKILL)
                say(f"agent killed rc={agent.wait()}")
                agent = None
            elif verb == ["term"] and agent is not None:
                agent.send_signal(signal.SIGTERM)
                say(f"agent exited rc={agent.wait()}")
                agent = None
            elif verb == ["start"] and agent is None:
                agent = start()
            elif verb[:1] == ["work"]:
                for i in range(int(verb[1])):
                    hogs.append(subprocess.Popen([sys.executable, "-c", WORK, str(i)]))
                say(f"work started {verb[1]}")
            elif verb[:1] == ["hog"]:
                hogs.append(subprocess.Popen([sys.executable, "-c", HOG, verb[1]]))
                say(f"hog started {verb[1]} MiB")
        if agent is not None and agent.poll() is not None:
            say(f"agent exited rc={agent.returncode}")
            agent = None
        for hog in [h for h in hogs if h.poll() is not None]:
            say(f"hog exited rc={hog.returncode}")
            hogs.remove(hog)
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
