"""Run ``python -m MODULE ARGS…`` under cProfile timed by the main thread's CPU time.

``python -m cProfile`` times by the wall clock, so a build's profile is mostly the
event loop waiting in ``epoll`` and ``fsync`` waiting for the disk, and on a shared
machine every function is inflated by the time it was not scheduled. Timed by
``time.thread_time``, the profile says where the CPU of the thread it profiles (the
main one, which runs the event loop) goes; other threads (gRPC's core, the Kafka
client's heartbeat, the store's writer) are in the process's CPU, not in its profile.
Each timer read is a system call, which slows the process down: a profiled run's
figures are not comparable with the others.

Usage::

    python bench/cpu_profile.py OUT.prof unsafechain.cli build --config build.yaml
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: cpu_profile.py OUT.prof MODULE [ARGS…]")
    output, module, *arguments = sys.argv[1:]
    sys.argv = [module, *arguments]
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        # Written on SystemExit too: the commands end that way, SIGTERM included.
        profiler.disable()
        profiler.dump_stats(output)


if __name__ == "__main__":
    main()
