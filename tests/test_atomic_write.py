"""rundir.atomic.write_atomic: the whole new file or the whole old one, never a part, and no temp file left."""

import os

import pytest

from rundir.atomic import write_atomic


def test_a_write_replaces_the_file_whole(tmp_path):
  target = tmp_path / "sub" / "data.json"
  write_atomic(target, "first")
  write_atomic(target, b"\x00second")
  assert target.read_bytes() == b"\x00second"
  assert os.listdir(target.parent) == ["data.json"]


def test_a_crash_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
  target = tmp_path / "data.jsonl"
  write_atomic(target, "old\n")

  def crash(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(KeyboardInterrupt):
    write_atomic(target, "new\n" * 1000)
  assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["data.jsonl"]
