"""How much memory this process holds, as the benchmarks measure it (Linux)."""

from __future__ import annotations


def resident_mib(field: str = "VmRSS") -> float:
    """A line of /proc/self/status in MiB: "VmRSS", the resident set now, or "VmHWM", its peak.

    Not getrusage's ru_maxrss: exec keeps the peak of the process that forked, so a benchmark's
    subprocess would start from its parent's peak.
    """
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024  # given in kB
