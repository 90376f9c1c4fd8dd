"""Runs a command and prints its own peak resident memory: `MAXRSS_KIB N` (wait4's rusage), then
exits with the command's status.

A lean parent (stdlib only; start it with `python -S`) for the benchmarks' measured processes: a
child forked straight from a benchmark that imported torch would start with its ~1 GB resident,
and ru_maxrss counts that.

Usage (from the repository root): python -S -m scripts.bench.peak_rss COMMAND [ARG...]
"""
import os
import subprocess
import sys


def main() -> None:
    p = subprocess.Popen(sys.argv[1:])
    _, status, usage = os.wait4(p.pid, 0)
    print("MAXRSS_KIB", usage.ru_maxrss)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
