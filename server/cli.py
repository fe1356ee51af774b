"""The ``darkroom`` command: the one place that puts a process together.

``serve`` runs the API with one worker per device (server/api/, server/worker/wiring.py); ``api`` runs the API
alone on the Redis queue and never imports torch; ``worker`` runs Redis workers (server/worker/process.py);
``pull`` and ``models`` manage weights (server/models_cli.py). Each side is imported only by its command.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

import uvicorn

from . import __version__
from .config import Settings, load_settings

log = logging.getLogger(__name__)


def _logging(level: str, fmt: str = "text") -> None:
    from .logs import configure

    configure(level, fmt)


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    settings.server.host, settings.server.port = host, port
    _logging(settings.server.log_level, settings.server.log_format)
    refusal = listen_refusal(settings)
    if refusal:
        log.error("%s", refusal)
        return 2
    if args.command == "api":
        if settings.queue.backend != "redis":
            logging.getLogger(__name__).error(
                "darkroom api needs queue.backend: redis (its jobs run in `darkroom worker` processes)")
            return 2
        workers = None  # an API pod: torch and diffusers are never imported
    elif not _weights_ready(settings):
        return 2
    else:
        log_torch(settings)
        from .worker.wiring import serve_workers  # the engine side: torch and diffusers

        workers = serve_workers
    from .api.app import create_app
    from .api.http import uvicorn_options
    from .api.runtime import Runtime

    app = create_app(settings, Runtime.build(settings, workers))
    base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    docs = f", API docs {base}/docs" if settings.server.api_docs else ""
    log.info("darkroom %s on %s: playground %s/playground%s", __version__, base, base, docs)
    # On SIGTERM uvicorn stops accepting, finishes the in-flight responses, then shuts the app down.
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False,
                **uvicorn_options(settings.server))
    return 0


def _worker(args: argparse.Namespace) -> int:
    from .worker.process import run_worker

    settings = load_settings(args.config)
    if args.health_port is not None:
        settings.worker.health_port = args.health_port
    _logging(settings.server.log_level, settings.server.log_format)
    if not _weights_ready(settings):
        return 2
    log_torch(settings)
    return run_worker(settings)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def listen_refusal(settings: Settings) -> str | None:
    """Why ``darkroom serve`` / ``api`` must not start on ``settings.server.host``, or None.

    Listening on an address other than loopback with no API key configured anywhere (``server.api_keys``,
    ``auth.keys``, ``auth.keys_file``) would let anyone who reaches it generate images; that needs the
    explicit ``server.allow_anonymous: true``. The message says how to do either.
    """
    server = settings.server
    if _is_loopback(server.host) or server.api_keys or settings.auth.store_configured:
        return None
    if server.allow_anonymous:
        log.warning("listening on %s without API keys (server.allow_anonymous: true): anyone who can reach "
                    "it can generate images", server.host)
        return None
    return (
        f"not starting: no API keys are configured and the server would listen on {server.host}, where "
        "anyone who can reach it could generate images. Set keys, e.g. "
        "DARKROOM_SERVER__API_KEYS='[\"sk-your-key\"]' in the environment (or server.api_keys, auth.keys or "
        "auth.keys_file in the config; see docs/operations.md), or listen on loopback (--host 127.0.0.1), "
        "or allow anonymous access knowingly with server.allow_anonymous: true in the config or "
        "DARKROOM_SERVER__ALLOW_ANONYMOUS=true in the environment."
    )


def log_torch(settings: Settings) -> None:
    """One line at start: the torch build, whether CUDA is usable, and the devices the workers get.

    Only processes that run models call it (``serve``, ``worker``); an API pod never imports torch.
    """
    import torch

    from .engine.pipelines import resolve_devices

    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    names = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count)]
    devices = resolve_devices(settings.engine.devices)
    fields = {"torch": torch.__version__, "cuda_available": cuda, "cuda_version": torch.version.cuda,
              "gpus": names, "devices": devices}
    log.info("torch %s cuda_available=%s cuda_version=%s gpus=[%s] devices=%s", torch.__version__, cuda,
             torch.version.cuda, ", ".join(names), ",".join(devices), extra={"fields": fields})


def _weights_ready(settings: Settings) -> bool:
    """Refuse to start a model whose weights are not on disk (`darkroom pull MODEL` fetches them)."""
    from .models_cli import missing_weights

    if settings.engine.allow_downloads:
        return True
    problems = missing_weights(settings)
    for problem in problems:
        log.error("not starting: %s", problem)
    return not problems


def _pull(args: argparse.Namespace) -> int:
    from .models_cli import pull

    settings = load_settings(args.config)
    _logging(settings.server.log_level, settings.server.log_format)
    try:
        return pull(args.model, settings)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2


def _models(args: argparse.Namespace) -> int:
    from .models_cli import list_models

    settings = load_settings(args.config)
    return list_models(settings, as_json=args.json)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="darkroom", description="Darkroom image-generation server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    # Options several commands take, declared once.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", help="YAML settings file (also DARKROOM_CONFIG)")
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument("--host", help="bind address (default 127.0.0.1)")
    listen.add_argument("--port", type=int, help="port (default 8000)")

    serve = commands.add_parser("serve", parents=[config, listen],
                                help="serve the API and one worker per device")
    serve.set_defaults(func=_serve)
    api = commands.add_parser("api", parents=[config, listen],
                              help="serve the API only; jobs go to workers through Redis")
    api.set_defaults(func=_serve)
    worker = commands.add_parser("worker", parents=[config],
                                 help="run jobs from Redis on this machine's devices (no API)")
    worker.add_argument("--health-port", type=int, help="port of /health and /ready (worker.health_port)")
    worker.set_defaults(func=_worker)
    pull = commands.add_parser("pull", parents=[config],
                               help="download a model's weights into the local Hub cache")
    pull.add_argument("model", help="manifest id or alias (see `darkroom models`)")
    pull.set_defaults(func=_pull)
    models = commands.add_parser("models", parents=[config],
                                 help="list the model manifests and whether their weights are here")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=_models)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader closed the pipe (`darkroom models --json | head -1`): it has what it asked for. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again, and exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
