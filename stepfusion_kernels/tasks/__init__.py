"""Training tasks on real data, one module each, all run by the loop in `training`."""

from . import ecg5000, ett, mitdb

TASKS = {module.NAME: module for module in (ett, ecg5000, mitdb)}

__all__ = ["TASKS"]
