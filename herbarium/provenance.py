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

import numpy
import PIL
import timm
import torch
import torchvision

from herbarium import __version__


# The packages whose versions move a run's numbers (see ``environment``), by the name the records use.
_NUMERIC_MODULES = {"torch": torch, "torchvision": torchvision, "timm": timm, "pillow": PIL, "numpy": numpy}
NUMERIC_PACKAGES = tuple(_NUMERIC_MODULES)


def devices() -> list[str]:
    """The accelerators this process sees by name, or ``["cpu"]``."""
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return ["cpu"]


def package_versions() -> dict[str, str]:
    """The versions of the packages that move a run's numbers (:data:`NUMERIC_PACKAGES`)."""
    # str(): torch's is a TorchVersion object, and a checkpoint holds plain values only.
    return {name: str(module.__version__) for name, module in _NUMERIC_MODULES.items()}


def environment(program: str, argv: Sequence[str]) -> dict[str, Any]:
    """The command line, package versions and machine of this process, as JSON-able values.

    Every package whose version moves a run's numbers is named: the same
    code, data and seed on the CPU give the same run bit for bit only with
    the same torch, torchvision (augmentation), Pillow (decoding and
    resizing), numpy and timm.
    """
    return {
        "command": shlex.join([program, *argv]),
        "herbarium": __version__,
        **package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "devices": devices(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def version_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"timm 1.0.29 -> 1.0.31"`` for each numeric package whose version differs between two environments.

    A run resumed under other versions trains on, but no longer bit for bit
    as it would have; a package either record lacks is not compared.
    """
    return [f"{name} {recorded[name]} -> {current[name]}" for name in NUMERIC_PACKAGES
            if name in recorded and name in current and recorded[name] != current[name]]


def command_line() -> list[str]:
    """This process's arguments, without the program."""
    return list(sys.argv[1:])
