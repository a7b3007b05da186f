"""Submission load over real HTTP: N concurrent clients, each with its own key and connection.

Used by the load scenario in the suite (tests/reliability/test_load.py, a smaller run) and by
bench/reliability/load.py (the full 5,000 submissions with recorded results).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # every answered request
    accepted: list[uuid.UUID] = field(default_factory=list)  # job ids of the 202s
    failures: list[str] = field(default_factory=list)  # transport errors, bad bodies
    wall_s: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + len(self.failures)

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    def summary(self) -> str:
        rate = self.requests / self.wall_s if self.wall_s else 0.0
        return (
            f"{self.requests} submissions in {self.wall_s:.1f}s ({rate:.0f}/s), statuses "
            f"{dict(sorted(self.statuses.items()))}, failures {len(self.failures)}, "
            f"p50 {self.percentile_ms(0.5):.0f} ms, p99 {self.percentile_ms(0.99):.0f} ms, "
            f"max {self.percentile_ms(1.0):.0f} ms"
        )


async def submit_load(
    base_url: str, keys: list[str], total: int, *, target: str, timeout_s: float = 30.0
) -> LoadResult:
    """``total`` POST /api/v1/scrape from ``len(keys)`` concurrent clients (client i uses
    keys[i] over one keep-alive connection); each job scrapes ``target`` + a unique suffix."""
    result = LoadResult()
    counter = iter(range(total))

    async def client(key: str) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        headers = {"Authorization": f"Bearer {key}"}
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for n in counter:
                body = {"urls": [f"{target}{n}"]}
                started = time.perf_counter()
                try:
                    async with session.post(
                        f"{base_url}/api/v1/scrape", json=body, headers=headers
                    ) as response:
                        payload = await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as error:
                    result.failures.append(f"{type(error).__name__}: {error}")
                    continue
                result.latencies_s.append(time.perf_counter() - started)
                result.statuses[status] += 1
                if status == 202:
                    try:
                        result.accepted.append(uuid.UUID(_job_id(payload)))
                    except ValueError as error:
                        result.failures.append(f"202 without a job id: {error}")

    started = time.perf_counter()
    await asyncio.gather(*(client(key) for key in keys))
    result.wall_s = time.perf_counter() - started
    return result


def _job_id(payload: bytes) -> str:
    value = orjson.loads(payload).get("id")
    if not isinstance(value, str):
        raise ValueError(f"no id in {payload[:200]!r}")
    return value
