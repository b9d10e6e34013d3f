"""mechvit._io: atomic writes, umask-respecting modes, strict JSON, folder swaps and the folder lock."""

import json
import math
import multiprocessing as mp
import os
import stat

import pytest
import torch

from mechvit import _io


def test_atomic_write_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = _io.atomic_write_bytes(tmp_path / "a.bin", b"xyz")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        with _io.staged_dir(tmp_path / "d") as d:
            (d / "f").write_text("1")
        assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    finally:
        os.umask(old)
    assert p.read_bytes() == b"xyz"


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "x.txt"
    _io.atomic_write_text(p, "old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _io.atomic_write(p, boom)
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.txt"]


def test_json_is_strict(tmp_path):
    p = _io.atomic_write_json(
        tmp_path / "m.json", {"a": math.nan, "b": [1.0, math.inf], "t": torch.tensor([0.5])}
    )
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}")) == {
        "a": None,
        "b": [1.0, None],
        "t": [0.5],
    }


def test_staged_dir_replaces_whole_folder_or_nothing(tmp_path):
    final = tmp_path / "out"
    with _io.staged_dir(final) as d:
        (d / "one").write_text("1")
    with pytest.raises(ValueError), _io.staged_dir(final) as d:
        (d / "two").write_text("2")
        raise ValueError
    assert sorted(x.name for x in final.iterdir()) == ["one"]
    with _io.staged_dir(final) as d:
        (d / "two").write_text("2")
    assert sorted(x.name for x in final.iterdir()) == ["two"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]


def test_sha256(tmp_path):
    p = _io.atomic_write_bytes(tmp_path / "b", b"abc")
    expect = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert _io.sha256_file(p) == _io.sha256_bytes(b"abc") == expect


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file

    t = {"w": torch.arange(6.0).reshape(2, 3).t()}  # non-contiguous
    _io.atomic_save_safetensors(tmp_path / "w.safetensors", t, {"k": "v"})
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], t["w"])


def _hold(folder, ready, release):
    with _io.FolderLock(folder):
        ready.set()
        release.wait(30)


def test_folder_lock_excludes_another_process_and_frees_on_exit(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(_io.LockError, match=rf"in use by another run \(pid {p.pid}\)"):
            _io.FolderLock(tmp_path).acquire()
    finally:
        release.set()
        p.join(30)
    with _io.FolderLock(tmp_path):  # free again once the holder is gone
        pass
