"""pyproject.toml is valid for the Comfy Registry (docs.comfy.org/registry/specifications) and installs into a
ComfyUI environment without replacing its torch (dependencies are lower bounds only)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
META = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: what ComfyUI's registry parser accepts (comfy_config/config_parser.py)
REGISTRY_OS = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}


def test_project_fields_follow_the_registry_rules():
    project = META["project"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name), name
    assert "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert set(project["license"]) <= {"file", "text"} and (ROOT / project["license"].get("file", "LICENSE")).exists()
    assert project["urls"]["Repository"].startswith("https://")
    assert project["description"]


def test_comfy_table_and_classifiers():
    comfy = META["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r">=\s*\d+\.\d+\.\d+", comfy["requires-comfyui"])
    assert all((ROOT / p).exists() for p in comfy.get("includes", []))
    classifiers = META["project"]["classifiers"]
    for c in classifiers:
        if c.startswith("Operating System :: "):
            assert c[len("Operating System :: "):].startswith(REGISTRY_OS), c
        if c.startswith("Environment ::"):
            assert c[len("Environment :: "):] in REGISTRY_ACCELERATORS, c


def test_dependencies_are_lower_bounds_so_comfyuis_torch_stays():
    for dep in META["project"]["dependencies"]:
        assert not re.search(r"==|<|~=", dep), f"{dep}: pin nothing an existing ComfyUI environment has to replace"
    torch = [d for d in META["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert torch == ["torch>=2.1"]  # satisfied by any torch ComfyUI ships with, so pip keeps it
