"""``regionclip serve``: detections over HTTP, for scripts and as a Label Studio ML backend.

``create_app(predictor)`` builds the FastAPI app (``app.py``); ``serve`` runs it with uvicorn.
Who may call it and how much a request may send: ``guard.py``. Needs the ``serve`` extra
(``pip install -e '.[serve]'`` in the checkout).
"""

from __future__ import annotations

from .guard import check_exposure


def serve(predictor, *, host: str = "127.0.0.1", port: int = 9090, api_key: str | None = None, **options) -> None:
    """Run the app on ``host:port`` until interrupted; ``options`` go to ``create_app``. Beyond
    loopback an ``api_key`` is required (``BadInput`` without one); without one, requests must
    name this machine in their Host header (DNS rebinding)."""
    from ..errors import BadInput

    check_exposure(host, api_key)
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as exc:
        raise BadInput(f"regionclip serve needs {exc.name}: pip install -e '.[serve]' in the checkout") from None

    app = create_app(predictor, api_key=api_key, local_hosts_only=api_key is None, **options)
    uvicorn.run(app, host=host, port=port, log_level="warning")
