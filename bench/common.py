"""Helpers shared by the benchmark scripts: machine description and BENCHMARKS.md appends."""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def run_main(main) -> None:
    """Run a benchmark's ``main``; this project's errors (bad option, missing data file) end in one line, exit 2."""
    try:
        from lightning_rec.cli import _quiet
        from lightning_rec.errors import LightningRecError

        _quiet()  # the CLI's warning filters, for benchmarks that call it in-process
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


def append(section: str, body: str) -> None:
    """Append a dated section to BENCHMARKS.md (and print it)."""
    text = (f"\n### {section}\n\n- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
            f"- machine: {machine()}\n- command: `{command()}`\n\n{body.strip()}\n")
    print(text, flush=True)
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "a") as f:
        f.write(text)


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
