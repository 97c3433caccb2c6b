"""Terminal output helpers: one console for stdout, one for errors, progress bars."""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

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


class _HelpTable(Table):
    """typer's options table, whose columns it makes as rows arrive: every column but the last
    (the help text) keeps its content whole. Left to rich, a narrow terminal shrank the widest
    columns alike, and at 80 columns option names came out as ``--score-thresho…``; now only the
    help text wraps, into the width the names leave, its long words folded rather than cut."""

    def add_row(self, *renderables, **kwargs) -> None:
        super().add_row(*renderables, **kwargs)
        for column in self.columns[:-1]:
            column.no_wrap = True
        if renderables:  # the help: a word longer than its column breaks rather than ends in "…"
            for part in getattr(renderables[-1], "renderables", [renderables[-1]]):  # typer puts Texts in Columns
                if isinstance(part, Text):
                    part.overflow = "fold"


class WholeNamesHelp:
    """A mixin for typer's command classes: ``--help`` prints option names whole at any width
    their own column fits in (``_HelpTable``)."""

    def format_help(self, ctx, formatter) -> None:
        from typer import rich_utils

        table, rich_utils.Table = rich_utils.Table, _HelpTable
        try:
            super().format_help(ctx, formatter)
        finally:
            rich_utils.Table = table
