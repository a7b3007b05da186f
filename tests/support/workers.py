"""`trawler worker` (and `trawler serve`) as real processes: start, signal, observe (RSS, id)."""

from __future__ import annotations

import asyncio
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from sqlalchemy import text

from app.database.connection import ConnectionManager
from tests.e2e.conftest import clean_env, trawler_command

# Short timings so that a lost worker is noticed within seconds (the defaults are minutes).
FAST_WORKER_ENV = {
    "TRAWLER_ALLOW_PRIVATE_NETWORKS": "true",
    "TRAWLER_HEARTBEAT_SECONDS": "0.5",
    "TRAWLER_WORKER_STALE_SECONDS": "2",
    "TRAWLER_POLL_INTERVAL": "0.2",
    "TRAWLER_LOG_LEVEL": "WARNING",
}


class WorkerProcess:
    """A running `trawler worker`; its stderr goes to a file (a pipe nobody reads fills up)."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log_path = log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def kill(self) -> None:
        self.process.kill()

    async def wait(self) -> int:
        return await self.process.wait()

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def rss_kib(self) -> tuple[int, int]:
        """(current, peak) resident set size in KiB, from /proc (VmRSS, VmHWM)."""
        return rss_kib(self.pid)


def rss_kib(pid: int) -> tuple[int, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


@asynccontextmanager
async def worker_process(db_url: str, **env: str) -> AsyncIterator[WorkerProcess]:
    """Start `trawler worker` on ``db_url``; ``env`` overrides FAST_WORKER_ENV. Killed at exit."""
    values = {**FAST_WORKER_ENV, **env, "TRAWLER_DATABASE_URL": db_url}
    log_dir = Path(tempfile.mkdtemp(prefix="trawler-worker-"))
    log = log_dir / "stderr.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *trawler_command(),
            "worker",
            env=clean_env(**values),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=sink,
        )
    worker = WorkerProcess(process, log)
    try:
        yield worker
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def worker_id(db: ConnectionManager, pid: int, timeout: float = 30.0) -> uuid.UUID:
    """The id a worker process registered under (waits for its registration)."""

    async def registered() -> uuid.UUID | None:
        async with db.connect() as conn:
            row = await conn.execute(
                text("SELECT id FROM workers WHERE pid = :pid ORDER BY started_at DESC LIMIT 1"),
                {"pid": pid},
            )
            value = row.scalar_one_or_none()
            return value if isinstance(value, uuid.UUID) else None

    found: uuid.UUID | None = None

    async def check() -> bool:
        nonlocal found
        found = await registered()
        return found is not None

    await wait_until(check, timeout, f"worker pid {pid} registered")
    assert found is not None
    return found


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.1
) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took. Fails after ``timeout``."""
    started = time.monotonic()
    while True:
        if await condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not reached within {timeout:.0f}s")
        await asyncio.sleep(interval)


READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Served:
    def __init__(self, proc: asyncio.subprocess.Process, base_url: str, log: Path) -> None:
        self.proc, self.base_url, self.log = proc, base_url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    async def wait_ready(self, client: httpx.AsyncClient) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < READY_TIMEOUT_S:
            assert self.proc.returncode is None, f"trawler serve exited:\n{self.output()}"
            try:
                response = await client.get(f"{self.base_url}/health/ready")
                if response.status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass  # not listening yet
            await asyncio.sleep(0.2)
        raise AssertionError(f"not ready after {READY_TIMEOUT_S:.0f}s:\n{self.output()}")

    async def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT_S)


@asynccontextmanager
async def serve_process(tmp_path: Path, env: dict[str, str], *args: str) -> AsyncIterator[Served]:
    """`trawler serve` on a free port (``args``: more options, e.g. --no-worker), run in
    ``tmp_path`` with exactly ``env``; its output goes to tmp_path/serve.log."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *trawler_command(),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
            cwd=tmp_path,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        yield served
    finally:
        if proc.returncode is None:  # the test failed before its own SIGTERM
            proc.kill()
            await proc.wait()
