"""Shared helpers for the benchmarks: machine description, peak memory, result files.

Benchmarks are scripts, not tests: run them by hand (`python benchmarks/bench_matrix.py`); they
write `benchmarks/results/<name>.json` and `<name>.md`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def machine() -> dict[str, Any]:
    """Where the numbers come from: platform, CPU, cores, RAM, GPU and library versions."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(_total_ram() / 2**30, 1),
        "load_average": list(os.getloadavg()),
        # the CPU kernels torch dispatches to (ATEN_CPU_CAPABILITY can lower it): trained toy models depend on it
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    versions = {}
    for name in ("torch", "transformers", "accelerate", "safetensors", "peft", "irr_callback"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    info["versions"] = versions
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        if changed:  # the run's code is that commit plus uncommitted changes
            info["git_commit"] += "+changes"
    except Exception:
        info["git_commit"] = None
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="utf-8") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so later peaks are measured from now."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_anon_bytes() -> int:
    """Anonymous resident memory (heap, tensors): excludes clean file-backed pages such as the
    read-only memory maps of safetensors files, which the kernel can drop under pressure."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class AnonPeak:
    """Samples RssAnon every few milliseconds in a thread (the kernel keeps no peak for it)."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval, self.peak, self._stop = interval, rss_anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best wall time over `repeat` runs and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run_worker(script: str, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run `python script args` in a fresh process (clean peak memory); it prints one JSON line last."""
    cmd = [sys.executable, script, *args]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT},
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({shlex.join(cmd)}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_results(name: str, payload: dict[str, Any], markdown: str) -> tuple[str, str]:
    """Write results/<name>.json (with command, machine and date) and results/<name>.md."""
    os.makedirs(RESULTS, exist_ok=True)
    payload = {
        "benchmark": name,
        "command": "python " + shlex.join(sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    json_path = os.path.join(RESULTS, f"{name}.json")
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2)
    m = payload["machine"]
    header = (
        f"# {name}\n\n`{payload['command']}`  \n{payload['date']} · {m['platform']} · {m['cpu']} · "
        f"{m['cores']} cores · {m['ram_gb']} GB RAM{' · ' + m['gpu'] if 'gpu' in m else ''} · "
        f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}\n\n"
    )
    md_path = os.path.join(RESULTS, f"{name}.md")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(header + markdown.rstrip() + "\n")
    return json_path, md_path


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
