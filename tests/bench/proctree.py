"""Runs a command in a fresh process and measures its wall time and peak memory (benchmark helper).

Peak memory is measured two ways:

- ``peak_tree_rss_mb``: the largest sum of the resident sets of the process and all its
  descendants (Beam worker processes included), sampled with psutil every ``interval_s``. A sum of
  RSS counts pages shared between processes (libraries) once per process, so it errs high; a spike
  shorter than the interval can be missed.
- ``peak_process_rss_mb``: the largest resident set any single process of the tree reached, from
  the kernel (``wait4``: the process's own peak and that of every descendant it waited for), exact.

CPU time is reported for the process tree (``tree_cpu_s``, from the kernel) and for everything
else on the machine over the same interval (``other_cpu_s``: busy CPU time of the whole machine
minus the tree's), which shows how much of the machine other work took during a run.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

import psutil


def _tree_rss_bytes(root: psutil.Process) -> tuple[int, int]:
    """``(sum of RSS, number of processes)`` of ``root`` and its descendants now."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    alive = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
            alive += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total, alive


def _kill_tree(root: psutil.Process) -> None:
    try:
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


def _busy_cpu_s() -> float:
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq", "steal"))


def wait_for_quiet(max_busy_cores: float, *, timeout_s: float = 600, sample_s: float = 2.0) -> float:
    """Waits until the whole machine's busy CPU over ``sample_s`` is below ``max_busy_cores``.

    On a shared machine a run that starts while other work holds a core measures that work too.
    Gives up after ``timeout_s`` (the run then goes ahead; its ``other_cpu_s`` shows the load).

    Returns:
        Seconds waited.
    """
    started = time.perf_counter()
    while True:
        before = _busy_cpu_s()
        time.sleep(sample_s)
        busy_cores = (_busy_cpu_s() - before) / sample_s
        waited = time.perf_counter() - started
        if busy_cores < max_busy_cores or waited >= timeout_s:
            return waited


def run_measured(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    interval_s: float = 0.05,
    timeout_s: float = 3600,
) -> dict:
    """Runs ``command`` to completion; returns its exit code, output and figures.

    Returns:
        ``{"returncode", "stdout", "stderr", "process_wall_s", "peak_tree_rss_mb",
        "peak_process_rss_mb", "max_processes", "tree_cpu_s", "other_cpu_s"}``.

    Raises:
        TimeoutError: when the command runs longer than ``timeout_s`` (it is killed).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy_before = _busy_cpu_s()
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env)
        root = psutil.Process(proc.pid)
        peak_tree = 0
        max_procs = 0
        while True:
            # wait4 reaps the process and returns its rusage; a live process answers pid 0.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, n = _tree_rss_bytes(root)
            peak_tree = max(peak_tree, rss)
            max_procs = max(max_procs, n)
            if time.perf_counter() - start > timeout_s:
                _kill_tree(root)
                proc.wait()
                raise TimeoutError(f"{command} ran longer than {timeout_s} s")
            time.sleep(interval_s)
        wall_s = time.perf_counter() - start
        tree_cpu_s = usage.ru_utime + usage.ru_stime
        other_cpu_s = max(0.0, _busy_cpu_s() - busy_before - tree_cpu_s)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "returncode": proc.returncode,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
            "process_wall_s": wall_s,
            "peak_tree_rss_mb": peak_tree / 2**20,
            "peak_process_rss_mb": usage.ru_maxrss / 1024,
            "max_processes": max_procs,
            "tree_cpu_s": tree_cpu_s,
            "other_cpu_s": other_cpu_s,
        }


def result_line(stdout: str, prefix: str = "RESULT ") -> str:
    """The payload of the last line of ``stdout`` that starts with ``prefix``."""
    lines = [x for x in stdout.splitlines() if x.startswith(prefix)]
    if not lines:
        raise RuntimeError(f"no {prefix.strip()} line in the output:\n{stdout[-2000:]}")
    return lines[-1][len(prefix) :]


def git_state(root) -> dict:
    """The commit, the changed files and a digest of the uncommitted changes of the measured tree
    (read-only git calls), so that numbers can be tied to the code that produced them."""
    import hashlib

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "head": git("rev-parse", "HEAD").strip(),
        "changed": git("status", "--porcelain").splitlines(),
        "diff_sha256": hashlib.sha256(git("diff", "HEAD").encode()).hexdigest(),
    }
