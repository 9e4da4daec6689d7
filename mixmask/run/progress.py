"""The live training view on rank 0: a rich progress bar on a terminal, plain log lines elsewhere (CI, SLURM)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_stats(stats: dict[str, float]) -> str:
    """`loss 5.12 · λ 0.50 · 812 img/s · data 3% · lr 0.060` from a stats dict (keys that are present)."""
    parts = []
    for key in sorted(k for k in stats if k.startswith("loss")):
        parts.append(f"{key.replace('loss_', '')} {stats[key]:.3f}")
    for key in sorted(k for k in stats if k.startswith("lam_mean")):
        parts.append(f"λ{key.replace('lam_mean', '').replace('_', ' ')} {stats[key]:.2f}")
    if "images_per_s" in stats:
        parts.append(f"{stats['images_per_s']:.0f} img/s")
    if "data_wait" in stats:
        parts.append(f"data {100 * stats['data_wait']:.0f}%")
    if "lr" in stats:
        parts.append(f"lr {stats['lr']:.4g}")
    return " · ".join(parts)


class ProgressView:
    """Epoch/step progress with the latest stats on rank 0 (`show_steps`), and one-off messages there.

    Messages (resume, signals, kNN, outputs) print on rank 0 whatever `show_steps` says; other ranks print nothing.
    """

    def __init__(self, total_steps: int, *, is_main: bool, show_steps: bool = True, console: Console | None = None,
                 start_step: int = 0):
        self.is_main = is_main
        self.enabled = is_main and show_steps
        self.console = console or Console(stderr=True)
        self.live = self.enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._start = time.perf_counter()
        self._total = total_steps
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=self.console, transient=False)
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, epoch="-", stats="")
            self._progress.start()

    def update(self, step: int, epoch: int, epochs: int, stats: dict[str, float] | None = None) -> None:
        if not self.enabled:
            return
        text = format_stats(stats) if stats else None
        if self._progress is not None:
            fields = {"epoch": f"{epoch + 1}/{epochs}"}
            if text is not None:
                fields["stats"] = text
            self._progress.update(self._task, completed=step, **fields)
        elif text is not None:
            elapsed = time.perf_counter() - self._start
            self.console.print(f"epoch {epoch + 1}/{epochs} step {step}/{self._total} [{elapsed:.0f}s] {text}",
                               highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        if self.is_main:
            self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
