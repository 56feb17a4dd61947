"""A real PostgreSQL server for the tests: Debian's `postgresql` binaries, a new cluster in a temporary
folder, on a free loopback port, run as an unprivileged user when the tests run as root (PostgreSQL
refuses to run as root). `.ci/run` installs the package when it is missing."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ports import free_port


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class PostgresServer:
    """`url` for a database `k5serve` owned by user `k5serve` (trust auth on loopback only)."""

    def __init__(self) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql)")
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="k5serve-pg-"))  # under /tmp: the server's user can reach it
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "nobody" if os.geteuid() == 0 else None
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "k5serve", "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "k5serve", "k5serve")
        self.url = f"postgresql://k5serve@127.0.0.1:{self.port}/k5serve"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([str(self.bin / tool), *args], check=True, capture_output=True, user=self.user,
                       cwd=self.root, timeout=120)

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                       capture_output=True, user=self.user, cwd=self.root, timeout=60)

    def running(self) -> bool:
        return subprocess.run([str(self.bin / "pg_ctl"), "-D", str(self.data), "status"], capture_output=True,
                              user=self.user, cwd=self.root, timeout=30).returncode == 0

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":  # a quick check by hand: python tests/pgserver.py
    server = PostgresServer()
    print(server.url)
    time.sleep(1)
    server.close()
