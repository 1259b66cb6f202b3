"""The documentation is checked like code: the site (mkdocs.yml, docs/) builds in strict mode, every command that
README.md and docs/ print composes (its config groups and options exist; a renamed option or a typo fails here),
README.md stays short, its results tables are what bench/report.py makes of bench/results/*.jsonl, and the
user-facing pages carry no tracker language.

Commands are read from ```bash blocks and from inline code spans: every ``python -m lightning_rec ...`` (also after
``torchrun``/``srun`` and ``&&``) and ``lightning-rec ...``; ``<...>`` placeholders become a file name. Running
them is the job of the feature tests. The benchmark log (docs/log/) is history: its commands are what was run
then, so they are not composed."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

from lightning_rec.cli import run

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
LOG = os.path.join(DOCS, "log")
README_MAX_BYTES = 10_752  # 10.5 KB


def user_pages() -> list[str]:
    """README.md and every page of docs/ but the log."""
    pages = sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))
    return [README] + [p for p in pages if not p.startswith(LOG + os.sep)]


def log_pages() -> list[str]:
    return sorted(glob.glob(os.path.join(LOG, "*.md")))


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


COMMAND = re.compile(r"(?:^|\s)(?:python3? )?-m lightning_rec (.*)$|^lightning-rec (.*)$")


def _commands_in(line: str) -> list[str]:
    out = []
    for part in line.split("&&"):
        m = COMMAND.search(part.strip())
        if m:
            out.append((m.group(1) or m.group(2)).strip())
    return out


def page_commands(path: str) -> list[str]:
    text = open(path, encoding="utf-8").read()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            cmds += _commands_in(line.strip())
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if span.startswith(("python -m lightning_rec ", "lightning-rec ")):
            cmds += _commands_in(span)
    return cmds


COMMANDS = [(rel(p), c) for p in user_pages() for c in page_commands(p)]


def test_the_docs_have_commands_for_every_command():
    assert len(COMMANDS) >= 60
    assert {c.split()[0] for _, c in COMMANDS} >= {"fit", "test", "predict", "stack", "export", "serve", "federate"}
    readme = {c.split()[0] for p, c in COMMANDS if p == "README.md"}
    assert readme >= {"fit", "predict", "federate"}


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}: {c}" for p, c in COMMANDS])
def test_a_documented_command_composes(page, command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a for a in shlex.split(re.sub(r"<[^>]*>", "placeholder", command), comments=True) if a != "&"]
    if "sweep.dir=runs/sweep/placeholder" in args:  # continuing a sweep reads its folder: the option is known
        with pytest.raises(Exception, match="no sweep.json there"):
            run(args + ["--cfg"])
        return
    with contextlib.redirect_stdout(io.StringIO()) as out:
        run(args + ["--cfg"])
    assert out.getvalue().strip(), f"{page}: {command}"


def test_the_site_builds_in_strict_mode(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f",
                          os.path.join(ROOT, "mkdocs.yml"), "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "results" / "index.html").exists()


def test_every_page_is_in_the_nav():
    nav = open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8").read()
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M))
    pages = {os.path.relpath(p, DOCS).replace(os.sep, "/")
             for p in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)}
    assert pages <= listed, sorted(pages - listed)


def test_the_readme_is_short():
    size = os.path.getsize(README)
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to docs/ (at most {README_MAX_BYTES})"


def test_the_readme_keeps_the_quick_start_commands():
    text = open(README, encoding="utf-8").read()
    assert "pip install torch==2.13.0 && pip install -e . && python -m lightning_rec fit\n" in text
    # .ci/run runs this exact line
    assert 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest\n' in text


def test_the_results_tables_match_the_records():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_report_check_catches_a_stale_table_and_a_broken_link(tmp_path):
    import shutil

    for name in ("README.md", os.path.join("docs", "results.md")):
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "bench", "results"), tmp_path / "bench" / "results")
    shutil.copytree(LOG, tmp_path / "docs" / "log")
    report = [sys.executable, os.path.join(ROOT, "bench", "report.py"), "--check", "--root", str(tmp_path)]
    assert subprocess.run(report, capture_output=True, text=True).returncode == 0
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("| yes |", "| YES |", 1))
    out = subprocess.run(report, capture_output=True, text=True)
    assert out.returncode == 1 and "README.md" in out.stderr
    shutil.copy(README, readme)
    log = tmp_path / "docs" / "log" / "topk.md"
    log.write_text(re.sub(r"(?m)^### ", "### renamed ", log.read_text()))
    out = subprocess.run(report, capture_output=True, text=True)
    assert out.returncode == 1 and "no heading with that anchor" in out.stderr


# what only a tracker means: "issue #6", "the issue's target", "#6's", "SPEC", "section 5"
TRACKER = re.compile(r"\b[Ii]ssues? ?#\d|\b[Ii]ssue's\b|\bSPEC\b|\b[Ss]ection \d|(?<![\w&/#])#\d+\b")
TRACKER_IN_LOG = re.compile(r"\b[Ii]ssues? ?#\d|\bSPEC\b|(?<![\w&/#])#\d+'s\b")


def _tracker_hits(paths: list[str], pattern: re.Pattern) -> list[str]:
    hits = []
    for path in paths:
        text = re.sub(r"\]\([^)]*\)", "]()", open(path, encoding="utf-8").read())  # link targets are no prose
        for n, line in enumerate(text.splitlines(), 1):
            hits += [f"{rel(path)}:{n}: {m.group(0)!r} in {line.strip()[:100]!r}" for m in pattern.finditer(line)]
    return hits


def test_no_tracker_language_in_the_user_docs():
    hits = _tracker_hits(user_pages(), TRACKER)
    assert not hits, "\n".join(hits)


def test_no_issue_numbers_in_the_log():
    hits = _tracker_hits(log_pages(), TRACKER_IN_LOG)
    assert not hits, "\n".join(hits)


def test_the_tracker_pattern_catches_what_it_should():
    for s in ("see issue #6", "Issue #2", "the issue's setting", "SPEC section 5", "#6's target", "(#6)"):
        assert TRACKER.search(s), s
    for s in ("results.md#top-k-averaging", "a known issue", "&#8212;", "Section: Data", "HR@10", "rank #"):
        assert not TRACKER.search(s), s


@pytest.mark.parametrize("path", log_pages(), ids=lambda p: os.path.basename(p))
def test_log_titles_are_unique(path):
    titles = re.findall(r"(?m)^#{1,6} (.+?)\s*$", open(path, encoding="utf-8").read())
    dup = sorted({t for t in titles if titles.count(t) > 1})
    assert not dup, dup


def test_benchmarks_index_points_at_every_log():
    text = open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8").read()
    for path in log_pages():
        assert f"docs/log/{os.path.basename(path)}" in text, path
    assert len(text) < 5000, "BENCHMARKS.md is an index; entries go to docs/log/<topic>.md"
