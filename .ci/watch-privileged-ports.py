#!/usr/bin/env python3
"""Watches for TCP listeners on privileged ports (below 1024) while the test suite runs.

Started before the suite with the listeners already present as the baseline; polls
/proc/net/tcp and /proc/net/tcp6 every 0.2 s until it gets SIGTERM, then prints every new
privileged listener it saw (one per line) and exits 1 if there was any.
"""

import signal
import sys
import time

LISTEN = "0A"


def privileged_listeners():
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != LISTEN:
                continue
            address, port = fields[1].rsplit(":", 1)
            port = int(port, 16)
            if port < 1024:
                found.add(f"{table.rsplit('/', 1)[1]} port {port}")
    return found


def main():
    baseline = privileged_listeners()
    seen = set()
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stop:
        seen |= privileged_listeners() - baseline
        time.sleep(0.2)
    for listener in sorted(seen):
        print(listener)
    return 1 if seen else 0


if __name__ == "__main__":
    sys.exit(main())
