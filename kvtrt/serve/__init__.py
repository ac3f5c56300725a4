"""`kvtrt serve`: an OpenAI-compatible HTTP server over the scheduler (FastAPI + uvicorn, `serve` extra).

    from kvtrt.serve import create_app
    app = create_app(kvtrt.load("smollm2", kv_memory="2GiB"), served_model_name="smollm2")

`kvtrt.serve.ray_app` holds the Ray Serve deployment (`ray` extra)."""

from __future__ import annotations

SERVE_EXTRA_HINT = "kvtrt serve needs FastAPI, uvicorn and prometheus-client: pip install 'kvtrt[serve]'"
RAY_EXTRA_HINT = "kvtrt serve --ray needs Ray Serve: pip install 'kvtrt[ray]'"


def missing_serve_dependencies() -> list[str]:
    """The `serve` extra's modules that are not importable (empty when all are there)."""
    import importlib.util

    return [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]


def __getattr__(name: str):
    if name in ("create_app", "ServerState"):
        missing = missing_serve_dependencies()
        if missing:
            raise ImportError(f"{SERVE_EXTRA_HINT} (missing: {', '.join(missing)})")
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
