"""A private nginx instance serving a directory on 127.0.0.1 (own config, pid and logs).

    with NginxSite(Path("/tmp/site")) as site:
        print(site.base_url)   # http://127.0.0.1:<free port>

Runs ``nginx -g 'daemon off;'`` as a child process with a config file, pid file, error log
and temp paths of its own in a temporary directory; stops that child (by its pid) on
exit. Never touches the system nginx service or /etc/nginx (mime.types is only read).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

CONFIG = """\
worker_processes {workers};
# open_file_cache keeps descriptors open: room for them beside the connections
worker_rlimit_nofile 65536;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    types {{ text/html html; text/plain txt; application/json json; }}
    default_type application/octet-stream;
    charset utf-8;
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    open_file_cache max=8192 inactive=20s;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        server_name localhost;
        root {root};
        index index.html;
        location / {{ try_files $uri $uri/ =404; }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if found is None:
        raise RuntimeError(
            "nginx is not installed: apt-get update && apt-get install -y nginx "
            "(the benchmark starts its own instance; the system service is not used)"
        )
    return found


class NginxSite:
    def __init__(self, root: Path, *, workers: int = 1, keep_log: Path | None = None) -> None:
        self.root = root.resolve()
        self.keep_log = keep_log  # the error log is copied there on stop
        self.workers = workers
        self.tmp = Path(tempfile.mkdtemp(prefix="trawler-bench-nginx-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        """The master and its worker processes (for CPU accounting)."""
        if self.proc is None:
            return []
        pids = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:
                    pids.append(int(stat.parent.name))
        return pids

    def start(self) -> NginxSite:
        self.port = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            CONFIG.format(workers=self.workers, tmp=self.tmp, port=self.port, root=self.root)
        )
        self.proc = subprocess.Popen(
            [
                nginx_binary(),
                "-p",
                str(self.tmp),
                "-c",
                str(conf),
                "-e",
                str(self.tmp / "error.log"),
                "-g",
                "daemon off;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited ({self.proc.returncode}): {err.strip()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start listening within 10 s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful shutdown of our own master
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        error_log = self.tmp / "error.log"
        if self.keep_log is not None and error_log.exists():
            shutil.copyfile(error_log, self.keep_log)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def errors(self) -> int:
        """Lines logged at error level or worse so far (e.g. 'Too many open files')."""
        try:
            text = (self.tmp / "error.log").read_text(errors="replace")
        except OSError:
            return 0
        return sum(
            1 for line in text.splitlines() if re.search(r"\[(error|crit|alert|emerg)\]", line)
        )

    def __enter__(self) -> NginxSite:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
