"""``regionclip serve``: detections over HTTP, for scripts and as a Label Studio ML backend.

``create_app(predictor)`` builds the FastAPI app (``app.py``); ``serve`` runs it with uvicorn.
Needs the ``serve`` extra (``pip install 'regionclip[serve]'``).
"""

from __future__ import annotations


def serve(predictor, *, host: str = "127.0.0.1", port: int = 9090, **options) -> None:
    """Run the app on ``host:port`` until interrupted; ``options`` go to ``create_app``."""
    from ..errors import BadInput

    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as exc:
        raise BadInput(f"regionclip serve needs {exc.name}: pip install 'regionclip[serve]'") from None

    uvicorn.run(create_app(predictor, **options), host=host, port=port, log_level="warning")
