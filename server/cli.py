"""The ``darkroom`` command."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from .config import load_settings


def _serve(args: argparse.Namespace) -> int:
    from .api.app import create_app

    settings = load_settings(args.config)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    settings.server.host, settings.server.port = host, port
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="darkroom", description="Darkroom image-generation server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the API and one worker per device")
    serve.add_argument("--config", help="YAML settings file (also DARKROOM_CONFIG)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
