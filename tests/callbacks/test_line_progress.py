"""Without a terminal, progress is whole lines and the per-epoch metric line starts a line of its own."""

import io
import os
import re
import subprocess
import sys

from conftest import tiny
from pytorch_lightning.callbacks import TQDMProgressBar

from lightning_rec.build import lines_without_a_terminal
from lightning_rec.callbacks.line_progress import LineProgressBar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_is_swapped_only_without_a_terminal():
    bar, other = TQDMProgressBar(), object()
    assert lines_without_a_terminal([bar, other], _Tty()) == [bar, other]
    swapped = lines_without_a_terminal([bar, other], io.StringIO())
    assert isinstance(swapped[0], LineProgressBar) and swapped[1] is other


def test_a_log_file_gets_clean_lines(tmp_path):
    # as `fit ... > train.log 2>&1` writes it; every_s=0: a line per batch, so a tiny run prints some
    args = [a for a in tiny(tmp_path, epochs=2) if a != "trainer.enable_progress_bar=false"]
    args += ["data.synthetic.num_users=400", "callbacks.progress_bar._target_=lightning_rec.callbacks.LineProgressBar",
             "~callbacks.progress_bar.refresh_rate", "+callbacks.progress_bar.every_s=0"]
    p = subprocess.run([sys.executable, "-m", "lightning_rec", "fit", *args], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    log = p.stdout + p.stderr
    assert "\r" not in log
    assert re.search(r"(?m)^epoch 0 \| step \d+ \| train/loss=", log) and re.search(r"(?m)^epoch 1 \| ", log)
    assert re.search(r"(?m)^train epoch 0: \d+/\d+ batches \(\d+%\) \| [\d.]+ it/s", log)
    assert re.search(r"(?m)^validation done \(epoch 1, step \d+\)$", log)
