"""Helpers shared by the benchmark scripts: machine description, log entries and result records.

``append(topic, section, body)`` adds a dated section to the log ``docs/log/<topic>.md``;
``record(topic, **fields)`` adds one measured row to ``bench/results/<topic>.jsonl``, from which
``bench/report.py`` writes the results tables of README.md and docs/results.md."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import sys
import time
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
LOG_DIR = os.path.join(ROOT, "docs", "log")
RESULTS_DIR = os.path.join(ROOT, "bench", "results")
TOPICS = ("quality_ml1m", "throughput", "stackrec", "rocket", "optim_switch", "topk", "federated", "loading", "scale", "serving")


def run_main(main) -> None:
    """Run a benchmark's ``main``; this project's errors (bad option, missing data file) end in one line, exit 2."""
    try:
        from lightning_rec.errors import LightningRecError
        from lightning_rec.runs import quiet

        quiet()  # the CLI's warning filters, for benchmarks that call it in-process
    except ImportError:  # e.g. the RecBole side runs in its own environment
        LightningRecError = ()  # noqa: N806
    try:
        main()
    except LightningRecError as e:
        hint = ""
        if SHARED_DATA in str(e) and not os.path.isdir(SHARED_DATA):
            hint = f" (the default data folder {SHARED_DATA} is missing: pass --data PATH)"
        print(f"error: {e}{hint}", file=sys.stderr, flush=True)
        sys.exit(2)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def slug(title: str) -> str:
    """The anchor of a ``### title`` heading, as GitHub and the docs site (pymdownx.slugs, lower case) make it."""
    text = re.sub(r"</?[^>]*>", "", unicodedata.normalize("NFC", title.replace("`", ""))).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _topic(topic: str) -> str:
    if topic not in TOPICS:
        raise ValueError(f"topic={topic!r}: expected one of {', '.join(TOPICS)}")
    return topic


def append(topic: str, section: str, body: str) -> str:
    """Append a dated section to the log ``docs/log/<topic>.md`` (and print it); returns its link
    ``docs/log/<topic>.md#<anchor>`` for :func:`record`. A title the log already has gets the date (and, if
    that is taken too, a number), so every anchor stays unique."""
    date = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    path = os.path.join(LOG_DIR, f"{_topic(topic)}.md")
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    taken = {slug(t) for t in re.findall(r"(?m)^#{1,6} (.+?)\s*$", old)}
    title, n = section, 1
    while slug(title) in taken:
        n += 1
        title = f"{section} ({date})" if n == 2 else f"{section} ({date}, {n - 1})"
    text = (f"\n### {title}\n\n- date: {date} UTC\n"
            f"- machine: {machine()}\n- command: `{command()}`\n\n{body.strip()}\n")
    print(text, flush=True)
    os.makedirs(LOG_DIR, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text.replace("](docs/", "](../"))  # the scripts link plots from the repository root
    return f"docs/log/{topic}.md#{slug(title)}"


def record(topic: str, **fields) -> dict:
    """Append one measured row to ``bench/results/<topic>.jsonl`` and return it.

    Fields as in the existing records: ``target`` (what is measured against a goal), ``setting``, ``metric``,
    ``value``, ``baseline`` and ``baseline_of`` (what it is compared with), ``ratio``, ``goal``, ``met``,
    ``log`` (the link :func:`append` returned) and ``headline`` (true: the row also goes into README's table).
    ``date``, ``machine`` and ``command`` are added unless given. Run ``python bench/report.py`` afterwards
    to rewrite the tables."""
    row = dict(fields)
    row.setdefault("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    row.setdefault("machine", machine())
    row.setdefault("command", command())
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{_topic(topic)}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return row


def finish_ndcg_plot(fig, ax, path: str, title: str, target: float, target_label: str, legend_size: int = 8) -> None:
    """Target line, axes of a validation-NDCG@10-against-time plot, title, legend; saved to ``path``."""
    import textwrap

    ax.axhline(target, color="gray", ls="--", lw=1, label=target_label)
    ax.set_xlabel("training wall-clock time (min)")
    ax.set_ylabel("validation NDCG@10 (full ranking)")
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
