"""`sdlab serve`: the A1111-compatible API and web page on uvicorn.

Safety checks run before anything heavy is imported: a non-loopback address needs an API key
(or --insecure), and the port is bound up front so a busy port is one clear line, not a
traceback after the model has loaded.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

from sdlab.errors import InputError

API_KEY_ENV = "SDLAB_API_KEY"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API compatible with AUTOMATIC1111's, and a web page",
                       description="Serve the A1111 /sdapi/v1 API, OpenAPI docs at /docs and a "
                                   "web page at / . Jobs run one at a time, first in first out.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--model", default="shapes",
                   help="embedded name (shapes, shapes-fast), model folder, .safetensors file "
                        "or cached hub id (default: shapes)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding to load (repeatable; diffusers or A1111 format)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="LoRA to fuse into every model the server loads (repeatable; diffusers "
                        "or kohya keys; weight default 1)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV}; "
                        "the environment keeps it out of the process list)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="largest width*height per image (default 1048576)")
    p.add_argument("--max-batch", type=_positive_int, default=None,
                   help="most images per request, batch_size*n_iter (default 16)")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="most denoising steps per request (default 150)")
    p.set_defaults(func=cmd_serve)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    if not is_loopback(host) and not api_key and not insecure:
        raise InputError(f"refusing to serve on {host} without --api-key: anyone who can reach "
                         f"it could use it (give --api-key KEY, or --insecure to allow this)")


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_exposure(args.host, api_key, args.insecure)
    sock = bind(args.host, args.port)

    import uvicorn

    from sdlab.components import quiet_library_logs
    from sdlab.server.app import LOOPBACK_HOSTS, create_app
    from sdlab.server.schemas import Limits
    quiet_library_logs()
    given = {"max_pixels": args.max_pixels, "max_batch": args.max_batch,
             "max_steps": args.max_steps}
    limits = Limits(**{k: v for k, v in given.items() if v is not None})
    app = create_app(args.model, api_key=api_key, limits=limits, device=args.device,
                     trusted_hosts=LOOPBACK_HOSTS if is_loopback(args.host) else None,
                     embeddings=args.embedding, loras=args.lora)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"sdlab: serving {app.state.worker.checkpoint} on http://{shown}:{port}/ "
          f"(API docs at /docs){' with an API key' if api_key else ''}", file=sys.stderr,
          flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    return 0
