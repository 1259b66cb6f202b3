"""Download of public datasets from their publishers, with checksum verification."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

from lightning_rec.digest import file_digest
from lightning_rec.errors import DataError

# name -> (url, MD5 of the archive as GroupLens publishes it, member to extract, format)
DATASETS = {
    "ml-1m": (
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "c4d9eecfca2ab87c1945afe126590906",
        "ml-1m/ratings.dat",
        "movielens",
    ),
    "ml-100k": (
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "0e33842e24a9c977be4e0107933c0723",
        "ml-100k/u.data",
        "udata",
    ),
    # ratings.csv: userId,movieId,rating,timestamp with a header (conf/data/ml-20m.yaml names the columns)
    "ml-20m": (
        "https://files.grouplens.org/datasets/movielens/ml-20m.zip",
        "cd245b17a1ae2cc31bb14903e1204af3",
        "ml-20m/ratings.csv",
        "csv",
    ),
}


def default_cache_dir() -> str:
    return os.environ.get("LIGHTNING_REC_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lightning_rec"))


def _copy_with_progress(src, dst, url: str, total: int) -> None:
    """``shutil.copyfileobj`` that prints a line at every tenth of a download over 20 MB (ml-20m.zip is 190 MB)."""
    done, shown = 0, 0
    for block in iter(lambda: src.read(1 << 20), b""):
        dst.write(block)
        done += len(block)
        if total > 20 << 20 and (tenth := done * 10 // total) > shown:
            shown = tenth
            print(f"downloading {url}: {done >> 20} / {total >> 20} MB", file=sys.stderr, flush=True)


def fetch(name: str, cache_dir: str | None = None, verify: bool = True) -> tuple[str, str]:
    """Return ``(path, format)`` of the dataset's interaction file, downloading it once.

    The archive is downloaded into ``cache_dir`` (atomically), its MD5 checked against
    the checksum GroupLens publishes,
    and the ratings member extracted next to it.
    """
    if name not in DATASETS:
        raise DataError(f"data.name: no download known for '{name}'; known: {', '.join(DATASETS)}")
    url, md5, member, fmt = DATASETS[name]
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, member)
    if os.path.exists(target):
        return target, fmt
    os.makedirs(cache_dir, exist_ok=True)
    archive = os.path.join(cache_dir, os.path.basename(url))
    if not os.path.exists(archive):
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
                _copy_with_progress(resp, out, url, int(resp.headers.get("Content-Length") or 0))
        except (urllib.error.URLError, OSError) as e:
            os.unlink(tmp)
            raise DataError(
                f"data={name}: could not download {url} ({getattr(e, 'reason', e)}); "
                f"pass data.path=<path to {os.path.basename(member)} or a 'user item' file> instead"
            ) from None
        if verify and (got := file_digest(tmp, "md5")) != md5:
            os.unlink(tmp)
            raise DataError(
                f"{url}: MD5 {got} does not match the published archive ({md5}); "
                "pass data.download_verify=false if the publisher changed the file"
            )
        os.replace(tmp, archive)
    elif verify and (got := file_digest(archive, "md5")) != md5:  # put there by hand, or by an older tool
        raise DataError(
            f"{archive}: MD5 {got} does not match the published archive ({md5}); delete it to download it again, "
            "or pass data.download_verify=false to use it as it is"
        )
    os.makedirs(os.path.dirname(target), exist_ok=True)
    part = f"{target}.part"
    try:
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, KeyError) as e:
        if os.path.exists(part):
            os.unlink(part)
        raise DataError(f"{archive}: not the expected archive ({type(e).__name__}: {e}); expected a zip holding "
                        f"{member}; delete it to download it again") from None
    os.replace(part, target)  # an interrupted extraction never leaves a truncated file behind
    return target, fmt
