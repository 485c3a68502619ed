"""resnet-lab core: data, models, training engine, evaluation, run store.

Importing this package (or any module in it) never imports gradio or celery.
"""

__version__ = "0.1.0"
