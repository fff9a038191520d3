#!/usr/bin/env python3
"""Peak memory of a process tree, sampled from /proc (Linux only, stdlib only).

As a module:

    sampler = TreeSampler([root_pid], include_roots=False)
    sampler.start()
    ...                      # run the workload
    summary = sampler.stop() # dict: peak_rss_sum_mb, peak_pss_sum_mb, ...

As a command (runs CMD, samples CMD and all of its descendants, writes a
JSON summary, exits with CMD's status):

    python3 bench/procmem.py [--interval 0.1] [--json FILE] -- CMD ARGS...

Every `interval` seconds the sampler lists /proc, finds every descendant of
the roots (through the parent pid; a process once seen stays tracked after its
parent exits and it is re-parented), and sums their resident set sizes
(/proc/PID/statm). The peak of that sum over the run is `peak_rss_sum_mb`.
RSS counts shared pages (libraries, copy-on-write pages) once per process, so
the sum over-counts what the tree really uses; `peak_pss_sum_mb` is the peak
of the summed proportional set sizes (/proc/PID/smaps_rollup), which splits
shared pages among the processes that map them. PSS is read less often
(`pss_interval`, default 0.5 s) because smaps_rollup is costlier to read.
`cpu_s` sums the user + system CPU time of every tracked process (as last
sampled), a measure less sensitive than wall time to other load on a shared
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii", "replace")
    except OSError:
        return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, str, int, int, str] | None:
    """(ppid, name, utime + stime in clock ticks, start time in clock ticks,
    state) from /proc/PID/stat."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # comm is in parentheses and may contain spaces or parentheses.
    lpar, rpar = stat.find("("), stat.rfind(")")
    name = stat[lpar + 1 : rpar]
    rest = stat[rpar + 2 :].split()
    try:
        # rest[0] = state (field 3), rest[1] = ppid, rest[11:13] = utime,
        # stime, rest[19] = starttime (field 22)
        return int(rest[1]), name, int(rest[11]) + int(rest[12]), int(rest[19]), rest[0]
    except (IndexError, ValueError):
        return None


def rss_bytes(pid: int) -> int:
    statm = _read(f"/proc/{pid}/statm")
    if not statm:
        return 0
    try:
        return int(statm.split()[1]) * PAGE
    except (IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    text = _read(f"/proc/{pid}/smaps_rollup")
    if not text:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return 0
    return 0


def cmdline(pid: int) -> str:
    raw = _read(f"/proc/{pid}/cmdline")
    return raw.replace("\0", " ").strip() if raw else ""


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


class TreeSampler:
    """Samples the summed RSS (and PSS) of the descendants of `roots`."""

    def __init__(
        self,
        roots: list[int],
        interval: float = 0.1,
        include_roots: bool = True,
        pss_interval: float | None = 0.5,
    ) -> None:
        self.roots = set(roots)
        self.interval = interval
        self.include_roots = include_roots
        self.pss_interval = pss_interval
        self.known: set[int] = set(roots) if include_roots else set()
        self.names: dict[int, str] = {}
        self.cmds: dict[int, str] = {}
        self.peak_rss: dict[int, int] = {}
        self.peak_rss_sum = 0
        self.peak_rss_sum_at = 0.0
        self.peak_rss_procs = 0
        self.peak_pss_sum = 0
        self.max_procs = 0
        self.samples = 0
        self.series: list[tuple[float, int]] = []
        self.cpu_ticks: dict[int, int] = {}
        self.starts: dict[int, int] = {}
        self._states: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.monotonic()
        self._last_pss = -1e9

    def _tree(self) -> set[int]:
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        states: dict[int, str] = {}
        for pid in all_pids():
            info = _stat(pid)
            if info is None:
                continue
            if pid in self.known and self.starts.get(pid, info[3]) != info[3]:
                continue  # a new process that reuses a tracked, dead pid
            parents[pid] = info[0]
            ticks[pid] = info[2]
            states[pid] = info[4]
            self.starts.setdefault(pid, info[3])
            if pid not in self.names:
                self.names[pid] = info[1]
        self._states = states
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        alive = set(parents)
        frontier = [r for r in self.roots if r in alive]
        found = set(frontier) if self.include_roots else set()
        # Previously seen processes stay tracked even when re-parented.
        frontier += [p for p in self.known if p in alive]
        found |= {p for p in self.known if p in alive}
        seen = set(frontier)
        while frontier:
            pid = frontier.pop()
            for child in children.get(pid, ()):
                if child not in seen:
                    seen.add(child)
                    found.add(child)
                    frontier.append(child)
        if not self.include_roots:
            found -= self.roots
        for pid in found - self.known:
            self.cmds[pid] = cmdline(pid)[:200]
        self.known |= found
        for pid in found:
            self.cpu_ticks[pid] = ticks.get(pid, self.cpu_ticks.get(pid, 0))
        return found

    def alive(self) -> set[int]:
        """The tracked processes alive now (zombies excluded; a pid reused by
        an unrelated process is not reported)."""
        with self._lock:
            pids = self._tree()
            return {p for p in pids if self._states.get(p, "Z") != "Z"}

    def terminate_all(self, grace: float = 10.0) -> None:
        """SIGTERM every tracked live process (except this one), then SIGKILL
        what is left after `grace` seconds. Detached descendants (Flower's
        SuperExec processes) are included."""
        me = os.getpid()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            live = self.alive() - {me}
            for pid in live:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + wait
            while live and time.monotonic() < deadline:
                time.sleep(0.2)
                live = self.alive() - {me}
            if not live:
                return

    def sample(self) -> None:
        with self._lock:
            pids = self._tree()
        total = 0
        for pid in pids:
            r = rss_bytes(pid)
            total += r
            if r > self.peak_rss.get(pid, 0):
                self.peak_rss[pid] = r
        now = time.monotonic() - self._t0
        self.samples += 1
        self.max_procs = max(self.max_procs, len(pids))
        self.series.append((round(now, 2), total))
        if total > self.peak_rss_sum:
            self.peak_rss_sum = total
            self.peak_rss_sum_at = now
            self.peak_rss_procs = len(pids)
        if self.pss_interval is not None and now - self._last_pss >= self.pss_interval:
            self._last_pss = now
            pss = sum(pss_bytes(pid) for pid in pids)
            self.peak_pss_sum = max(self.peak_pss_sum, pss)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> "TreeSampler":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.summary()

    def summary(self) -> dict:
        top = sorted(self.peak_rss.items(), key=lambda kv: -kv[1])
        return {
            "peak_rss_sum_mb": round(self.peak_rss_sum / MB, 1),
            "peak_rss_sum_at_s": round(self.peak_rss_sum_at, 2),
            "processes_at_peak": self.peak_rss_procs,
            "peak_pss_sum_mb": round(self.peak_pss_sum / MB, 1),
            # utime + stime of every tracked process as last sampled (misses
            # at most the last `interval` of each process's life).
            "cpu_s": round(sum(self.cpu_ticks.values()) / CLK_TCK, 2),
            "max_processes": self.max_procs,
            "processes_seen": len(self.known),
            "samples": self.samples,
            "interval_s": self.interval,
            "per_process_peak_rss_mb": [
                {
                    "pid": pid,
                    "name": self.names.get(pid, "?"),
                    "cmd": self.cmds.get(pid, ""),
                    "peak_rss_mb": round(rss / MB, 1),
                }
                for pid, rss in top
            ],
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Run a command and report the peak summed RSS of its process tree."
    )
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--pss-interval", type=float, default=0.5)
    parser.add_argument("--json", help="write the summary here (default: stderr)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    sampler = TreeSampler([proc.pid], interval=args.interval, pss_interval=args.pss_interval)
    sampler.start()

    def forward(signum, _frame):
        proc.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    rc = proc.wait()
    wall = time.monotonic() - t0
    summary = sampler.stop()
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = {
        "wall_s": round(wall, 3),
        "returncode": rc,
        "cmd": cmd,
        # Exact CPU time of the reaped process tree (each parent waited for
        # its children), next to the sampled `cpu_s`.
        "cpu_s_rusage": round(ru.ru_utime + ru.ru_stime, 2),
        **summary,
    }
    text = json.dumps(summary, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text, file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
