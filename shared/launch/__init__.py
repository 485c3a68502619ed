"""Processes: the supervisor, the embedded Redis, `resnet-lab up`."""
