"""``regionclip serve``: the model behind HTTP (POST /detect, Label Studio's /setup, /predict, /health)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from regionclip.serve.guard import API_KEY_ENV

from . import options as O
from .render import err_console


@O.with_model_flags()
def serve(
    host: Annotated[str, typer.Option(help=(
        "Address to listen on (127.0.0.1: this machine only; any other needs --api-key)."))] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 9090,
    allow_paths: Annotated[bool, typer.Option("--allow-paths", help=(
        "Let clients name image files on this machine (POST /detect path=..., Label Studio tasks with paths) "
        "instead of uploading them. Off: anyone who reaches the port could read your images."))] = False,
    api_key: Annotated[Optional[str], typer.Option(envvar=API_KEY_ENV, help=(
        "A key every request must carry (Authorization: Bearer KEY, the basic-auth password, or X-API-Key). "
        "Required with a --host beyond this machine; prefer the environment variable (others can read a "
        "command line)."), show_default=False)] = None,
    label_studio_url: Annotated[Optional[str], typer.Option(envvar="LABEL_STUDIO_URL", help=(
        "Label Studio's URL, to fetch tasks' images from it (only from here: never from a request)."),
        show_default=False)] = None,
    label_studio_token: Annotated[Optional[str], typer.Option(envvar="LABEL_STUDIO_API_KEY", help=(
        "A Label Studio API token (legacy token) for fetching tasks' images; sent only to --label-studio-url."),
        show_default=False)] = None,
    max_batch: Annotated[int, typer.Option(help="Most images run in one batch (requests waiting together share one).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting; past it clients get 503 and retry.")] = 64,
    max_queue_mb: Annotated[float, typer.Option(help=(
        "Most MB of decoded images waiting or running; past it clients get 503 and retry."))] = 1000.0,
    max_labels: Annotated[int, typer.Option(help=(
        "Most texts one request may have embedded: labels, or a vocabulary's prompts, negatives and "
        "exemplars."))] = 256,
    max_mb: Annotated[float, typer.Option(help="Largest image file accepted, in MB.")] = 20.0,
    max_megapixels: Annotated[float, typer.Option(help="Largest image accepted, in megapixels.")] = 40.0,
    max_tiles: Annotated[int, typer.Option(help=(
        "Most windows one image may be cut into when a request asks for tiles (form field tile=PIXELS)."))] = 256,
    flags: O.ModelFlags = None,
) -> None:
    """Serve the model over HTTP until Ctrl-C: POST /detect, and a Label Studio ML backend."""
    from regionclip.serve import check_exposure, serve as run
    from regionclip.serve.app import Limits

    for name, value in (("--port", port), ("--max-batch", max_batch), ("--max-queue", max_queue),
                        ("--max-queue-mb", max_queue_mb), ("--max-labels", max_labels), ("--max-mb", max_mb),
                        ("--max-megapixels", max_megapixels), ("--max-tiles", max_tiles)):
        O.check_positive(name, value)
    check_exposure(host, api_key)  # before the model loads
    limits = Limits(max_bytes=int(max_mb * 1e6), max_pixels=int(max_megapixels * 1e6), max_labels=max_labels,
                    max_tiles=max_tiles)
    model = O.build_model(flags)
    err_console.print(f"serving {flags.model} on http://{host}:{port} (Ctrl-C to stop)", markup=False)
    run(model.predictor, host=host, port=port, model_name=flags.model, limits=limits, allow_paths=allow_paths,
        label_studio_url=label_studio_url, label_studio_token=label_studio_token, api_key=api_key,
        max_batch=max_batch, max_queue=max_queue, max_queue_bytes=int(max_queue_mb * 1e6))
