"""Readers that turn interaction files into per-user item sequences in time order.

Supported formats (``data.format``):

- ``sasrec``: ``user item`` per line, whitespace-separated, already in time order
  (SASRec/BERT4Rec ``ml-1m.txt``, ``Video.txt``).
- ``movielens``: MovieLens ``ratings.dat``, ``user::item::rating::timestamp``.
- ``udata``: MovieLens-100K ``u.data``, tab-separated ``user item rating timestamp``.
- ``csv``: a delimited file with a header; ``user_col``/``item_col`` name the columns,
  ``time_col`` (optional) orders each user's items, otherwise file order is kept.
- ``auto``: chosen from the file name.

Timestamps are sorted stably, so ties keep their file order. ``.gz`` files are read
transparently. Every malformed line raises a :class:`DataError` naming file and line.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterator

from lightning_rec.errors import DataError

FORMATS = ("auto", "sasrec", "movielens", "udata", "csv")


def _open_text(path: str) -> io.TextIOBase:
    if not os.path.exists(path):
        raise DataError(f"data.path: file '{path}' does not exist")
    if os.path.isdir(path):
        raise DataError(f"data.path: '{path}' is a directory, expected an interactions file")
    if os.path.getsize(path) == 0:
        raise DataError(f"data.path: file '{path}' is empty")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")  # -sig: a byte-order mark (Excel's CSV) is not part of line 1


def detect_format(path: str) -> str:
    """Guess the file format from its name (``auto``)."""
    name = os.path.basename(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".dat"):
        return "movielens"
    if name.endswith("u.data") or name.endswith(".data"):
        return "udata"
    if name.endswith(".csv") or name.endswith(".tsv"):
        return "csv"
    return "sasrec"


def _lines(f: io.TextIOBase) -> Iterator[tuple[int, str]]:
    for lineno, line in enumerate(f, start=1):
        line = line.rstrip("\r\n")
        if line.strip():
            yield lineno, line


def _parse_time(value: str, path: str, lineno: int) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{path} line {lineno}: timestamp '{value}' is not a number") from None


def read_sequences(
    path: str,
    fmt: str = "auto",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    min_rating: float | None = None,
    sep: str | None = None,
) -> dict[str, list[str]]:
    """Read a file into ``{user: [item, ...]}`` with each user's items in time order.

    The dict holds users in the order of their first appearance; ids stay the original strings
    (:func:`~lightning_rec.data.encode.encode` then numbers them in sorted-id order).
    """
    if fmt not in FORMATS:
        raise DataError(f"data.format: unknown format '{fmt}', expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "sasrec" and min_rating is not None:
        raise DataError(f"data.min_rating={min_rating}: {path} is a 'user item' file (format sasrec) with no ratings; "
                        f"drop data.min_rating")
    if fmt == "csv":
        sep = _separator(sep, path)
    try:
        return _read(path, fmt, user_col, item_col, time_col, rating_col, min_rating, sep)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, truncated, not UTF-8, unreadable
        kind = "gzip-compressed UTF-8 text" if path.endswith(".gz") else "UTF-8 text"
        raise DataError(f"data.path: cannot read '{path}' ({type(e).__name__}: {e}); expected {kind}") from None


def _separator(sep: str | None, path: str) -> str:
    """``data.sep`` as one character; ``\\t`` and ``tab`` (as typed on a command line) mean a tab."""
    if sep is None:
        return "\t" if ".tsv" in path.lower() else ","
    sep = {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(sep, sep)
    if len(sep) != 1:
        raise DataError(f"data.sep={sep!r}: expected one character (or '\\t' / tab for a tab)")
    return sep


def _read(path, fmt, user_col, item_col, time_col, rating_col, min_rating, sep) -> dict[str, list[str]]:
    timed: dict[str, list[tuple[float, str]]] = {}
    untimed: dict[str, list[str]] = {}
    with _open_text(path) as f:
        if fmt == "sasrec":
            for lineno, line in _lines(f):
                parts = line.split()
                if len(parts) != 2:
                    raise DataError(
                        f"{path} line {lineno}: expected 2 whitespace-separated fields 'user item', "
                        f"got {len(parts)}: {line[:80]!r}"
                    )
                untimed.setdefault(parts[0], []).append(parts[1])
        elif fmt in ("movielens", "udata"):
            delim, what = ("::", "user::item::rating::timestamp") if fmt == "movielens" else (
                "\t", "user<TAB>item<TAB>rating<TAB>timestamp")
            for lineno, line in _lines(f):
                parts = line.split(delim)
                if len(parts) != 4:
                    raise DataError(f"{path} line {lineno}: expected 4 fields '{what}', got {len(parts)}: {line[:80]!r}")
                if min_rating is not None:
                    try:
                        if float(parts[2]) < min_rating:
                            continue
                    except ValueError:
                        raise DataError(f"{path} line {lineno}: rating '{parts[2]}' is not a number") from None
                timed.setdefault(parts[0], []).append((_parse_time(parts[3], path, lineno), parts[1]))
        else:  # csv / tsv with a header
            reader = csv.reader(f, delimiter=sep)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"data.path: file '{path}' is empty") from None
            header = [h.strip() for h in header]
            cols = {"data.user_col": user_col, "data.item_col": item_col}
            if time_col:
                cols["data.time_col"] = time_col
            if min_rating is not None:
                cols["data.rating_col"] = rating_col or "rating"
            idx = {}
            for opt, name in cols.items():
                if name not in header:
                    raise DataError(f"{path} line 1: header has no column '{name}' ({opt}); columns are {header}")
                idx[opt] = header.index(name)
            for row in reader:
                lineno = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path} line {lineno}: expected {len(header)} fields, got {len(row)}: {sep.join(row)[:80]!r}")
                user, item = row[idx["data.user_col"]].strip(), row[idx["data.item_col"]].strip()
                if not user or not item:
                    raise DataError(f"{path} line {lineno}: empty user or item id")
                if min_rating is not None:
                    try:
                        if float(row[idx["data.rating_col"]]) < min_rating:
                            continue
                    except ValueError:
                        raise DataError(f"{path} line {lineno}: rating '{row[idx['data.rating_col']]}' is not a number") from None
                if time_col:
                    timed.setdefault(user, []).append((_parse_time(row[idx["data.time_col"]], path, lineno), item))
                else:
                    untimed.setdefault(user, []).append(item)
    if timed:
        # list.sort is stable: equal timestamps keep their file order.
        seqs = {u: [it for _, it in sorted(v, key=lambda p: p[0])] for u, v in timed.items()}
    else:
        seqs = untimed
    if not seqs:
        raise DataError(f"data.path: file '{path}' has no interactions")
    return seqs
