"""Output discipline: refusals before compute, atomic files, directories written as one unit."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from collections import namedtuple

import pytest

from headwise import _io
from headwise.errors import HeadwiseError


def one_line_error(call, *names):
    """The HeadwiseError `call` raises: one line, naming each of `names`."""
    with pytest.raises(HeadwiseError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg
    return msg


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


# ---- checks before compute ----------------------------------------------------------------------
def no_write(directory):
    raise PermissionError(errno.EACCES, "Permission denied")


def no_space(path):
    return namedtuple("usage", "total used free")(10 * 2**30, 10 * 2**30 - 2**20, 2**20)


@pytest.mark.parametrize("check", [_io.check_output_dir, _io.check_output_file])
@pytest.mark.parametrize("case", ["file in the way", "parent is a file", "probe fails", "access denied", "no space"])
def test_unusable_outputs_are_refused_in_one_line(tmp_path, monkeypatch, check, case):
    target = tmp_path / "out"
    if case == "file in the way" and check is _io.check_output_file:
        target.mkdir()
        expected = "it is a directory"
    elif case == "file in the way":
        target.write_text("x")
        expected = "it is a file"
    elif case == "parent is a file":
        (tmp_path / "f").write_text("x")
        target, expected = tmp_path / "f" / "sub" / "out", f"{tmp_path / 'f'} is a file"
    elif case == "probe fails":
        monkeypatch.setattr(_io, "_probe", no_write)
        expected = "is not writable (Permission denied)"
    elif case == "access denied":
        monkeypatch.setattr(_io.os, "access", lambda path, mode: False)
        expected = "is not writable (Permission denied)"
    else:
        monkeypatch.setattr(_io.shutil, "disk_usage", no_space)
        expected = "not enough free space to write the atlas"
    msg = one_line_error(lambda: check(target, what="the atlas", need_bytes=2**30), target, expected)
    assert msg.count(";") == 1  # what is wrong; how to fix it


def test_usable_outputs_pass_and_leave_no_probe(tmp_path):
    assert _io.check_output_dir(tmp_path / "a" / "b", what="x", need_bytes=1) == tmp_path / "a" / "b"
    assert _io.check_output_file(tmp_path / "c" / "r.json", what="x") == tmp_path / "c" / "r.json"
    assert listing(tmp_path) == ["a", "a/b", "c"]


def test_file_names_too_long_for_the_file_system_are_refused_before_any_work(tmp_path):
    """Names are limited in bytes (255 on most file systems), not characters: 90 CJK characters are 270."""
    long = tmp_path / ("\u4e2d" * 90 + ".json")
    msg = one_line_error(lambda: _io.check_output_file(long, what="the results"), "is 275 bytes long",
                         "choose a shorter name")
    assert msg.count(";") == 1 and listing(tmp_path) == []
    fits = tmp_path / ("\u4e2d" * 80 + ".json")  # 245 bytes: allowed, and written (its temporary name is cut by bytes)
    _io.check_output_file(fits, what="the results")
    _io.write_text_atomic(fits, "{}")
    assert fits.read_text() == "{}" and listing(tmp_path) == [fits.name]


# ---- one file ----------------------------------------------------------------------------------
def test_atomic_write_writes_with_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        _io.write_text_atomic(tmp_path / "a.json", "new\n")
        _io.write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_text() == "new\n" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not owner-only, as mkstemp would make it
    assert listing(tmp_path) == ["a.json", "b.bin"]


@pytest.mark.parametrize("step", ["fsync", "replace"])
@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch, step, exc):
    (tmp_path / "a.json").write_text("old")

    def fail(*args):
        raise exc

    monkeypatch.setattr(_io.os, step, fail)
    with pytest.raises(type(exc)):
        _io.write_text_atomic(tmp_path / "a.json", "new" * 1000)
    assert (tmp_path / "a.json").read_text() == "old" and listing(tmp_path) == ["a.json"]


# ---- one unit ----------------------------------------------------------------------------------
OLD = {"atlas.json": b'{"old": 1}', "samples.bin": b"\x01" * 100, "report.html": b"<p>old</p>"}
NEW = [("atlas.json", b'{"new": 2}'), ("samples.bin", b"\x02" * 300), ("figures/a.png", b"png"), ("notes.txt", b"n")]


@pytest.fixture
def unit(tmp_path):
    """An output directory holding a committed unit OLD."""
    with _io.staged_outputs(tmp_path / "out", what="the atlas") as stage:
        for name, data in OLD.items():
            stage.write_bytes(name, data)
    return tmp_path / "out"


def write_new(stage):
    for name, data in NEW[:3]:
        stage.write_bytes(name, data)
    stage.reserve(NEW[3][0]).write_bytes(NEW[3][1])  # as a library given a file name would
    stage.remove("report.html")
    stage.meta["model"] = "tiny"


def test_commit_replaces_removes_and_records_the_unit(unit):
    with _io.staged_outputs(unit, what="the atlas") as stage:
        write_new(stage)
    assert snapshot(unit) == {**dict(NEW), _io.MANIFEST_FILE: (unit / _io.MANIFEST_FILE).read_bytes()}
    manifest = _io.read_manifest(unit)
    assert manifest["schema"] == "headwise.manifest/1" and manifest["meta"] == {"model": "tiny"}
    assert sorted(manifest["files"]) == sorted(name for name, _ in NEW)
    assert manifest["files"]["notes.txt"]["size"] == 1 and "complete" not in manifest
    _io.verify_unit(unit, [name for name, _ in NEW])
    assert (unit / "notes.txt").stat().st_mode & 0o777 == (unit / "atlas.json").stat().st_mode & 0o777


@pytest.mark.parametrize("at", range(len(NEW)))
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_raise_at_any_staged_write_leaves_the_old_unit(unit, at, exc):
    before = snapshot(unit)
    with pytest.raises(exc), _io.staged_outputs(unit, what="the atlas") as stage:
        for i, (name, data) in enumerate(NEW):
            if i == at:
                stage.reserve(name).write_bytes(data[:1])  # half written, then the failure
                raise exc("failed mid-write")
            stage.write_bytes(name, data)
    assert snapshot(unit) == before and listing(unit) == sorted([*OLD, _io.MANIFEST_FILE])
    _io.verify_unit(unit, list(OLD))


def test_interrupt_during_commit_is_deferred_until_the_unit_is_whole(unit, monkeypatch):
    real_replace, calls = os.replace, []

    def replace_and_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # after the unfinished mark, at the first file moved into place
            os.kill(os.getpid(), signal.SIGINT)
        real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", replace_and_interrupt)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), _io.staged_outputs(unit, what="the atlas") as stage:
        write_new(stage)
    assert signal.getsignal(signal.SIGINT) is handler
    assert len(calls) == len(NEW) + 2  # unfinished mark, every file, the manifest: nothing cut short
    assert snapshot(unit) == {**dict(NEW), _io.MANIFEST_FILE: (unit / _io.MANIFEST_FILE).read_bytes()}
    _io.verify_unit(unit, [name for name, _ in NEW])


def test_a_commit_that_fails_halfway_is_detected(unit, monkeypatch):
    real_replace, calls = os.replace, []

    def replace_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", replace_then_fail)
    with pytest.raises(HeadwiseError):
        with _io.staged_outputs(unit, what="the atlas") as stage:
            write_new(stage)
    monkeypatch.undo()
    one_line_error(lambda: _io.verify_unit(unit, ["atlas.json"]), unit, "half-written by an interrupted command")
    assert not any(p.name.startswith(".headwise") for p in unit.iterdir())


def test_verify_unit_refuses_an_edited_replaced_or_foreign_file(unit):
    _io.verify_unit(unit, list(OLD))
    (unit / "samples.bin").write_bytes(b"\x01" * 99 + b"\x02")  # same size, other bytes
    one_line_error(lambda: _io.verify_unit(unit, ["atlas.json", "samples.bin"]), unit / "samples.bin",
                   "mix of two runs")
    (unit / "extra.json").write_text("{}")
    one_line_error(lambda: _io.verify_unit(unit, ["extra.json"]), unit / "extra.json", "mix of two runs")
    (unit / "atlas.json").unlink()
    one_line_error(lambda: _io.verify_unit(unit, ["atlas.json"]), unit / "atlas.json", "is missing")
    (unit / _io.MANIFEST_FILE).write_text('{"schema": "headwise.manifest/1", "files": []}')
    one_line_error(lambda: _io.verify_unit(unit, ["report.html"]), "field files must be an object")


def test_a_directory_without_manifest_passes(tmp_path):
    (tmp_path / "atlas.json").write_text("{}")
    _io.verify_unit(tmp_path, ["atlas.json", "not-there.json"])
    assert _io.read_manifest(tmp_path) is None


def test_keep_carries_a_checked_file_into_the_new_unit(unit):
    with _io.staged_outputs(unit, what="the report") as stage:
        stage.keep("atlas.json")
        stage.write_text("report.html", "<p>new</p>")
    assert sorted(_io.read_manifest(unit)["files"]) == ["atlas.json", "report.html"]
    _io.verify_unit(unit, ["atlas.json", "report.html"])
    (unit / "atlas.json").write_text("{}")
    with pytest.raises(HeadwiseError, match="mix of two runs"), _io.staged_outputs(unit, what="x") as stage:
        stage.keep("atlas.json")


def test_leftover_staging_is_cleaned(unit):
    dead = unit / ".headwise-staging-killed"
    dead.mkdir()
    (dead / "atlas.json").write_text("half")
    with _io.staged_outputs(unit, what="the atlas") as stage:
        stage.write_text("atlas.json", "{}")
    assert not dead.exists()


def test_staging_of_a_killed_process_is_cleaned_by_the_next_run(unit):
    script = ("import sys, time; from headwise import _io\n"
              "with _io.staged_outputs(sys.argv[1], what='x') as stage:\n"
              "    stage.write_text('atlas.json', 'half'); print('staged', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(unit)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "staged\n"
        one_line_error(lambda: _io.staged_outputs(unit, what="the atlas").__enter__(), "another headwise")
    finally:
        proc.kill()  # SIGKILL: no cleanup runs in the child
        proc.wait()
    assert [p.name for p in unit.glob(".headwise-staging-*")]  # what the killed run left
    with _io.staged_outputs(unit, what="the atlas") as stage:
        stage.write_text("atlas.json", "{}")
    assert listing(unit) == sorted([*OLD, _io.MANIFEST_FILE])


def test_unit_names_stay_inside_the_directory(unit):
    with pytest.raises(ValueError), _io.staged_outputs(unit, what="x") as stage:
        stage.write_text("../escape.txt", "x")
    assert not (unit.parent / "escape.txt").exists() and json.loads((unit / "atlas.json").read_text()) == {"old": 1}


def test_deferred_interrupt_is_a_no_op_off_the_main_thread():
    errors = []

    def run():
        try:
            with _io.deferred_interrupt():
                pass
        except Exception as e:  # signal.signal would raise ValueError here
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors == []


def test_names_say_what_they_are():
    import inspect

    from headwise import _schema

    assert _io.MANIFEST_FILE == "headwise-manifest.json" and _schema.MANIFEST_SCHEMA == "headwise.manifest/1"
    assert not hasattr(_io, "MANIFEST") and not hasattr(_schema, "MANIFEST")
    assert "MANIFEST_SCHEMA =" not in inspect.getsource(_io)  # one constant: _io uses _schema's
    assert hasattr(_io.Stage, "reserve") and not hasattr(_io.Stage, "path")  # it registers a name: not a getter


def test_a_kept_file_that_is_gone_is_left_out_of_the_new_unit(tmp_path):
    """A figure the user deleted must not block every later command on the directory."""
    d = tmp_path / "out"
    with _io.staged_outputs(d, what="x") as stage:
        for name in ("atlas.json", "figures/grid.png", "figures/trends.png"):
            stage.write_text(name, name)
    (d / "figures" / "grid.png").unlink()
    with _io.staged_outputs(d, what="the report") as stage:
        stage.keep("atlas.json")
        stage.write_text("report.html", "<p>")
        stage.keep_others()
    assert sorted(_io.read_manifest(d)["files"]) == ["atlas.json", "figures/trends.png", "report.html"]
    _io.verify_unit(d, ["atlas.json", "figures/trends.png", "report.html"])
    with _io.staged_outputs(d, what="the atlas") as stage:  # a new unit without figures: figures/ goes too
        stage.write_text("atlas.json", "new")
        for name in stage.old_files():
            if name != "atlas.json":
                stage.remove(name)
    assert listing(d) == ["atlas.json", _io.MANIFEST_FILE]


def test_a_commit_refuses_when_another_command_committed_since_it_read(unit):
    """A command that read the unit (e.g. the atlas a report renders) must not commit beside another's files."""
    read = _io.unit_version(unit)
    with _io.staged_outputs(unit, what="the atlas") as stage:  # another command, meanwhile
        stage.write_text("atlas.json", '{"other": 3}')
        stage.keep_others()
    after = snapshot(unit)
    with pytest.raises(HeadwiseError) as e, _io.staged_outputs(unit, what="the report", since=read) as stage:
        stage.keep("atlas.json")
        stage.write_text("report.html", "<p>a report of the old atlas</p>")
    assert "another headwise command wrote to" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(unit) == after and not list(unit.glob(".headwise-*"))
    _io.verify_unit(unit, ["atlas.json", "report.html"])


CONCURRENT_WRITER = """
import sys, types
from pathlib import Path

src, dirs, runs, me = sys.argv[1], [Path(d) for d in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
package = types.ModuleType("headwise")  # _io alone: without headwise/__init__, which imports torch
package.__path__ = [src]
sys.modules["headwise"] = package
from headwise import _io
from headwise.errors import HeadwiseError

done = 0
for i in range(runs):
    d = dirs[(i // 2) % len(dirs)]
    try:
        read = _io.unit_version(d)  # then what the new unit is made from, as a report reads its atlas
        seen = (d / "a.txt").read_text() if (d / "a.txt").exists() else None
        with _io.staged_outputs(d, what="x", since=read) as stage:
            if seen is not None and i % 2:  # a view of the unit there: a kept, b made from it, the rest kept
                stage.keep("a.txt")
                stage.write_text("b.txt", seen)
                stage.keep_others()
            else:  # a new unit; every third one with a file in a subdirectory
                token = f"{me}-{i}"
                stage.write_text("a.txt", token)
                stage.write_text("b.txt", token)
                if i % 3 == 0:
                    stage.write_text("figures/c.txt", token)
                else:
                    stage.remove("figures/c.txt")
        done += 1
    except HeadwiseError as e:  # refused in one line: another writer was staging, or committed first
        assert chr(10) not in str(e), str(e)
print(done)
"""


def test_concurrent_writers_never_mix_units_nor_print_a_traceback(tmp_path):
    """4 processes x 300 runs over 2 directories: each run commits a whole unit or is refused in one line."""
    src = os.path.dirname(_io.__file__)
    dirs = [tmp_path / "d1", tmp_path / "d2"]
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, src, ",".join(map(str, dirs)), "300",
                               f"p{k}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(4)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    for _, err, code in results:
        assert code == 0 and "Traceback" not in err and err == "", err
    assert sum(int(out) for out, _, _ in results) >= 50  # the writers did take turns, not only refuse
    for d in dirs:
        files = sorted(_io.read_manifest(d)["files"])
        _io.verify_unit(d, files)
        assert (d / "a.txt").read_text() == (d / "b.txt").read_text()  # b was made from this a
        if (d / "figures").exists():
            assert files == ["a.txt", "b.txt", "figures/c.txt"] and (d / "figures/c.txt").read_text() == \
                (d / "a.txt").read_text()
        assert not list(d.glob(".headwise-*")) and not list(d.glob(".*.tmp"))
