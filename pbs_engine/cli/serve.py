"""`pbs-engine serve`: the OpenAI-compatible HTTP server (completions, chat, models, health, metrics).

The address is checked before the model loads, and the "ready" line comes once the server listens."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from pbs_engine.cli.common import add_model_args, load_llm
from pbs_engine.engine.model_source import DEFAULT_MODEL


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve POST /v1/completions, POST /v1/chat/completions, GET /v1/models, "
                                   "GET /health and GET /metrics (Prometheus).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("PBS_ENGINE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $PBS_ENGINE_API_KEY, else open)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients pass as `model` (default: --model, or the embedded model's alias)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests allowed to wait for their first token; more get 503 (default: 256)")
    p.add_argument("--max-request-bytes", type=int, default=32 << 20,
                   help="largest request body accepted; larger ones get 413 (default: 32 MiB)")
    p.add_argument("--verbose", "-v", action="store_true", help="log every HTTP request")
    add_model_args(p)
    p.set_defaults(func=run)


def served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return DEFAULT_MODEL
    path = Path(args.model)
    return path.name if path.exists() else args.model


def check_address(host: str, port: int) -> None:
    """Fail at once, not after loading the model, when host:port cannot be listened on (busy, or no such address)."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port {port} is not a TCP port")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from e


def run(args: argparse.Namespace) -> int:
    check_address(args.host, args.port)
    import uvicorn

    from pbs_engine.server import create_app

    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty (or PBS_ENGINE_API_KEY is set to nothing): give a key, or leave both "
                         "out to serve without authentication")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes {args.max_request_bytes} must be >= 1")
    llm = load_llm(args)
    name = served_name(args)
    app = create_app(llm, name, api_key=args.api_key, max_queue=args.max_queue,
                     max_request_bytes=args.max_request_bytes)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1]  # the real one when --port 0
                print(f"pbs-engine: ready: serving {name!r} at http://{args.host}:{port}/v1"
                      f"{' (API key required)' if args.api_key else ''}", file=sys.stderr, flush=True)

    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                          access_log=args.verbose)).run()
    return 0
