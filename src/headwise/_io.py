"""Writing outputs: refuse a bad output path before any compute, never leave half a file, and
never leave a directory whose files come from two runs.

- check_output_dir / check_output_file run first, so a typo in --out costs a second, not an
  hour of profiling followed by a traceback.
- write_text_atomic / write_bytes_atomic replace one file whole or not at all.
- staged_outputs writes the files of one directory (an atlas, its samples, its report) as one
  unit: staged in a hidden directory, moved into place together with Ctrl-C held off, and
  recorded last in headwise-manifest.json with their hashes. verify_unit checks a directory
  against its manifest before a reader trusts that its files belong together.
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

from ._schema import load_json_file, manifest_schema, one_line, validate_json
from .errors import HeadwiseError

try:
    import fcntl
except ImportError:  # Windows has no flock: leftover staging directories are then all taken as stale
    fcntl = None  # type: ignore[assignment]

MANIFEST = "headwise-manifest.json"
MANIFEST_SCHEMA = "headwise.manifest/1"
_STAGING = ".headwise-staging-"  # hidden, so globs and file pickers skip it
_LOCK = ".lock"
_ELSEWHERE = "choose another output directory"


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


def check_output_dir(path: str | Path, *, what: str, need_bytes: int | None = None) -> Path:
    """Make sure `what` can be written into directory `path` (created if missing), before any compute."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise _fail(f"cannot write {what} to {path}: it is a file, not a directory; remove it or {_ELSEWHERE}")
    _ready_dir(path, what=what, target=path, need_bytes=need_bytes)
    return path


def check_output_file(path: str | Path, *, what: str, need_bytes: int | None = None) -> Path:
    """Make sure `what` can be written to file `path` (its directory created if missing), before any compute."""
    path = Path(path)
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
    # mode 0o666 less the umask as for any new file (mkstemp would make it owner-only).
    tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(6)}.tmp")
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
    if p.is_absolute() or not p.parts or ".." in p.parts or p.parts[0].startswith(".headwise") or str(p) == MANIFEST:
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

    Names are paths relative to the output directory. `meta` is written into the manifest.
    """

    def __init__(self, directory: Path, area: Path, mode: int):
        self.directory, self.area, self.mode = directory, area, mode
        self.meta: dict[str, Any] = {}
        self._staged: set[str] = set()
        self._removed: set[str] = set()
        self._kept: dict[str, dict[str, Any]] = {}

    def path(self, name: str) -> Path:
        """Where to write file `name` of the unit (for libraries that want a file name).
        A name asked for but never written is not part of the unit: its old file is removed."""
        name = _unit_name(name)
        self._staged.add(name)
        self._removed.discard(name)
        self._kept.pop(name, None)
        (self.area / name).parent.mkdir(parents=True, exist_ok=True)
        return self.area / name

    def write_bytes(self, name: str, data: bytes) -> None:
        self.path(name).write_bytes(data)

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
        """Carry an existing file into the new unit unchanged (checked against the old manifest)."""
        name = _unit_name(name)
        verify_unit(self.directory, [name])
        if not (self.directory / name).is_file():
            raise _fail(f"{self.directory / name} is missing; re-run the command that wrote {self.directory}")
        self._staged.discard(name)
        self._removed.discard(name)
        self._kept[name] = _digest(self.directory / name)

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
        for name in self.old_files():
            if name not in touched:
                self.keep(name)


def _in_use(area: Path) -> bool:
    """Whether a live process holds this staging directory (a killed one's lock died with it)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(area / _LOCK, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _commit(stage: Stage, what: str) -> None:
    area, directory = stage.area, stage.directory
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
            write_text_atomic(directory / MANIFEST, unfinished)
            for name in written:
                (directory / name).parent.mkdir(parents=True, exist_ok=True)
                os.chmod(area / name, stage.mode)  # libraries may have made it owner-only
                os.replace(area / name, directory / name)
            for name in removed:
                (directory / name).unlink(missing_ok=True)
            write_text_atomic(directory / MANIFEST, final)
    except OSError as e:
        raise _fail(f"could not finish writing {what} to {directory} ({e.strerror or e}); its files may now be "
                    f"a mix of two runs: re-run the command") from None


@contextmanager
def staged_outputs(directory: str | Path, *, what: str) -> Iterator[Stage]:
    """Write the files of `directory` as one unit: all of them replaced, or (after an error or
    Ctrl-C inside the block) none, the old files left exactly as they were."""
    directory = check_output_dir(directory, what=what)
    for old in directory.glob(_STAGING + "*"):  # left by a killed process (kill -9, power loss)
        if _in_use(old):
            raise _fail(f"another headwise command is writing to {directory} right now; wait for it to finish or "
                        f"{_ELSEWHERE}")
        shutil.rmtree(old, ignore_errors=True)
    area = Path(tempfile.mkdtemp(prefix=_STAGING, dir=directory))
    lock = None
    try:
        lock = os.open(area / _LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A file created with 0o666 shows the mode new files get here (0o666 less the umask); reading
        # the umask itself would mean setting it, which races with other threads.
        stage = Stage(directory, area, os.fstat(lock).st_mode & 0o777)
        yield stage
        _commit(stage, what)
    finally:
        shutil.rmtree(area, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of `directory`, or None when it has none (written before manifests existed)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    fix = f"re-run the command that wrote {directory}"
    doc = load_json_file(path, what="a headwise manifest", fix=fix, max_bytes=64 * 2**20)
    validate_json(doc, manifest_schema(), source=str(path), fix=fix)
    return doc


def verify_unit(directory: str | Path, names: list[str]) -> None:
    """Refuse files of `directory` that are not the ones its last unit wrote (a mix of two runs, or
    edited since). A directory without a manifest passes: older versions wrote none."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return
    fix = f"re-run the command that wrote {directory}"
    if manifest.get("complete") is False:
        raise _fail(f"{directory} was left half-written by an interrupted command, so its files may be a mix of "
                    f"two runs; {fix}")
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


__all__ = ["MANIFEST", "Stage", "check_output_dir", "check_output_file", "deferred_interrupt", "output_location",
           "read_manifest", "staged_outputs", "verify_unit", "write_bytes_atomic", "write_text_atomic"]
