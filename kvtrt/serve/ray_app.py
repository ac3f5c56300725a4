"""Scale-out on Ray Serve: N replicas of the same OpenAI app, one kvtrt scheduler each.

Ray Serve's HTTP proxy routes `/v1/*`, `/health` and `/metrics` to the replicas (`@serve.ingress`);
each replica loads the export and runs its own scheduler. Nothing in kvtrt coordinates machines:
the same application runs on a laptop's local Ray or on a multi-node cluster.

    kvtrt serve DIR --ray --replicas 2                       # local Ray (or $RAY_ADDRESS's cluster)
    serve run kvtrt.serve.ray_app:build_app directory=DIR replicas=2 kv=full
    KVTRT_SERVE_DIR=DIR serve run kvtrt.serve.ray_app:app    # configured by environment variables
    serve deploy config.yaml                                 # import_path: kvtrt.serve.ray_app:build_app

Arguments (as `build_app` args, `serve run` key=value pairs, or KVTRT_SERVE_<NAME> environment
variables for `app`): directory (required; the export must be readable on every node), kv,
kv_memory, max_queue, threads (engine threads per replica), max_batch, prefix_cache, served_model_name,
api_key,
replicas, num_cpus (per replica), max_ongoing_requests (per replica), drain_timeout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - exercised without the extra
    from . import RAY_EXTRA_HINT

    raise ImportError(RAY_EXTRA_HINT) from exc

# the replica's state: each replica is its own Ray actor process, so a module global is per replica
_REPLICA: dict[str, Any] = {}


def _replica_asgi_app():
    """Called by Ray Serve inside each replica after `KvtrtReplica.__init__` loaded the model."""
    from .app import create_app

    return create_app(_REPLICA["llm"], served_model_name=_REPLICA["name"], api_key=_REPLICA["api_key"],
                      close_on_shutdown=True)


@serve.deployment(name="kvtrt", max_ongoing_requests=64, graceful_shutdown_timeout_s=30,
                  health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(_replica_asgi_app)
class KvtrtReplica:
    """One replica: loads the export with its own scheduler; the routes are `kvtrt.serve.app`'s."""

    def __init__(self, directory: str, kv: str = "full", kv_memory: str | int | None = None,
                 max_queue: int | None = None, threads: int | None = None, served_model_name: str | None = None,
                 api_key: str | None = None, max_batch: int | None = None, prefix_cache: str | int | None = None):
        # Ray may pickle this class by value; the imported module's globals are the replica's real ones
        from kvtrt import load
        from kvtrt.serve import ray_app
        from kvtrt.serve.server import load_kwargs

        ray_app._REPLICA["llm"] = load(directory, **load_kwargs(kv, kv_memory, max_queue, threads, max_batch, prefix_cache))
        ray_app._REPLICA["name"] = served_model_name or Path(directory).resolve().name
        ray_app._REPLICA["api_key"] = api_key

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica without a model is restarted."""
        from kvtrt.serve import ray_app

        if ray_app._REPLICA.get("llm") is None:
            raise RuntimeError("the replica has no model loaded")


_INT_ARGS = ("replicas", "max_queue", "threads", "max_ongoing_requests", "max_batch")
_FLOAT_ARGS = ("num_cpus", "drain_timeout")


def build_app(args: dict[str, Any]):
    """The Ray Serve application (an application builder: `serve run kvtrt.serve.ray_app:build_app k=v ...`)."""
    args = dict(args)
    directory = args.pop("directory", None) or args.pop("dir", None)
    if not directory:
        raise ValueError("build_app needs directory=EXPORT_DIR (the folder made by `kvtrt export`)")
    for key in _INT_ARGS:
        if args.get(key) is not None:
            args[key] = int(args[key])
    for key in _FLOAT_ARGS:
        if args.get(key) is not None:
            args[key] = float(args[key])
    replicas = args.pop("replicas", None) or 1
    num_cpus = args.pop("num_cpus", None)
    max_ongoing = args.pop("max_ongoing_requests", None) or 64
    drain = args.pop("drain_timeout", None) or 30.0
    unknown = set(args) - {"kv", "kv_memory", "max_queue", "threads", "served_model_name", "api_key", "max_batch",
                          "prefix_cache"}
    if unknown:
        raise ValueError(f"unknown kvtrt Ray Serve argument(s): {', '.join(sorted(unknown))}")
    options: dict[str, Any] = dict(num_replicas=replicas, max_ongoing_requests=max_ongoing,
                                   graceful_shutdown_timeout_s=drain)
    if num_cpus is not None:
        options["ray_actor_options"] = {"num_cpus": num_cpus}
    return KvtrtReplica.options(**options).bind(str(directory), **{k: v for k, v in args.items() if v is not None})


def args_from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """build_app arguments from KVTRT_SERVE_* environment variables (KVTRT_SERVE_DIR is required)."""
    environ = os.environ if environ is None else environ
    names = ("directory", "kv", "kv_memory", "max_queue", "threads", "served_model_name", "api_key", "replicas",
             "num_cpus", "max_ongoing_requests", "drain_timeout", "max_batch", "prefix_cache")
    out = {name: environ[f"KVTRT_SERVE_{name.upper()}"] for name in names if f"KVTRT_SERVE_{name.upper()}" in environ}
    if "KVTRT_SERVE_DIR" in environ:
        out.setdefault("directory", environ["KVTRT_SERVE_DIR"])
    return out


def __getattr__(name: str):
    # `serve run kvtrt.serve.ray_app:app`: built on first access from the environment, so importing the
    # module (as Ray does in every worker) needs no configuration
    if name == "app":
        return build_app(args_from_env())
    raise AttributeError(name)


def run_ray(directory: str, *, replicas: int = 1, host: str = "127.0.0.1", port: int = 8000,
            drain_timeout: float = 30.0, num_cpus: float | None = None, **kwargs: Any) -> int:
    """`kvtrt serve --ray`: deploy on $RAY_ADDRESS's cluster, or on a local Ray instance started here,
    then block until SIGTERM/SIGINT and shut the application down (replicas drain for `drain_timeout`)."""
    import signal
    import sys
    import threading

    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        application = build_app({"directory": directory, "replicas": replicas, "num_cpus": num_cpus,
                                 "drain_timeout": drain_timeout, **kwargs})
        serve.run(application, name="kvtrt", route_prefix="/")
        print(f"kvtrt serve: {replicas} Ray Serve replica(s) of {directory} on http://{host}:{port}/v1 "
              f"({'cluster ' + address if address else 'local Ray'}); Ctrl-C or SIGTERM stops", file=sys.stderr,
              flush=True)
        while not stop.wait(1.0):
            pass
        serve.delete("kvtrt")
        if not address:
            serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
    return 0
