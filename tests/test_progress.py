"""Progress for logs: periodic lines, never carriage-return redraws, when the output is not a terminal."""

from __future__ import annotations

import io

from mbv3_dense.training.progress import LineProgressBar, progress, progress_bar_for


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_is_lines_and_passes_every_item() -> None:
    log = io.StringIO()
    assert list(progress(range(7), desc="eval", unit="img", every_n_seconds=0.0, stream=log)) == list(range(7))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0].startswith("[eval] 1/7 (14%) img") and lines[-1].startswith("[eval] 7/7 (100%) img")
    assert len(lines) == 8  # one per item at every_n_seconds=0, and the closing line


def test_progress_on_a_terminal_is_the_tqdm_bar() -> None:
    screen = Terminal()
    assert list(progress(range(3), desc="eval", stream=screen)) == [0, 1, 2]
    assert "\r" in screen.getvalue() and "eval" in screen.getvalue()


def test_trainer_gets_lines_only_when_not_on_a_terminal() -> None:
    assert isinstance(progress_bar_for(io.StringIO()), LineProgressBar)
    assert progress_bar_for(Terminal()) is None
