"""Memory caps and cold page caches for benchmark subprocesses (Linux, run as root).

A cap is a memory cgroup that holds one measured process: cgroup v1 ``memory.limit_in_bytes`` when
the memory controller is mounted as v1, else cgroup v2 ``memory.max``. The page-cache pages of the
files a process reads (mmap'd pages included) are charged to its cgroup, so a cap below a model's
size makes an mmap'd model be paged in again and again, which is what llama.cpp meets on a machine
with less RAM than the model. ``setrlimit(RLIMIT_AS)`` is not such a cap: it bounds address space,
so it refuses the mmap of a large file outright instead of making its pages compete for memory.

Child groups are made under the caller's own memory cgroup, so whatever limits the caller lives
under still apply to them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_PREFIX = "sparseflash-bench-"


@dataclass(frozen=True)
class CgroupFiles:
    """Where a memory cgroup hierarchy keeps its numbers (names differ between v1 and v2)."""

    version: int
    limit: str
    usage: str
    peak: str | None
    unlimited: str


V1 = CgroupFiles(1, "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.max_usage_in_bytes", "-1")
V2 = CgroupFiles(2, "memory.max", "memory.current", "memory.peak", "max")


@dataclass(frozen=True)
class MemoryCgroups:
    """A parent memory cgroup under which this process may create capped children."""

    parent: Path
    files: CgroupFiles

    @property
    def mechanism(self) -> str:
        return f"cgroup v{self.files.version} {self.files.limit}"

    def create(self, tag: str) -> Path:
        """A new child group named after this process and ``tag``; no limit yet."""
        path = self.parent / f"{CGROUP_PREFIX}{os.getpid()}-{tag}"
        path.mkdir()
        return path

    def join(self, group: Path, pid: int = 0) -> None:
        """Move ``pid`` (0: the calling process) into ``group``."""
        (group / "cgroup.procs").write_text(str(pid or os.getpid()))

    def set_limit(self, group: Path, nbytes: int | None) -> None:
        (group / self.files.limit).write_text(self.files.unlimited if nbytes is None else str(int(nbytes)))

    def usage(self, group: Path) -> int:
        return int((group / self.files.usage).read_text())

    def peak(self, group: Path) -> int | None:
        if self.files.peak is None or not (group / self.files.peak).exists():
            return None
        return int((group / self.files.peak).read_text())

    def reset_peak(self, group: Path) -> bool:
        """Restart the peak from the current usage (v1 only; v2 resets per open file, not here)."""
        if self.files.version != 1:
            return False
        (group / self.files.peak).write_text("0")
        return True

    def oom_kills(self, group: Path) -> int:
        name, key = ("memory.oom_control", "oom_kill") if self.files.version == 1 else ("memory.events", "oom_kill")
        try:
            for line in (group / name).read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
        except OSError:
            pass
        return 0

    def remove(self, group: Path, timeout_s: float = 5.0) -> None:
        """Remove an emptied child group (its processes must have exited)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def remove_stale(self) -> list[Path]:
        """Remove child groups left by earlier runs whose creating process is gone."""
        removed = []
        for group in self.parent.glob(f"{CGROUP_PREFIX}*"):
            m = re.match(rf"{CGROUP_PREFIX}(\d+)-", group.name)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                try:
                    if not (group / "cgroup.procs").read_text().strip():
                        group.rmdir()
                        removed.append(group)
                except OSError:
                    pass
        return removed


def _own_cgroup_paths() -> dict[str, str]:
    """controller (or '' for the v2 unified line) -> path of this process's cgroup."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _mounts(fstype: str) -> list[tuple[Path, set[str]]]:
    rows = []
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, kind, options = line.split()[:4]
        if kind == fstype:
            rows.append((Path(where), set(options.split(","))))
    return rows


def _probe(cgroups: MemoryCgroups) -> str | None:
    """None if a child can be made and limited here; else why not."""
    try:
        group = cgroups.create("probe")
    except OSError as e:
        return f"cannot create a child of {cgroups.parent} ({e.strerror})"
    try:
        if not (group / cgroups.files.limit).exists():
            return f"{group} has no {cgroups.files.limit} (memory controller not enabled for children)"
        cgroups.set_limit(group, 1 << 30)
        cgroups.set_limit(group, None)
        return None
    except OSError as e:
        return f"cannot write {cgroups.files.limit} ({e.strerror})"
    finally:
        try:
            group.rmdir()
        except OSError:
            pass


def find_memory_cgroups() -> tuple[MemoryCgroups | None, list[str]]:
    """The memory cgroup this process can cap children under (v1 first, then v2), and the notes of
    what was tried; (None, notes) when neither works (not root, no controller, read-only mount)."""
    notes = []
    own = _own_cgroup_paths()
    for where, options in _mounts("cgroup"):
        if "memory" in options and "memory" in own:
            cg = MemoryCgroups(where / own["memory"].lstrip("/"), V1)
            why = _probe(cg)
            if why is None:
                return cg, notes
            notes.append(f"cgroup v1: {why}")
    for where, _ in _mounts("cgroup2"):
        parent = where / own.get("", "/").lstrip("/")
        controllers = (parent / "cgroup.controllers").read_text().split() if (parent / "cgroup.controllers").exists() else []
        if "memory" not in controllers:
            notes.append(f"cgroup v2 at {where}: memory controller not available in {parent}")
            continue
        subtree = parent / "cgroup.subtree_control"
        if "memory" not in subtree.read_text().split():
            try:  # fails when the parent itself holds processes (the "no internal processes" rule)
                subtree.write_text("+memory")
            except OSError as e:
                notes.append(f"cgroup v2: cannot enable memory in {subtree} ({e.strerror})")
                continue
        cg = MemoryCgroups(parent, V2)
        why = _probe(cg)
        if why is None:
            return cg, notes
        notes.append(f"cgroup v2: {why}")
    if not notes:
        notes.append("no memory cgroup hierarchy is mounted")
    return None, notes


# -- page cache -------------------------------------------------------------------------------------

def drop_page_cache(paths) -> None:
    """Write back and evict the cached pages of each file (pages mapped by a live process stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _libc():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    return libc


def cached_bytes(path) -> int:
    """Bytes of ``path`` now in the page cache (mincore over a read-only mapping; maps nothing in)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc, page = _libc(), os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = ctypes.create_string_buffer((size + page - 1) // page)
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
            return sum(b & 1 for b in vec.raw) * page
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def process_read_bytes() -> int:
    """Bytes this process (all its threads) caused to be fetched from block devices (/proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise OSError("/proc/self/io has no read_bytes line")


def read_ahead_kb(path) -> int | None:
    """The read-ahead window (KiB) of the block device holding ``path``; page faults on an mmap'd
    file read around the faulting page by up to this much. None when it cannot be found."""
    dev = os.stat(path).st_dev
    queue = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for candidate in (queue / "queue" / "read_ahead_kb", queue / ".." / "queue" / "read_ahead_kb"):
        try:
            return int(candidate.read_text())
        except (OSError, ValueError):
            continue
    return None


@dataclass(frozen=True)
class DeviceReads:
    """The block device's own read counters (/sys/dev/block/M:m/stat): every process's reads of the
    device, so they mean something only on a quiet machine. ``busy_s`` is the time the device had at
    least one request in flight (io_ticks), which bounds its achieved bandwidth from below."""

    bytes: int
    reads: int
    busy_s: float

    def __sub__(self, other: DeviceReads) -> DeviceReads:
        return DeviceReads(self.bytes - other.bytes, self.reads - other.reads, self.busy_s - other.busy_s)


def device_reads(path) -> DeviceReads | None:
    """Counters of the block device holding ``path``; None when they cannot be read."""
    dev = os.stat(path).st_dev
    try:
        f = (Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}") / "stat").read_text().split()
        # fields: reads, merged, sectors read, ms reading, writes, ..., io_ticks (ms busy) is the 10th
        return DeviceReads(int(f[2]) * 512, int(f[0]), int(f[9]) / 1e3)
    except (OSError, ValueError, IndexError):
        return None
