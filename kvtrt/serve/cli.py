"""The `kvtrt serve` subcommand (parser and command); `kvtrt.cli` adds it next to the others."""

from __future__ import annotations

import argparse
import sys

from . import RAY_EXTRA_HINT, SERVE_EXTRA_HINT, missing_serve_dependencies

DESCRIPTION = """\
Serve an export over the OpenAI API with continuous batching:
  POST /v1/chat/completions, POST /v1/completions (stream: true for Server-Sent Events),
  GET /v1/models, GET /health (200 once the model is loaded), GET /metrics (Prometheus, kvtrt:*).
Requests accept the OpenAI fields (model, messages/prompt, max_tokens, max_completion_tokens,
temperature, top_p, seed, stop, stream, stream_options, n=1) and the extensions top_k and kv
(a KV spec for that request). SIGTERM stops accepting connections, lets the requests in flight
finish (up to --drain-timeout seconds) and exits 0. With --ray, N Ray Serve replicas each run
their own scheduler behind Ray Serve's HTTP proxy ($RAY_ADDRESS picks an existing cluster)."""


def add_serve_parser(sub, kv_help: str = "KV spec of requests that send no `kv` field (default full)") -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn; --ray for Ray Serve replicas)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="export folder made by `kvtrt export`")
    p.add_argument("--kv", default="full", help="default KV spec for requests without a `kv` field. " + kv_help)
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="cap on the KV bytes of all running requests together, e.g. 2GiB or 512MiB (default: no "
                        "cap); requests wait in FIFO order until their worst case fits, one that can never fit "
                        "gets a 400")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="waiting requests beyond which new ones get 429 with Retry-After (default: unbounded)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="most sequences per decode call (default: the runtime's, 32)")
    p.add_argument("--prefix-cache", default=None, metavar="SIZE",
                   help="KV bytes of finished conversations kept so a chat's next turn prefills only what is new "
                        "(default: the runtime's, 512MiB; 0 turns it off; evicted first under --kv-memory)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1/* (401 otherwise); /health and /metrics stay open")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the export folder's name)")
    p.add_argument("--threads", type=int, default=None,
                   help="engine intra-op threads (default: all cores; with --ray, per replica)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may run before they are cancelled (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info; `warning` drops the access log)")
    p.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: --replicas copies, each with its own scheduler (needs kvtrt[ray]); "
                        "uses the cluster at $RAY_ADDRESS, else starts a local Ray instance")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: number of replicas (default 1)")
    p.add_argument("--replica-cpus", type=float, default=None, metavar="CPUS",
                   help="with --ray: CPUs Ray reserves per replica (default 1)")
    p.set_defaults(func=cmd_serve)
    return p


def check_serve_extras(ray: bool = False) -> None:
    """Fail at once, before loading anything, when an extra the command needs is missing."""
    missing = missing_serve_dependencies()
    if missing:
        raise RuntimeError(f"{SERVE_EXTRA_HINT} (missing: {', '.join(missing)})")
    if ray:
        import importlib.util

        if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
            raise RuntimeError(RAY_EXTRA_HINT)


def cmd_serve(args) -> int:
    check_serve_extras(args.ray)
    if args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    if args.replicas > 1 and not args.ray:
        raise ValueError("--replicas needs --ray (one process serves one scheduler; Ray Serve runs several)")
    from pathlib import Path

    if not (Path(args.dir) / "manifest.json").is_file():
        raise FileNotFoundError(f"{args.dir} is not an export folder (no manifest.json); make one with `kvtrt export`")
    options = dict(kv=args.kv, kv_memory=args.kv_memory, max_queue=args.max_queue, threads=args.threads,
                   served_model_name=args.served_model_name, api_key=args.api_key, max_batch=args.max_batch,
                   prefix_cache=args.prefix_cache)
    if args.ray:
        from .ray_app import run_ray

        return run_ray(args.dir, replicas=args.replicas, host=args.host, port=args.port,
                       drain_timeout=args.drain_timeout, num_cpus=args.replica_cpus, **options)
    from .server import run_server

    return run_server(args.dir, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
                      log_level=args.log_level, **options)


def main(argv: list[str] | None = None) -> int:
    """`python -m kvtrt.serve.cli DIR ...` (the same as `kvtrt serve DIR ...`)."""
    from ..cli import main as kvtrt_main

    return kvtrt_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
