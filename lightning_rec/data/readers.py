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

:func:`read_encoded` is what the DataModule reads with: with pandas installed (the ``fast`` extra) its C parser
reads the columns and numpy groups them, about 5x faster than the line-by-line reader of :func:`read_sequences`
on an ML-20M-sized file. Anything that file does not look exactly as expected in (a short or long line, a
timestamp that is not a number, an empty id, a character the two readers could split differently) sends it to the
line-by-line reader instead, which gives the same result or the error naming the line, so both readers accept
the same files with the same results and errors.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import sys
import warnings
from collections.abc import Iterator

import numpy as np

from lightning_rec.data.encode import EncodedSequences, encode, encode_codes
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
    fmt, sep = _check_options(path, fmt, min_rating, sep)
    try:
        return _read(path, fmt, user_col, item_col, time_col, rating_col, min_rating, sep)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, truncated, not UTF-8, unreadable
        kind = "gzip-compressed UTF-8 text" if path.endswith(".gz") else "UTF-8 text"
        raise DataError(f"data.path: cannot read '{path}' ({type(e).__name__}: {e}); expected {kind}") from None


def _check_options(path: str, fmt: str, min_rating, sep: str | None) -> tuple[str, str | None]:
    if fmt not in FORMATS:
        raise DataError(f"data.format: unknown format '{fmt}', expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "sasrec" and min_rating is not None:
        raise DataError(f"data.min_rating={min_rating}: {path} is a 'user item' file (format sasrec) with no ratings; "
                        f"drop data.min_rating")
    if fmt == "csv":
        sep = _separator(sep, path)
    return fmt, sep


SLOW_NOTE_BYTES = 64 << 20  # files at least this large get a note when the line-by-line reader reads them


def read_encoded(
    path: str,
    fmt: str = "auto",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    min_rating: float | None = None,
    sep: str | None = None,
    fast: bool = True,
) -> EncodedSequences:
    """``encode(read_sequences(...))`` with the same arguments, result and errors, read by pandas' C parser
    when pandas is installed and ``fast`` (see the module's docstring)."""
    fmt, sep = _check_options(path, fmt, min_rating, sep)
    if fast and os.path.isfile(path) and os.path.getsize(path) > 0:
        enc = _read_fast(path, fmt, user_col, item_col, time_col, rating_col, min_rating, sep)
        if enc is not None:
            return enc
        if os.path.getsize(path) >= SLOW_NOTE_BYTES:  # where the line reader costs minutes, say why it is used
            why = ("pandas is not installed (pip install 'lightning_rec[fast]')" if _pandas() is None else
                   "the fast reader takes only files of exactly the expected shape; the line reader checks each line")
            print(f"note: {path}: read line by line, several times slower at this size: {why}", file=sys.stderr,
                  flush=True)
    return encode(read_sequences(path, fmt, user_col, item_col, time_col, rating_col, min_rating, sep))


def _pandas():
    try:
        import pandas
    except ImportError:
        return None
    return pandas


def _read_fast(path, fmt, user_col, item_col, time_col, rating_col, min_rating, sep) -> EncodedSequences | None:
    """The file read by pandas and grouped by numpy, or None wherever the line-by-line reader has to decide
    (pandas missing, or the file not exactly of the simple shape checked here)."""
    pd = _pandas()
    if pd is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. ParserWarning: a first row longer than the header, cut short
            return _read_frame(pd, path, fmt, user_col, item_col, time_col, rating_col, min_rating, sep)
    except Exception:  # a malformed line, a bad number, not gzip / UTF-8, ...: the line-by-line reader says which
        return None


def _read_frame(pd, path, fmt, user_col, item_col, time_col, rating_col, min_rating, sep):
    # '' is NaN (never a value), so a short line or an empty field shows as NaN and goes to the line-by-line reader
    opts = dict(engine="c", encoding="utf-8-sig", keep_default_na=False, na_values=[""], skip_blank_lines=True,
                compression="gzip" if path.endswith(".gz") else None, low_memory=True)
    if fmt in ("sasrec", "movielens", "udata"):
        # movielens' '::' as ':' (the C parser takes one character): a valid line has 7 fields, every second empty
        sep_, width, u, i, r, t = {"sasrec": (r"\s+", 2, 0, 1, None, None), "movielens": (":", 7, 0, 2, 4, 6),
                                   "udata": ("\t", 4, 0, 1, 2, 3)}[fmt]
        dtype = {c: object for c in range(width)}
        for c in (1, 3, 5) if fmt == "movielens" else ():
            dtype[c] = np.float32  # all NaN in a valid file: no string made for them
        if t is not None:
            dtype[t] = np.float64
        if min_rating is not None:
            dtype[r] = np.float64
        opts.update(sep=sep_, header=None, quoting=csv.QUOTE_NONE)
        ucol, icol, tcol = u, i, t
        rcol = r if min_rating is not None else None
        strip = False
    else:
        with _open_text(path) as f:
            header = next(csv.reader(f, delimiter=sep), None)
        if not header:
            return None
        names = [h.strip() for h in header]
        wanted = [user_col, item_col] + ([time_col] if time_col else []) + (
            [rating_col or "rating"] if min_rating is not None else [])
        if any(w not in names for w in wanted):
            return None
        raw = {w: header[names.index(w)] for w in wanted}
        dtype = {h: object for h in header}
        if time_col:
            dtype[raw[time_col]] = np.float64
        if min_rating is not None:
            dtype[raw[rating_col or "rating"]] = np.float64
        opts.update(sep=sep, header=0, index_col=False)
        ucol, icol = raw[user_col], raw[item_col]
        tcol = raw[time_col] if time_col else None
        rcol = raw[rating_col or "rating"] if min_rating is not None else None
        strip = True
    # Id columns whose first rows are plain integers are parsed as int64 (no string per row) if no token in the
    # whole file could read as another id as a string: '007', '+7', '-0', ' 7' where spaces belong to the id.
    sample = pd.read_csv(path, nrows=1000, dtype=object, **opts)
    if fmt == "csv" and sample.columns.tolist() != header:
        return None
    numeric = [c for c in (ucol, icol) if c in sample.columns and all(
        isinstance(v, str) and _plain_int(v.strip() if strip else v) for v in sample[c].tolist())]
    if numeric and _ints_are_canonical(path, {"movielens": b" \t\v\f", "udata": b" \v\f"}.get(fmt, b"")):
        try:
            df = pd.read_csv(path, dtype={**dtype, **{c: np.int64 for c in numeric}}, **opts)
        except (ValueError, OverflowError):  # not integers after all (or too large): as strings
            df = pd.read_csv(path, dtype=dtype, **opts)
    else:
        df = pd.read_csv(path, dtype=dtype, **opts)
    if fmt == "csv":
        if df.columns.tolist() != header:
            return None
        if df[df.columns[-1]].isna().any():
            return None  # a short row, or an empty last field: the csv reader tells them apart
    elif df.shape[1] != width:
        return None
    if fmt == "movielens" and not all(np.isnan(df[c].to_numpy()).all() for c in (1, 3, 5)):
        return None  # a field holding ':', or a short line
    if len(df) == 0:
        return None
    if rcol is not None:
        ratings = df[rcol].to_numpy()
        if np.isnan(ratings).any():
            return None
        df = df[ratings >= min_rating]
        if len(df) == 0:
            return None
    times = df[tcol].to_numpy() if tcol is not None else None
    if times is not None and np.isnan(times).any():
        return None
    users, items = df[ucol].to_numpy(), df[icol].to_numpy()
    del df  # the other columns' memory goes before the grouping's arrays come
    ucodes, uuniq = _codes(pd, users, fmt, strip)
    del users
    if ucodes is None:
        return None
    icodes, iuniq = _codes(pd, items, fmt, strip)
    del items
    if icodes is None:
        return None
    return encode_codes(ucodes, uuniq, icodes, iuniq, times)


def _plain_int(v: str) -> bool:
    return v.isascii() and v.isdigit() and (v == "0" or v[0] != "0")


def _ints_are_canonical(path: str, forbidden: bytes) -> bool:
    """True if no token of the file starts with a sign or a leading zero before a digit (``+7``, ``-0``, ``007``)
    and no byte of ``forbidden`` occurs, so that an id parsed as an integer prints back as the text it was.
    Tokens start after anything but a letter, digit, '.' or '_' (so ``1e-05`` and ``0.05`` pass). Vectorized,
    16 MB at a time."""
    word = np.zeros(256, dtype=bool)
    word[[ord(c) for c in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ._"]] = True
    digit = np.zeros(256, dtype=bool)
    digit[48:58] = True
    tail = b"\n"
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        while block := f.read(1 << 24):
            if any(bytes([c]) in block for c in forbidden):
                return False
            buf = tail + block
            a = np.frombuffer(buf, dtype=np.uint8)
            for sign in (b"0", b"+", b"-"):
                if sign != b"0" and sign not in buf:
                    continue
                at = np.flatnonzero(a[1:-1] == sign[0]) + 1  # each with a byte before and after it
                if at.size and (digit[a[at + 1]] & ~word[a[at - 1]]).any():
                    return False
            tail = buf[-2:]
    return True


def _codes(pd, values: np.ndarray, fmt, strip):
    """Codes and distinct ids (as strings) of an id column, or (None, None) where the line-by-line reader might
    split it otherwise (``sasrec``: str.split() splits at any Unicode space, pandas at spaces and tabs) or refuse
    it."""
    codes, uniques = pd.factorize(values)
    if values.dtype.kind in "iu":
        return np.asarray(codes, dtype=np.int64), [str(v) for v in uniques.tolist()]
    uniques = list(uniques)
    if (codes < 0).any() or not all(isinstance(v, str) for v in uniques):
        return None, None
    if fmt == "sasrec" and any(v == "" or len(v.split()) != 1 or v.split()[0] != v for v in uniques):
        return None, None
    if strip:
        stripped = [v.strip() for v in uniques]
        if any(not v for v in stripped):
            return None, None
        if stripped != uniques:  # ' a' and 'a' are one id
            remap, uniques = pd.factorize(np.asarray(stripped, dtype=object))
            codes = remap[codes]
            uniques = list(uniques)
    return np.asarray(codes, dtype=np.int64), uniques


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
