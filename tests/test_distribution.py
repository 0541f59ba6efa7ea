"""The name pip installs the package by, and the install hints that use it.

"herbarium" on PyPI is an unrelated project, so a hint naming it would
install the wrong thing; the package is distributed as ``DISTRIBUTION`` and
still imported as ``herbarium``.
"""

import re
import subprocess
import sys
from pathlib import Path

from setuptools.config.pyprojecttoml import read_configuration

import herbarium
from herbarium import DISTRIBUTION
from herbarium.export import ONNX_HINT, build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_names_our_distribution_and_reads_the_version_from_the_package():
    project = read_configuration(ROOT / "pyproject.toml")["project"]
    assert DISTRIBUTION == "herbarium-taxa" and project["name"] == DISTRIBUTION
    assert project["version"] == herbarium.__version__


def test_install_hints_name_our_distribution_and_work_from_a_clone():
    assert f"pip install '{DISTRIBUTION}[onnx]'" in ONNX_HINT and "pip install -e '.[onnx]'" in ONNX_HINT
    assert f"{DISTRIBUTION}[onnx]" in " ".join(build_parser().format_help().split())
    texts = [path.read_text() for path in [ROOT / "README.md", *ROOT.glob("herbarium/**/*.py"), *ROOT.glob("scripts/*")]
             if path.is_file()]
    assert not [match for text in texts for match in re.findall(r"pip install[^\n]*\bherbarium\[", text)]


def test_version_flag_still_answers():
    result = subprocess.run([sys.executable, "-m", "herbarium.cli", "--version"], capture_output=True, text=True,
                            cwd=ROOT, check=False)
    assert result.returncode == 0 and result.stdout == f"herbarium {herbarium.__version__}\n"
