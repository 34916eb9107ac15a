"""Progress bars (rich) for long work: images done, images per second, time left."""
from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


class ImageProgress:
    """``with ImageProgress("extract", total) as bar: bar.advance(n)``; silent if disabled."""

    def __init__(self, description: str, total: int, *, unit: str = "img", enabled: bool = True):
        self._progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
            RateColumn(unit), TimeRemainingColumn(),
        ) if enabled else None
        self._description, self._total = description, total

    def __enter__(self) -> "ImageProgress":
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=self._total)
        return self

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, completed: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed)

    def describe(self, text: str) -> None:
        """Replace the bar's description (e.g. with the images/s of each node)."""
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
