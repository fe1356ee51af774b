"""The ``darkroom`` command."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from .config import load_settings


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _serve(args: argparse.Namespace) -> int:
    from .api.app import create_app

    settings = load_settings(args.config)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    settings.server.host, settings.server.port = host, port
    _logging(settings.server.log_level)
    runtime = None
    if args.command == "api":
        from .api.runtime import Runtime

        if settings.queue.backend != "redis":
            logging.getLogger(__name__).error(
                "darkroom api needs queue.backend: redis (its jobs run in `darkroom worker` processes)")
            return 2
        runtime = Runtime.build(settings, with_workers=False)
    # On SIGTERM uvicorn stops accepting, finishes the in-flight responses, then shuts the app down.
    uvicorn.run(create_app(settings, runtime), host=host, port=port, log_config=None, access_log=False)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .worker_process import run_worker

    settings = load_settings(args.config)
    if args.health_port is not None:
        settings.worker.health_port = args.health_port
    _logging(settings.server.log_level)
    return run_worker(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="darkroom", description="Darkroom image-generation server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the API and one worker per device")
    serve.add_argument("--config", help="YAML settings file (also DARKROOM_CONFIG)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.set_defaults(func=_serve)
    api = commands.add_parser("api", help="serve the API only; jobs go to workers through Redis")
    api.add_argument("--config", help="YAML settings file (also DARKROOM_CONFIG)")
    api.add_argument("--host", help="bind address (default 127.0.0.1)")
    api.add_argument("--port", type=int, help="port (default 8000)")
    api.set_defaults(func=_serve)
    worker = commands.add_parser("worker", help="run jobs from Redis on this machine's devices (no API)")
    worker.add_argument("--config", help="YAML settings file (also DARKROOM_CONFIG)")
    worker.add_argument("--health-port", type=int, help="port of /health and /ready (worker.health_port)")
    worker.set_defaults(func=_worker)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
