"""Entry point: registers the commands and turns library errors into one stderr line.

Importing this module must not import torch (``regionclip --help`` stays fast; tested): the
commands import torch-using library modules inside their functions.
"""

from __future__ import annotations

import sys

import typer

# First regionclip import: the package sets OMP_WAIT_POLICY=PASSIVE before anything loads torch.
from regionclip.errors import RegionClipError

from .bench import bench
from .calibrate import calibrate
from .convert import convert
from .demo import demo
from .detect import detect
from .eval import eval_
from .export import export
from .importer import import_
from .label import label
from .options import Command, Group
from .render import err_console
from .serve import serve
from .shapes import make_shapes
from .train import train

app = typer.Typer(
    help="regionclip: open-vocabulary object detection with region-level CLIP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=Group,
)
app.command(cls=Command)(detect)
app.command("bench", cls=Command)(bench)
app.command("eval", cls=Command)(eval_)
app.command("train", cls=Command)(train)
app.command("demo", cls=Command)(demo)
app.command("make-shapes", cls=Command)(make_shapes)
app.command("import", cls=Command)(import_)
app.command("export", cls=Command)(export)
app.command("convert", cls=Command)(convert)
app.command("calibrate", cls=Command)(calibrate)
app.command("serve", cls=Command)(serve)
app.command("label", cls=Command)(label)


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
