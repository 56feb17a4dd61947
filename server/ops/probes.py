"""The stores' and the disks' state for `/ready` and `/metrics`, probed in the background.

None of the endpoints waits on a store: `Probes` asks the database, the image store and the file systems
once a second, each on a thread of its own with its own time-out, and the endpoints read what it found. A
database outage, a hung bucket or a full thread pool cannot make a liveness probe time out. While a disk is
below `--min-free-disk`, `check_room` refuses new work.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import ServerConfig
from ..protocol.errors import StorageFull
from ..store.images import DirectoryImageStore, ImageStore

log = logging.getLogger("k5serve.app")


class Probes:
    """The stores' and the disks' state, gathered in the background (`run`); read without waiting."""

    INTERVAL = 1.0  # seconds between rounds
    TIMEOUT = 3.0  # a probe that has not answered by then is reported as not answering (and not started again
    #                until it returns)

    def __init__(self, config: ServerConfig, images: ImageStore, database=None):
        self.images = images
        self.database = database
        self.min_free = config.min_free_disk
        folders = {"data directory": config.data_dir}
        if isinstance(images, DirectoryImageStore):
            folders["image store"] = images.root
        self.folders: dict[str, Path] = folders
        self.image_store: dict[str, Any] = {"kind": images.kind}
        self.free: dict[str, int] = {}  # folder role -> free bytes
        self.low_disk: str | None = None  # why new work is refused for lack of space
        self._pool = ThreadPoolExecutor(3, thread_name_prefix="k5serve-probe")
        self._running: dict[str, asyncio.Future] = {}

    async def run(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(self.INTERVAL)

    async def once(self) -> None:
        jobs = [self._probe("image store", self.images.status, self._image_store_found), self._probe(
            "disk", self._free_space, self._disk_found)]
        if self.database is not None:
            jobs.append(self._probe("database", self.database.probe, lambda _: None))
        await asyncio.gather(*jobs)

    async def _probe(self, name: str, call, found) -> None:
        future = self._running.get(name)
        if future is None:  # (one still running from an earlier round is waited for, not doubled)
            future = self._running[name] = asyncio.get_running_loop().run_in_executor(self._pool, call)
            future.add_done_callback(lambda _: self._running.pop(name, None))
        try:
            found(await asyncio.wait_for(asyncio.shield(future), self.TIMEOUT))
        except TimeoutError:
            self._hung(name)
        except Exception as exc:  # noqa: BLE001 - a probe that fails reports it; it never stops the others
            log.warning("probing the %s: %s", name, exc)
            self._hung(name, f"{type(exc).__name__}: {exc}")

    def _hung(self, name: str, why: str | None = None) -> None:
        why = why or f"no answer within {self.TIMEOUT:g} s"
        if name == "image store":
            self.image_store = {"kind": self.images.kind, "problem": f"the image store is not answering ({why})"}
        elif name == "disk" and self.min_free > 0:
            self.low_disk = f"the free space of the data directory cannot be read ({why})"

    def check_room(self) -> None:
        """Raise StorageFull while a disk is below --min-free-disk: new work would be thrown away for lack of
        space (the dispatcher answers it as any store error: 503 storageFull)."""
        if self.low_disk:
            raise StorageFull(f"this server is low on disk space ({self.low_disk})")

    def _image_store_found(self, status: dict[str, Any]) -> None:
        self.image_store = status

    def _free_space(self) -> dict[str, int]:
        """Free bytes of each folder that exists (with --database and an s3:// store the data directory may
        not: then nothing is written there either)."""
        return {role: shutil.disk_usage(folder).free for role, folder in self.folders.items() if folder.exists()}

    def _disk_found(self, free: dict[str, int]) -> None:
        self.free = free
        low = [role for role, n in free.items() if n < self.min_free]  # (none with --min-free-disk 0)
        was = self.low_disk  # (for clients and /ready: no paths)
        self.low_disk = "; ".join(f"the {role} has {free[role] / 2**20:.0f} MiB free" for role in low) + (
            f", below --min-free-disk ({self.min_free / 2**20:.0f} MiB)") if low else None
        if self.low_disk != was:
            (log.warning if self.low_disk else log.info)("disk space: %s", "; ".join(
                f"{self.folders[role]} has {free[role] / 2**20:.0f} MiB free" for role in low) or "enough again")
