"""What a run shows while it computes: a rich progress bar over its trials on stderr, with
the arm being computed and an ETA (:class:`TrialProgress`), or nothing."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["TrialProgress"]


class TrialProgress:
    """A rich progress bar over trials (with ETA), or nothing."""

    def __init__(self, enabled: bool, total: int, done: int, title: str) -> None:
        self.bar = None
        self.done = done
        self.title = title
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("trials"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.start()
        self.task = self.bar.add_task(title, total=total, completed=done)

    def arm_callback(self, chunk_size: int, n_arms: int) -> Callable[[str, int], Callable[[int], None]] | None:
        bar = self.bar
        if bar is None:
            return None

        def progress(arm: str, total: int) -> Callable[[int], None]:
            bar.update(self.task, description=f"{arm:>6}")
            return lambda n: bar.advance(self.task, n / n_arms)

        return progress

    def chunk_done(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, description=self.title)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
