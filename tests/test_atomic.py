"""The atomic writer: all or nothing, an earlier file left as it was."""

from __future__ import annotations

import pytest

from finetune_prep import atomic
from finetune_prep.errors import FinetunePrepError


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "param_groups.json"
    target.write_text("good\n")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(FinetunePrepError, match="No space left on device"):
        atomic.write_atomic(target, "partial")
    assert target.read_text() == "good\n"
    assert [p.name for p in tmp_path.iterdir()] == ["param_groups.json"]
