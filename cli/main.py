"""Entry point: registers the commands and turns library errors into one stderr line."""

from __future__ import annotations

import sys

import typer

from regionclip.errors import RegionClipError

from .bench import bench
from .demo import demo
from .detect import detect
from .eval import eval_
from .render import err_console
from .shapes import make_shapes
from .train import train

app = typer.Typer(
    help="regionclip: open-vocabulary object detection with region-level CLIP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(detect)
app.command("bench")(bench)
app.command("eval")(eval_)
app.command("train")(train)
app.command("demo")(demo)
app.command("make-shapes")(make_shapes)


@app.callback()
def _root() -> None:
    """regionclip: open-vocabulary object detection with region-level CLIP."""


def main(argv: list[str] | None = None) -> None:
    """Console script: run the app; a ``RegionClipError`` becomes one line on stderr and its exit code."""
    try:
        app(args=argv, prog_name="regionclip")
    except RegionClipError as exc:
        err_console.print(f"error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
