"""What every benchmark shares: processes, CPU and memory ledgers, quiet checks.

The method (bench/README.md) in code:

- every part runs as its own process (:class:`Proc`), so each one's CPU is
  measured on its own and a saturated load generator is not mistaken for a
  slow server;
- :class:`Ledger` measures, over a run's window, the CPU of each role (the
  server, the load generators, PostgreSQL's backends serving *our*
  connections, Redis) and of everything else on the machine ("foreign"):
  a run during which foreign processes used more than
  :data:`FOREIGN_LIMIT_CORES` shared the machine and is discarded;
- :func:`wait_until_quiet` waits, polling every minute for up to half an
  hour, until nothing else uses the CPU before a measured run starts.

Nothing here is imported by nimu_rt or by its tests.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
NODE_DIR = BENCH_DIR / "node"
RESULTS_DIR = BENCH_DIR / "results"
LOG_DIR = RESULTS_DIR / "logs"

PYTHON = sys.executable
NIMU_RT = str(Path(sys.executable).parent / "nimu-rt")
NODE = shutil.which("node") or "node"

PG_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_PORT = int(os.environ.get("BENCH_REDIS_PORT", "6379"))
# Shared by the server and the load generators that mint tokens for it.
JWT_SECRET = "nimu-rt-benchmark-signing-secret-0123456789"

# A run during which other processes used more CPU than this (in cores,
# averaged over the run) shared the machine: it is discarded.
FOREIGN_LIMIT_CORES = float(os.environ.get("BENCH_FOREIGN_LIMIT_CORES", "0.10"))
_TICKS = os.sysconf("SC_CLK_TCK")


def stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine() -> dict[str, Any]:
    """The machine a result was measured on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node = subprocess.run([NODE, "--version"], capture_output=True, text=True)
    return {
        "cores": psutil.cpu_count(),
        "cpu": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node.stdout.strip(),
    }


# -- processes -------------------------------------------------------------------


class Proc:
    """A process this benchmark started, in a session of its own.

    Its output goes to a log file under bench/results/logs; lines starting
    with ``{"bench":`` are results it reports. :meth:`stop` ends it (and
    only it, with its own children) by its process group id.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        stdin: bool = False,
        cwd: Path = ROOT,
    ) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{stamp()}-{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.ps = psutil.Process(self.pid)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
        """Wait until the output matches ``pattern``; raise if it exits first."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout_s
        while True:
            match = regex.search(self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n"
                    + self.output()[-3000:]
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no {pattern!r} within {timeout_s} s:\n"
                    + self.output()[-3000:]
                )
            time.sleep(0.05)

    def results(self) -> list[dict[str, Any]]:
        """The ``{"bench": ...}`` lines it printed, decoded."""
        found = []
        for line in self.output().splitlines():
            if line.startswith('{"bench":'):
                found.append(json.loads(line))
        return found

    def wait_result(self, kind: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """The first result line whose ``bench`` is ``kind``."""
        deadline = time.monotonic() + timeout_s
        while True:
            for doc in self.results():
                if doc["bench"] == kind:
                    return doc
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} before"
                    f" reporting {kind}:\n" + self.output()[-3000:]
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no {kind} result within {timeout_s} s:\n"
                    + self.output()[-3000:]
                )
            time.sleep(0.05)

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def pids(self) -> set[int]:
        """This process and its children (``uv``-less, so usually one)."""
        try:
            return {self.pid} | {c.pid for c in self.ps.children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM its process group, then SIGKILL after ``timeout_s``."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        self._log.close()


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """A list to put started processes in; all are stopped on the way out."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"could not stop {proc.name}: {exc!r}", file=sys.stderr)


# -- CPU and memory -------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return times.user + times.system


def _busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _our_pg_backends(client_pids: set[int]) -> set[int]:
    """PostgreSQL processes working for ``client_pids``, plus its own helpers.

    Backends are matched to clients by TCP port. The server's background
    processes (WAL writer, checkpointer, ...) count as ours: our writes are
    what keeps them busy during a run.
    """
    ports = set()
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.pid in client_pids and conn.raddr and conn.raddr.port == 5432:
                ports.add(conn.laddr.port)
    ours = set()
    query = (
        "SELECT pid, coalesce(client_port, -1), backend_type FROM pg_stat_activity"
    )
    out = subprocess.run(
        ["psql", PG_URL, "-AtF", "|", "-c", query],
        capture_output=True,
        text=True,
        timeout=10,
    )
    backends = set()
    for line in out.stdout.splitlines():
        pid_s, port_s, kind = line.split("|", 2)
        if kind == "client backend":
            backends.add(int(pid_s))
            if int(port_s) in ports:
                ours.add(int(pid_s))
    for proc in psutil.process_iter(["name", "username"]):
        if proc.info["username"] == "postgres" and proc.pid not in backends:
            ours.add(proc.pid)
    return ours


def redis_pids() -> set[int]:
    return {
        p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "redis-server"
    }


def _all_cpu() -> dict[int, tuple[str, float, bool]]:
    """pid -> (name, CPU seconds, kernel thread) for every process."""
    found = {}
    for proc in psutil.process_iter(["name", "ppid", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        kernel = proc.pid == 2 or proc.info["ppid"] == 2
        found[proc.pid] = (proc.info["name"], times.user + times.system, kernel)
    return found


class Ledger:
    """CPU per role over a window, peak RSS per role, and foreign CPU.

    ``roles`` maps a role name to a callable returning its pids (evaluated
    at the start and end of the window, so pools that grow are followed).
    ``pg_clients`` names the roles whose PostgreSQL backends are counted as
    the role ``postgres``.
    """

    def __init__(
        self,
        roles: dict[str, Callable[[], Iterable[int]]],
        *,
        pg_clients: Iterable[str] = (),
        sample_rss_s: float = 0.2,
    ) -> None:
        self.roles = dict(roles)
        self.pg_clients = list(pg_clients)
        self.sample_rss_s = sample_rss_s
        self._start: dict[str, Any] = {}
        self.peak_rss: dict[str, int] = {}
        self.last_rss: dict[str, int] = {}
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _role_pids(self) -> dict[str, set[int]]:
        pids = {name: set(get()) for name, get in self.roles.items()}
        if self.pg_clients:
            clients = set().union(*(pids[r] for r in self.pg_clients))
            pids["postgres"] = _our_pg_backends(clients)
        return pids

    def _snapshot(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "busy": _busy_s(),
            "pids": self._role_pids(),
            "all": _all_cpu(),
        }

    def start(self) -> None:
        self._start = self._snapshot()
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_rss_s):
            for name, get in self.roles.items():
                total = 0
                for pid in get():
                    with contextlib.suppress(psutil.NoSuchProcess):
                        total += psutil.Process(pid).memory_info().rss
                self.last_rss[name] = total
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), total)

    def stop(self) -> dict[str, Any]:
        """The window's report: cores per role, foreign, kernel, RSS."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        end = self._snapshot()
        start = self._start
        wall = end["t"] - start["t"]
        ours: dict[str, set[int]] = {}
        for name in set(start["pids"]) | set(end["pids"]):
            ours[name] = start["pids"].get(name, set()) | end["pids"].get(name, set())
        owned = set().union(*ours.values()) | {os.getpid()}
        owned |= {c.pid for c in psutil.Process().children(recursive=True)}
        deltas: dict[int, float] = {}
        for pid, (_, cpu, _) in end["all"].items():
            before = start["all"].get(pid)
            deltas[pid] = cpu - (before[1] if before else 0.0)
        cores = {
            name: round(sum(deltas.get(p, 0.0) for p in pids) / wall, 3)
            for name, pids in ours.items()
        }
        foreign = {}
        kernel = 0.0
        for pid, delta in deltas.items():
            name, _, is_kernel = end["all"][pid]
            if pid in owned:
                continue
            if is_kernel:
                kernel += delta
            elif delta > 0:
                foreign[f"{name}[{pid}]"] = delta
        foreign_cores = sum(foreign.values()) / wall
        top = sorted(foreign.items(), key=lambda kv: -kv[1])[:5]
        return {
            "wall_s": round(wall, 3),
            "cores": cores,
            "busy_cores": round((end["busy"] - start["busy"]) / wall, 3),
            "kernel_cores": round(kernel / wall, 3),
            "foreign_cores": round(foreign_cores, 3),
            "foreign_top": {k: round(v / wall, 3) for k, v in top},
            "peak_rss_mib": {
                k: round(v / 2**20, 1) for k, v in self.peak_rss.items()
            },
            "shared": foreign_cores > FOREIGN_LIMIT_CORES,
        }


def foreign_load(sample_s: float = 5.0) -> dict[str, Any]:
    """What other processes use right now, sampled for ``sample_s``."""
    ledger = Ledger({})
    ledger.start()
    time.sleep(sample_s)
    report = ledger.stop()
    report["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    return report


def wait_until_quiet(
    *, max_wait_s: float = 1800.0, poll_s: float = 60.0, enabled: bool = True
) -> dict[str, Any]:
    """Wait until nothing else uses the CPU; return how quiet it was.

    Samples foreign CPU for 5 s; at or below :data:`FOREIGN_LIMIT_CORES` it
    returns at once, else it prints who is busy and tries again every
    ``poll_s`` for up to ``max_wait_s``. If the machine never got quiet it
    returns anyway with ``quiet`` false, and the caller says so. With
    ``enabled`` false (smoke runs) it samples once and returns.
    """
    waited = 0.0
    while True:
        report = foreign_load()
        quiet = report["foreign_cores"] <= FOREIGN_LIMIT_CORES
        summary = {
            "quiet": quiet,
            "foreign_cores": report["foreign_cores"],
            "foreign_top": report["foreign_top"],
            "loadavg": report["loadavg"],
            "waited_s": waited,
        }
        if quiet or not enabled:
            return summary
        if waited >= max_wait_s:
            print(
                f"the machine stayed busy for {max_wait_s:.0f} s; running anyway",
                file=sys.stderr,
                flush=True,
            )
            return summary
        print(
            f"machine busy ({report['foreign_cores']} cores foreign:"
            f" {report['foreign_top']}, load {report['loadavg']});"
            f" waiting {poll_s:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(poll_s)
        waited += poll_s


def measured(
    run: Callable[[], dict[str, Any]],
    *,
    quiet: bool,
    attempts: int = 3,
) -> dict[str, Any]:
    """Run ``run`` on a quiet machine; repeat it when it shared the machine.

    ``run`` returns a result with a ``ledgers`` list (one report per side
    measured); if any says ``shared``, the run is discarded and tried again
    once the machine is quiet, up to ``attempts`` times. When every attempt
    shared the machine, the one that shared it least is kept with
    ``shared`` true, for the report to say so. Smoke runs (``quiet``
    false) run once whatever the load.
    """
    discarded: list[Any] = []
    least: dict[str, Any] | None = None
    for _ in range(attempts if quiet else 1):
        before = wait_until_quiet(enabled=quiet)
        result = run()
        result["quiet_before"] = before
        foreign = max((led["foreign_cores"] for led in result["ledgers"]), default=0)
        result["foreign_cores_max"] = foreign
        shared = any(led.get("shared") for led in result["ledgers"])
        result["shared"] = shared
        if not shared or not quiet:
            result["discarded_runs"] = discarded
            return result
        print(
            f"run shared the machine ({foreign} cores foreign); discarding it",
            file=sys.stderr,
            flush=True,
        )
        tops = [led["foreign_top"] for led in result["ledgers"] if led.get("shared")]
        if least is None or foreign < least["foreign_cores_max"]:
            if least is not None:
                discarded.append(least["_tops"])
            least = result
            least["_tops"] = tops
        else:
            discarded.append(tops)
    assert least is not None
    del least["_tops"]
    least["discarded_runs"] = discarded
    print("every attempt shared the machine; keeping the quietest", file=sys.stderr)
    return least


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the started processes are stopped."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


# -- reporting --------------------------------------------------------------------


def save(name: str, doc: dict[str, Any]) -> Path:
    """Write a result document to bench/results/<name>-<time>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{stamp()}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path


def ratio(nimu: float | None, baseline: float | None) -> str:
    if not nimu or not baseline:
        return "-"
    return f"{nimu / baseline:.2f}x"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
        for i, h in enumerate(headers)
    ]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for row in cells:
        lines.append(
            "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
        )
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def nimu_env(schema: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a ``nimu-rt serve`` on PostgreSQL in its own schema."""
    env = {
        "NIMU_DATABASE_URL": PG_URL,
        "NIMU_DATABASE_SCHEMA_NAME": schema,
        "NIMU_DATABASE_AUTO_MIGRATE": "true",
        "NIMU_AUTH_JWT_SECRET": JWT_SECRET,
        "NIMU_SERVER_DATA_DIR": str(data_dir),
        "NIMU_LOGGING_LEVEL": "INFO",
        # The load comes from a few users at hundreds of writes per second
        # from one address: the default buckets would answer 429 to most of
        # it. The baselines limit nothing either.
        "NIMU_SECURITY_RATE_LIMITS": "false",
    }
    env.update(extra)
    return env


def drop_schema(schema: str) -> None:
    subprocess.run(
        ["psql", PG_URL, "-qc", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'],
        capture_output=True,
        timeout=60,
        check=False,
    )


def new_schema() -> str:
    return f"bench_{os.getpid()}_{int(time.time())}"


def token(user_id: str, role: str = "user", ttl_s: int = 86400) -> str:
    """A bearer token the benchmark servers accept (signed with JWT_SECRET)."""
    import jwt

    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if role != "user":
        claims["role"] = role
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def profile(name: str, pid: int, duration_s: float, procs: list[Proc]) -> Path:
    """Start py-spy on ``pid`` for ``duration_s``; the raw profile's path.

    Sampling costs the profiled process a little: runs with a profile are
    for finding where time goes, not for the figures.
    """
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"profile-{name}-{stamp()}.txt"
    spy = Proc(
        f"py-spy-{name}",
        [
            str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid),
            "-d", str(max(1, int(duration_s))), "-r", "100", "-f", "raw",
            "-o", str(out), "--nonblocking",
        ],
    )
    procs.append(spy)
    return out
