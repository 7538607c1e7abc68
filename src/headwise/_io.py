"""Writing outputs: refuse a bad output path before any compute, never leave half a file, and
never leave a directory whose files come from two runs.

- check_output_dir / check_output_file run first, so a typo in --out costs a second, not an
  hour of profiling followed by a traceback.
- write_text_atomic / write_bytes_atomic replace one file whole or not at all.
- staged_outputs writes the files of one directory (an atlas, its samples, its report, its
  figures) as one unit: staged in a hidden directory, moved into place together with Ctrl-C held
  off, and recorded last in headwise-manifest.json with their hashes. verify_unit checks a
  directory against its manifest before a reader trusts that its files belong together.

Concurrent writers: a lock on the output directory itself (flock; nothing is left behind) is held
while a stage is set up and for the whole commit, so commits run one at a time, and a commit
refuses when another command committed to the directory since this one read it: each unit is
whole, whoever wins. Each staging directory is locked by its owner before anyone can see it, and
a leftover one is removed only when no live process holds it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath
from typing import Any

from ._schema import MANIFEST_SCHEMA, load_json_file, manifest_schema, one_line, validate_json
from .errors import HeadwiseError

try:
    import fcntl
except ImportError:  # Windows has no flock: writers do not lock, leftover staging directories are all taken as stale
    fcntl = None  # type: ignore[assignment]

MANIFEST_FILE = "headwise-manifest.json"  # its "schema" is _schema.MANIFEST_SCHEMA
_STAGING = ".headwise-staging-"  # hidden, so globs and file pickers skip it
_LOCK = ".lock"
_ELSEWHERE = "choose another output directory"
_NAME_MAX = 255  # bytes in a file name, where the file system does not say (ext4, xfs, btrfs, APFS, NTFS)


def _fail(message: str) -> HeadwiseError:
    return HeadwiseError(one_line(message))


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ---- checks before any compute -------------------------------------------------------------------
def _why(path: Path, error: OSError) -> str:
    # mkdir under a file only says "Not a directory": name the file in the way.
    for parent in [path, *path.parents]:
        if parent.exists():
            return f"{parent} is a file, not a directory" if not parent.is_dir() else error.strerror or str(error)
    return error.strerror or str(error)


def _probe(directory: Path) -> None:
    """Create and remove a file: the only test of writability that read-only mounts, ACLs and root obey alike."""
    fd, name = tempfile.mkstemp(prefix=".headwise-probe-", dir=directory)
    os.close(fd)
    os.unlink(name)


def _ready_dir(directory: Path, *, what: str, target: Path, need_bytes: int | None) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _fail(f"cannot write {what} to {target}: {_why(directory, e)}; {_ELSEWHERE}") from None
    try:
        if not os.access(directory, os.W_OK | os.X_OK):  # permission bits (root passes: hence the probe too)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        _probe(directory)
    except OSError as e:
        raise _fail(f"cannot write {what} to {target}: {directory} is not writable ({e.strerror or e}); "
                    f"{_ELSEWHERE}") from None
    if need_bytes is not None:
        free = shutil.disk_usage(directory).free
        if free < need_bytes:
            raise _fail(f"not enough free space to write {what} to {target}: it needs about {_size(need_bytes)}, "
                        f"{_size(free)} is free; free some space or {_ELSEWHERE}")


def _name_max(path: Path) -> int:
    """The longest file name (in bytes) the file system of `path`'s nearest existing directory allows."""
    for d in [path, *path.parents]:
        with suppress(OSError, ValueError, AttributeError):  # AttributeError: no pathconf (Windows)
            return os.pathconf(d, "PC_NAME_MAX")  # fails for a path that does not exist (or is too long)
    return _NAME_MAX


def _check_name_lengths(path: Path, what: str) -> None:
    """Refuse a path with a name too long for the file system (checked first: even a stat of it fails)."""
    longest = _name_max(path)
    for name in path.parts:
        size = len(os.fsencode(name))
        if size > longest:  # the limit is in bytes: 80 CJK characters are 240
            raise _fail(f"cannot write {what} to {path}: the name {name[:20]}... is {size} bytes long, and this file "
                        f"system allows {longest}; choose a shorter name")


def check_output_dir(path: str | Path, *, what: str, need_bytes: int | None = None) -> Path:
    """Make sure `what` can be written into directory `path` (created if missing), before any compute."""
    path = Path(path)
    _check_name_lengths(path, what)
    if path.exists() and not path.is_dir():
        raise _fail(f"cannot write {what} to {path}: it is a file, not a directory; remove it or {_ELSEWHERE}")
    _ready_dir(path, what=what, target=path, need_bytes=need_bytes)
    return path


def check_output_file(path: str | Path, *, what: str, need_bytes: int | None = None) -> Path:
    """Make sure `what` can be written to file `path` (its directory created if missing), before any compute."""
    path = Path(path)
    _check_name_lengths(path, what)
    if path.is_dir():
        raise _fail(f"cannot write {what} to {path}: it is a directory; give a file name")
    _ready_dir(path.parent, what=what, target=path, need_bytes=need_bytes)
    return path


@contextmanager
def output_location(path: str | Path, *, what: str, file: bool = False,
                    need_bytes: int | None = None) -> Iterator[Path]:
    """check_output_dir (or, with file=True, check_output_file) for a run, undone if the run fails.

    The directories the check had to create are removed again when the block raises (a refused
    input, Ctrl-C) while still empty, so a run that wrote nothing leaves nothing behind.
    """
    path = Path(path)
    _check_name_lengths(path, what)
    directory = path.parent if file else path
    made = []  # deepest first
    for d in [directory, *directory.parents]:
        if d.exists() or d == d.parent:
            break
        made.append(d)
    try:
        (check_output_file if file else check_output_dir)(path, what=what, need_bytes=need_bytes)
        yield path
    except BaseException:
        for d in made:
            with suppress(OSError):
                d.rmdir()  # only an empty directory goes
        raise


# ---- one file ------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every system lets a directory be opened)."""
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` whole: after a crash or Ctrl-C it holds the old bytes or the new, never part."""
    path = Path(path)
    # Same directory (a rename is atomic only within one file system), hidden name (globs miss it),
    # mode 0o666 less the umask as for any new file (mkstemp would make it owner-only). The name is
    # cut to 200 bytes (names are limited in bytes), at a character boundary so it stays valid UTF-8.
    stem = os.fsencode(path.name)[:200].decode("utf-8", "ignore")
    tmp = path.with_name(f".{stem}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


# ---- one unit of files ---------------------------------------------------------------------------
@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold off Ctrl-C until the block is done, then deliver it: for steps that must not stop halfway.

    Only the main thread receives signals (and may set handlers); elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if old is None else old)
        if caught and callable(old):
            old(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        elif caught and old != signal.SIG_IGN:
            raise KeyboardInterrupt


def _unit_name(name: str) -> str:
    p = PurePosixPath(name)
    if (p.is_absolute() or not p.parts or ".." in p.parts or p.parts[0].startswith(".headwise")
            or str(p) == MANIFEST_FILE):
        raise ValueError(f"{name!r} is not a file name inside an output directory")
    return str(p)


def _digest(path: Path, *, fsync: bool = False) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
        if fsync:  # the data must be on disk before the rename that publishes it
            os.fsync(f.fileno())
    return {"sha256": h.hexdigest(), "size": size}


class Stage:
    """The files of one unit, held in a hidden staging directory until the `with` block ends.

    Names are paths relative to the output directory (e.g. "figures/grid.png"). `meta` is written
    into the manifest.
    """

    def __init__(self, directory: Path, area: Path, mode: int, since: str | None):
        self.directory, self.area, self.mode = directory, area, mode
        self.since = since  # the unit as this command first read it (unit_version): the commit checks it
        self.meta: dict[str, Any] = {}
        self._staged: set[str] = set()
        self._removed: set[str] = set()
        self._kept: dict[str, dict[str, Any]] = {}

    def reserve(self, name: str) -> Path:
        """Make `name` a file of the new unit and return the staging path to write it to (for libraries
        that want a file name). A name reserved but never written is not part of the unit: its old file
        is removed."""
        name = _unit_name(name)
        self._staged.add(name)
        self._removed.discard(name)
        self._kept.pop(name, None)
        (self.area / name).parent.mkdir(parents=True, exist_ok=True)
        return self.area / name

    def write_bytes(self, name: str, data: bytes) -> None:
        self.reserve(name).write_bytes(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def remove(self, name: str) -> None:
        """A file of the old unit that the new one does not have (e.g. a report of other scores)."""
        name = _unit_name(name)
        self._staged.discard(name)
        self._kept.pop(name, None)
        self._removed.add(name)
        (self.area / name).unlink(missing_ok=True)

    def keep(self, name: str) -> None:
        """Carry an existing file into the new unit unchanged (checked against the old manifest). A file
        that is gone (a figure the user deleted) is simply not part of the new unit."""
        self._keep([name])

    def _keep(self, names: list[str]) -> None:
        names = [_unit_name(n) for n in names]
        for name in [n for n in names if not (self.directory / n).exists()]:
            self.remove(name)
            names.remove(name)
        # One reading of the manifest for all of them; a verified file's digest is the manifest's entry.
        verified = verify_unit(self.directory, names)
        for name in names:
            if not (self.directory / name).is_file():
                raise _fail(f"{self.directory / name} is not a file; remove it or re-run the command that wrote "
                            f"{self.directory}")
            self._staged.discard(name)
            self._removed.discard(name)
            self._kept[name] = verified.get(name) or _digest(self.directory / name)

    def old_files(self) -> list[str]:
        """The files the directory's last unit holds, by its manifest ([] without one)."""
        manifest = read_manifest(self.directory)
        names = []
        for name in manifest["files"] if manifest else []:
            with suppress(ValueError):  # a name pointing outside the directory is not the unit's
                names.append(_unit_name(name))
        return sorted(names)

    def keep_others(self) -> None:
        """Keep every file of the last unit this stage has not written, removed or kept, so that a command
        adding files to a directory another command wrote leaves that unit whole."""
        touched = self._staged | self._removed | set(self._kept)
        self._keep([name for name in self.old_files() if name not in touched])


# ---- locks ---------------------------------------------------------------------------------------
def _flock(fd: int, how: int) -> bool:
    """flock(fd, how); False when a non-blocking lock is held by another process. A file system without
    locks (some network mounts) counts as granted, as on Windows: no locking, as before locks existed."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


_EX, _SH, _NB = (fcntl.LOCK_EX, fcntl.LOCK_SH, fcntl.LOCK_NB) if fcntl is not None else (0, 0, 0)


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Headwise writers take turns in `directory`: held while a stage is set up and for a whole commit.
    A lock on the directory itself, so no lock file is left beside the outputs."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a system that cannot open a directory (Windows): no locking
        yield
        return
    try:
        _flock(fd, _EX)  # blocks while another writer commits (a few renames)
        yield
    finally:
        os.close(fd)  # releases the lock


def _owner_alive(area: Path) -> bool:
    """Whether a live process holds this staging directory (a killed one's lock died with it).

    Probed with a shared lock, which cannot make the owner's own lock fail; and only under the
    directory lock, under which every owner locks its staging directory as it makes it."""
    try:
        fd = os.open(area / _LOCK, os.O_RDONLY)
    except OSError:
        return False  # no lock file: its owner died before making it
    try:
        return not _flock(fd, _SH | _NB)
    finally:
        os.close(fd)


def unit_version(directory: str | Path) -> str | None:
    """What the directory's last unit is, for a later commit to check that no other command committed
    since: the sha256 of its manifest (None: it has none)."""
    try:
        return hashlib.sha256((Path(directory) / MANIFEST_FILE).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _fail(f"cannot read {Path(directory) / MANIFEST_FILE} ({e.strerror or e}); re-run the command that "
                    f"wrote {directory}") from None


# ---- the commit ----------------------------------------------------------------------------------
def _commit(stage: Stage, what: str) -> None:
    """Move the staged files into place and write the manifest; the caller holds the directory lock."""
    area, directory = stage.area, stage.directory
    if unit_version(directory) != stage.since:
        raise _fail(f"another headwise command wrote to {directory} while this one ran, so {what} would mix two "
                    f"runs; the files there are left as that command wrote them; re-run this command")
    written = sorted(n for n in stage._staged if (area / n).is_file())
    removed = sorted(stage._removed | (stage._staged - set(written)))
    files = {n: _digest(area / n, fsync=True) for n in written} | stage._kept
    manifest = {"schema": MANIFEST_SCHEMA, "what": what, "files": dict(sorted(files.items())), "meta": stage.meta}
    # Serialized before anything moves, so a meta that is not plain JSON fails with the old files intact.
    final = json.dumps(manifest, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    unfinished = json.dumps({**manifest, "complete": False}, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        with deferred_interrupt():
            # First mark the directory unfinished: if the process dies mid-commit, verify_unit says so.
            write_text_atomic(directory / MANIFEST_FILE, unfinished)
            for name in written:
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                os.chmod(area / name, stage.mode)  # libraries may have made it owner-only
                os.replace(area / name, directory / name)
            for name in removed:
                (directory / name).unlink(missing_ok=True)
                for parent in PurePosixPath(name).parents[:-1]:  # e.g. figures/, once empty
                    with suppress(OSError):
                        (directory / parent).rmdir()
            write_text_atomic(directory / MANIFEST_FILE, final)
    except OSError as e:
        raise _fail(f"could not finish writing {what} to {directory} ({e.strerror or e}); its files may now be "
                    f"a mix of two runs: re-run the command") from None


_NOT_READ = object()


@contextmanager
def staged_outputs(directory: str | Path, *, what: str, since: Any = _NOT_READ) -> Iterator[Stage]:
    """Write the files of `directory` as one unit: all of them replaced, or (after an error or
    Ctrl-C inside the block) none, the old files left exactly as they were.

    since: the unit_version of the directory when the command read what the new unit is made from
    (e.g. the atlas a report renders); by default, when the block starts. The commit refuses if
    another command committed after that, rather than pair its files with this command's.
    """
    directory = check_output_dir(directory, what=what)
    area, lock = None, None
    try:
        with _directory_lock(directory):
            for old in directory.glob(_STAGING + "*"):  # left by a killed process (kill -9, power loss)
                if _owner_alive(old):
                    raise _fail(f"another headwise command is writing to {directory} right now; wait for it to "
                                f"finish or {_ELSEWHERE}")
                shutil.rmtree(old, ignore_errors=True)
            area = Path(tempfile.mkdtemp(prefix=_STAGING, dir=directory))
            lock = os.open(area / _LOCK, os.O_RDWR | os.O_CREAT, 0o666)
            _flock(lock, _EX)  # free: nobody else can have seen this directory yet
            if since is _NOT_READ:
                since = unit_version(directory)
        # A file created with 0o666 shows the mode new files get here (0o666 less the umask); reading
        # the umask itself would mean setting it, which races with other threads.
        stage = Stage(directory, area, os.fstat(lock).st_mode & 0o777, since)
        yield stage
        with _directory_lock(directory):
            _commit(stage, what)
    finally:
        if area is not None:
            shutil.rmtree(area, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of `directory`, or None when it has none (written before manifests existed)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        return None
    fix = f"re-run the command that wrote {directory}"
    doc = load_json_file(path, what="a headwise manifest", fix=fix, max_bytes=64 * 2**20)
    validate_json(doc, manifest_schema(), source=str(path), fix=fix)
    return doc


def verify_unit(directory: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Refuse files of `directory` that are not the ones its last unit wrote (a mix of two runs, or
    edited since); returns their verified manifest entries. A directory without a manifest passes
    ({}): older versions wrote none."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return {}
    fix = f"re-run the command that wrote {directory}"
    if manifest.get("complete") is False:
        raise _fail(f"{directory} was left half-written by an interrupted command, so its files may be a mix of "
                    f"two runs; {fix}")
    verified = {}
    for name in names:
        path, entry = directory / name, manifest["files"].get(_unit_name(name))
        if entry is None:
            raise _fail(f"{path} is not one of the files last written together in {directory} (the directory "
                        f"holds a mix of two runs); {fix}")
        if not path.is_file():
            raise _fail(f"{path} is missing from the files last written together in {directory}; {fix}")
        if path.stat().st_size != entry["size"] or _digest(path) != entry:
            raise _fail(f"{path} was changed after headwise wrote it, so {directory} holds a mix of two runs or an "
                        f"edited file; {fix}")
        verified[_unit_name(name)] = entry
    return verified


__all__ = ["MANIFEST_FILE", "Stage", "check_output_dir", "check_output_file", "deferred_interrupt", "output_location",
           "read_manifest", "staged_outputs", "unit_version", "verify_unit", "write_bytes_atomic", "write_text_atomic"]
