"""The results ledger (probe/ledger.py): whole rows or none, damaged rows named and skipped,
and a ledger folder that cannot be written refused before any training."""

import os

import pytest

from diffprobe.probe.ledger import COLUMNS, LedgerError, append_row, check_ledger, read_rows

from .places import read_only_folder


def _result(i: int, head: str = "linear") -> dict:
    r = {c: i for c in COLUMNS} | {
        "store": "runs/s.zarr",
        "recipe": "sgd",
        "device": "cpu",
        "fingerprint": "ab" * 8,
        "subset": "all",
        "subset_sha": "0" * 64,
        "settings": "1" * 12,
        "hyperparameters": {"lr": 0.1, "weight_decay": 0.0},
        "per_class": {"0": 0.5, 'a "quoted", class': 1.0},
        "block": 24,
        "t": 90 + i,
        "head": head,
        "blocks": [24],
        "timesteps": [90 + i],
    }
    if head == "fusion":
        r |= {"block": None, "t": None, "blocks": [19, 24, 30], "timesteps": [90, 150, 300]}
    return r


@pytest.mark.parametrize("head", ["linear", "fusion"])
def test_a_row_cut_at_every_byte_offset_is_skipped_and_named(tmp_path, head):
    path = tmp_path / "ledger.csv"
    append_row(path, _result(1))
    append_row(path, _result(2))
    base = path.read_bytes()
    append_row(path, _result(3, head))
    row3 = path.read_bytes()[len(base) :]
    assert row3.endswith(b"\r\n") and b"\n" not in row3[:-1]  # one row, one line
    for cut in range(len(row3) + 1):
        path.write_bytes(base + row3[:cut])
        whole = cut == len(row3)
        warnings: list[str] = []
        rows = read_rows(path, on_damaged=warnings.append)
        assert [r["t"] for r in rows] == [91, 92] + ([None if head == "fusion" else 93] if whole else [])
        assert len(warnings) == (0 < cut < len(row3)), (cut, warnings)
        if warnings:
            assert warnings[0].startswith(f"{path}:4: damaged ledger row skipped (")
        append_row(path, _result(4))  # the next probe appends a whole row of its own
        intact = cut >= len(row3) - 2  # all but the line ending: the append ends the line, the row is whole
        warnings.clear()
        rows = read_rows(path, on_damaged=warnings.append)
        assert [r["t"] for r in rows] == [91, 92] + ([None if head == "fusion" else 93] if intact else []) + [94]
        assert len(warnings) == (0 < cut and not intact), (cut, rows, warnings)


def test_a_failed_write_leaves_the_ledger_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "ledger.csv"
    append_row(path, _result(1))
    before = path.read_bytes()
    real = os.write

    def short_write(fd, data):  # a full disk: part of the row goes out, then ENOSPC
        real(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(LedgerError, match=rf"^{path}: cannot write the results ledger \(No space left on device\)"):
        append_row(path, _result(2))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [r["t"] for r in read_rows(path)] == [91]


def test_the_damaged_row_warning_is_one_line_on_stderr(tmp_path, capsys):
    path = tmp_path / "ledger.csv"
    append_row(path, _result(1))
    with open(path, "ab") as f:
        f.write(b"2026-01-01,runs/s.zarr,abc\r\n")
    assert len(read_rows(path)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {path}:3: damaged ledger row skipped")


def test_a_read_only_ledger_folder_is_refused_before_training(tmp_path):
    with read_only_folder(tmp_path / "ro") as ro:
        with pytest.raises(LedgerError, match=r"is read-only\); pass --ledger PATH"):
            check_ledger(ro / "probe-results.csv")
    assert check_ledger(tmp_path / "elsewhere" / "probe-results.csv") == []  # a folder still to be made
