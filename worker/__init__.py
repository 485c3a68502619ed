"""The headless worker: Celery tasks that train, evaluate and predict by calling `shared`.

Importing this package creates nothing; `worker.app` (what `celery -A worker worker` looks up) loads
`worker.celery_app` on first use.
"""


def __getattr__(name: str):
    if name == "app":
        from .celery_app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
