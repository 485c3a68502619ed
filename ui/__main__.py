"""`python -m ui [--host H] [--port P]`: serve the page.

Settings come from the environment (`RESNET_LAB_*`, `REDIS_URL`); flags override host and port. The page binds
127.0.0.1 by default and refuses any other address unless `RESNET_LAB_AUTH=user:password` is set. Gradio's
analytics are switched off before gradio is imported (with them on, launching contacts api.gradio.app and
huggingface.co). `ui.guard` sits in front of Gradio's app: it answers only loopback host names (with a login,
any or `RESNET_LAB_ALLOWED_HOSTS`), refuses requests from other web pages, and lets the file route serve only
what the page shows or offers for download.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile

from shared.settings import ENV_PREFIX, Settings, is_loopback
from ui.guard import check_allowed_hosts

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
    try:
        check_allowed_hosts(settings)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not is_loopback(settings.host) and pair is None:
        raise SystemExit(
            f"error: refusing to serve on {settings.host}: anyone who can reach it could train, delete runs and "
            f"read your data. Set {ENV_PREFIX}AUTH=user:password (for example `export {ENV_PREFIX}AUTH=me:"
            f"a-long-secret`) to require a login, or bind 127.0.0.1 (the default) and reach the page through an "
            f"SSH tunnel: ssh -L {settings.port}:127.0.0.1:{settings.port} <this machine>.")


def check_pairing(settings: Settings) -> None:
    """Refuse to serve a models folder paired with another Redis (shared.launch.identity): the page would rebuild that
    Redis's run list from the folder and its workers would train the other stack's runs. With Redis down the page
    starts anyway (it shows a banner until Redis is back); the workers check when they start."""
    from shared.launch.identity import IdentityMismatch, check_models_dir

    try:
        check_models_dir(settings.models_dir, settings.redis_url)
    except IdentityMismatch as exc:
        raise SystemExit(f"error: {exc}") from None
    except ConnectionError as exc:
        log.warning("%s; the page starts without checking", exc)


def page_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


def launch_kwargs(settings: Settings) -> dict:
    """Everything `Blocks.launch` gets besides the app (kept here so tests can check it)."""
    from ui.app import CSS, THEME, allowed_paths
    from ui.guard import page_middleware

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
        app_kwargs={"middleware": page_middleware(settings)},  # Host, Origin and file-route checks (ui/guard.py)
    )


def private_upload_folder() -> None:
    """Unless GRADIO_TEMP_DIR is set, give Gradio an upload folder of this page's own (mode 0700, removed at exit).

    Gradio's default, /tmp/gradio, is shared by every user and every Gradio app of the machine: its outputs there
    (Grad-CAM overlays of users' photos, predictions.csv) would be readable by all, and the page trusts the files in
    its upload folder (ui/guard.py), so no one else must be able to put files there.
    """
    if os.environ.get("GRADIO_TEMP_DIR"):
        return
    folder = tempfile.mkdtemp(prefix="resnet-lab-page-")  # created 0700, owned by us, a fresh name
    os.environ["GRADIO_TEMP_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # before gradio is imported anywhere: analytics would call out to api.gradio.app / huggingface.co
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Gradio keeps a record of the last N events (10,000 by default, ~3 MB) that nothing reads with monitoring off
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")
    private_upload_folder()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    try:
        settings = Settings.from_env(host=args.host, port=args.port)
        if settings.model_plugins:  # before the Train tab lists the models and the API validates them
            from shared.training.models import load_model_plugins

            load_model_plugins(settings.model_plugins)
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
    from shared.runs.store import RunStore

    # what a crash left half-written (temp files, a half-deleted run folder) goes before the runs are listed
    try:
        RunStore(settings.models_dir).remove_leftovers()
    except OSError as exc:  # a read-only models folder still shows its runs
        log.warning("cannot remove leftover temporary files in %s: %s", settings.models_dir, exc)
    if not settings.redis_url:
        log.warning("REDIS_URL is not set: the page starts, but runs cannot be queued until it is "
                    "(`resnet-lab up` starts Redis, a worker and this page together)")
    else:
        check_pairing(settings)

    from ui.app import build_app

    demo = build_app(settings)
    # a bounded queue: a flood of calls gets "queue is full". api_open=False: Gradio's direct REST routes
    # (/gradio_api/run/<api>) would run events beside the queue, past its size and every concurrency limit
    demo.queue(default_concurrency_limit=4, max_size=256, api_open=False)
    print(f"ResNet Lab page: {page_url(settings)}", flush=True)
    demo.launch(**launch_kwargs(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
