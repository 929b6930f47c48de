"""Your own task as Python code: `task.factory: module:factory`, for checks no schema can express.

The factory is called as `factory(options, seed)` and returns an object with the task interface;
subclassing `distill.tasks.TaskBase` gives the optional parts their defaults.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from distill.tasks import Task, TaskError, interface


def load_python_task(cfg: Any, seed: int) -> Task:
    module_name, _, attr = cfg.factory.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: a module beside the config is found
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure inside the user's module is reported, not raised
        raise TaskError(
            f"task.factory: cannot import '{module_name}' ({type(exc).__name__}: {exc}); put it in the current folder or on PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TaskError(
            f"task.factory: '{module_name}' has no callable '{attr}'; name the function or class that builds your task"
        )
    try:
        task = factory(dict(cfg.options), seed)
    except TaskError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TaskError(f"task.factory: {cfg.factory}(options, seed) failed ({type(exc).__name__}: {exc})") from None
    missing = [name for name in interface() if not hasattr(task, name)]
    if missing:
        raise TaskError(
            f"task.factory: {cfg.factory} returned a {type(task).__name__} without {', '.join(missing)}; "
            "implement the task interface (subclass distill.tasks.TaskBase for the optional parts)"
        )
    return task
