"""Helpers of the table-driven bad-input tests (one per command): the one line a refused command prints, and a
snapshot of a folder tree to show that a refused command changed nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def snapshot(root: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, tuple[str, int, int]]:
    """``{relative path: (kind, size, mtime_ns)}`` of everything under ``root`` (links not followed) but the top-level
    entries named in ``exclude`` (a command's OUT, which it may write), ``root`` itself included as ``"."`` when
    nothing is excluded: creating, removing, renaming or rewriting anything else in the tree changes it."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in exclude]
            filenames = [f for f in filenames if f not in exclude]
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            st = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            out[str(path.relative_to(root))] = (kind, st.st_size if kind != "dir" else 0, st.st_mtime_ns)
    if not exclude:
        out["."] = ("dir", 0, root.lstat().st_mtime_ns)
    return out


def error_line(err: str) -> str:
    """The single line of a refused command's stderr. Argument errors found by argparse come after argparse's usage
    block, as every avmt command (``python -m avmt.train`` first) prints them: that block is dropped first. Fails the
    test on a traceback or on any other line."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if lines and lines[0].startswith("usage:"):
        lines = lines[next((i for i, line in enumerate(lines) if "error:" in line), 0) :]
    assert len(lines) == 1, err
    return lines[0]


def refused(main: Callable[[list[str]], int], argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """``(exit code, the one error line, stdout)`` of ``main(argv)`` run in this process; argparse's exit counts as a
    return."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, error_line(err), out
