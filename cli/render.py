"""Terminal output helpers: one console for stdout, one for errors, progress bars."""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Lines written to a pipe or file are as long as their content: no image path loses its name.
PIPED_WIDTH = 10_000


class OutputConsole(Console):
    """A rich console for results: the terminal's width on a terminal, ``PIPED_WIDTH`` otherwise.

    rich falls back to 80 columns (or the width of a terminal on another stream) when stdout is
    piped, which cut table cells such as image paths to "…". Decided at every print, so a
    redirected ``sys.stdout`` (tests, ``contextlib.redirect_stdout``) is seen as it is.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal or self.is_jupyter else ConsoleDimensions(PIPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = OutputConsole()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", markup=True, highlight=False)


def progress(transient: bool = False) -> Progress:
    """A progress bar on stderr (stdout stays clean for piping)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=transient,
    )
