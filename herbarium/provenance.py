"""What a run was started with, beyond its settings: the command line, the versions and the machine.

Recorded under ``"environment"`` in the run's ``config.json`` so that a result
can be traced to the code and hardware that made it; replaying the config
(``--config``) ignores it.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from typing import Any, Sequence

import timm
import torch

from herbarium import __version__


def devices() -> list[str]:
    """The accelerators this process sees by name, or ``["cpu"]``."""
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return ["cpu"]


def environment(program: str, argv: Sequence[str]) -> dict[str, Any]:
    """The command line, package versions and machine of this process, as JSON-able values."""
    return {
        "command": shlex.join([program, *argv]),
        "herbarium": __version__,
        "torch": str(torch.__version__),  # a TorchVersion object: a checkpoint holds plain values only
        "timm": str(timm.__version__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "devices": devices(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def command_line() -> list[str]:
    """This process's arguments, without the program."""
    return list(sys.argv[1:])
