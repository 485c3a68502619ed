"""`python -m ui [--host H] [--port P]`: serve the page.

Settings come from the environment (`RESNET_LAB_*`, `REDIS_URL`); flags override host and port. The page binds
127.0.0.1 by default and refuses any other address unless `RESNET_LAB_AUTH=user:password` is set. Gradio's
analytics are switched off before gradio is imported (with them on, launching contacts api.gradio.app and
huggingface.co), and Gradio's file route serves nothing but its own upload cache, the models folder and the
data roots.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shared.settings import ENV_PREFIX, Settings, is_loopback

log = logging.getLogger("ui")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ui", description="Serve the ResNet Lab page.")
    parser.add_argument("--host", help=f"address to bind (default {ENV_PREFIX}HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help=f"port (default {ENV_PREFIX}PORT or 7860)")
    return parser


def check_bind(settings: Settings) -> None:
    """Refuse to serve beyond loopback without credentials; SystemExit says how to fix it."""
    try:
        pair = settings.auth_pair()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not is_loopback(settings.host) and pair is None:
        raise SystemExit(
            f"error: refusing to serve on {settings.host}: anyone who can reach it could train, delete runs and "
            f"read your data. Set {ENV_PREFIX}AUTH=user:password (for example `export {ENV_PREFIX}AUTH=me:"
            f"a-long-secret`) to require a login, or bind 127.0.0.1 (the default) and reach the page through an "
            f"SSH tunnel: ssh -L {settings.port}:127.0.0.1:{settings.port} <this machine>.")


def page_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


def launch_kwargs(settings: Settings) -> dict:
    """Everything `Blocks.launch` gets besides the app (kept here so tests can check it)."""
    from ui.app import CSS, THEME, allowed_paths

    return dict(
        server_name=settings.host,
        server_port=settings.port,
        auth=settings.auth_pair(),
        auth_message="ResNet Lab — sign in with the user and password set in RESNET_LAB_AUTH.",
        max_file_size=int(settings.max_upload_mb) * 1024 * 1024,  # same MiB as Gradio's "200mb"
        allowed_paths=allowed_paths(settings),
        show_error=False,  # gr.Error messages still reach users; other exceptions show no traceback
        share=False,
        inbrowser=False,
        quiet=True,
        theme=THEME,
        css=CSS,
        footer_links=["api"],
        run_history=False,  # nothing about users' calls is kept, not even in their browser
        enable_monitoring=False,
        mcp_server=False,
        ssr_mode=False,
        pwa=False,
    )


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # before gradio is imported anywhere: analytics would call out to api.gradio.app / huggingface.co
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    try:
        settings = Settings.from_env(host=args.host, port=args.port)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    check_bind(settings)
    from ui.memtrace import start_from_env

    start_from_env()  # RESNET_LAB_TRACEMALLOC=path: allocation-growth reports (a diagnostic, off by default)
    for root in settings.data_roots:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("data root %s is not usable: %s", root, exc)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    if not settings.redis_url:
        log.warning("REDIS_URL is not set: the page starts, but runs cannot be queued until it is "
                    "(`resnet-lab up` starts Redis, a worker and this page together)")

    from ui.app import build_app

    demo = build_app(settings)
    demo.queue(default_concurrency_limit=4)
    print(f"ResNet Lab page: {page_url(settings)}", flush=True)
    demo.launch(**launch_kwargs(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
