"""The layering DESIGN.md asks for, checked on the source: kernels/ never imports ComfyUI (or our nodes), and
inside kernels/ imports point down only (cli > demo > backends, evaluation > methods > engine > formats > adapters, augment, multi_concept >
core); evaluation needs core only."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution"}
#: package under kernels/ → layer (higher may import lower or equal, never higher)
LAYERS = {"core": 0, "testing": 0, "adapters": 1, "augment": 1, "multi_concept": 1, "formats": 2, "engine": 3, "methods": 4, "backends": 5,
          "evaluation": 5, "demo": 6, "cli": 7}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module inside the pack or the outside module name, line) of every import in ``path``."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append((node.module or "", node.lineno))
            else:
                base = package[: len(package) - node.level + 1]
                target = ".".join(["<pack>"] + base + ([node.module] if node.module else []))
                if node.module is None:
                    out += [(f"{target}.{a.name}", node.lineno) for a in node.names]
                else:
                    out.append((target, node.lineno))
    return out


def _kernel_files():
    return sorted(KERNELS.rglob("*.py"))


def test_kernels_never_import_comfyui_or_nodes():
    bad = []
    for f in _kernel_files():
        for mod, line in _imports(f):
            top = mod.split(".")[0]
            if top in COMFY_MODULES or mod.startswith("<pack>.nodes") or mod.startswith("fewshot_personalize.nodes"):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def _layer(mod: str) -> str | None:
    m = re.match(r"(?:<pack>|fewshot_personalize)\.kernels\.([a-z_]+)", mod)
    return m.group(1) if m else None


def test_kernel_imports_point_down():
    bad = []
    for f in _kernel_files():
        parts = f.relative_to(KERNELS).parts
        if len(parts) < 2:
            continue
        here = parts[0]
        for mod, line in _imports(f):
            there = _layer(mod)
            if there is None or there == here:
                continue
            assert there in LAYERS, f"{mod}: unknown kernels package {there!r} (add it to LAYERS)"
            if LAYERS[there] > LAYERS[here]:
                bad.append(f"{f.relative_to(ROOT)}:{line}: {here} imports {there} ({mod})")
    assert not bad, "\n".join(bad)


def test_every_kernels_package_has_a_layer_and_is_installed():
    packages = {p.parent.relative_to(KERNELS).parts[0] for p in KERNELS.rglob("__init__.py") if p.parent != KERNELS}
    assert packages <= set(LAYERS), packages - set(LAYERS)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for init in list(KERNELS.rglob("__init__.py")) + list((ROOT / "nodes").rglob("__init__.py")):
        name = ".".join(["fewshot_personalize", *init.parent.relative_to(ROOT).parts])
        assert f'"{name}"' in pyproject, f"{name} is missing from [tool.setuptools] packages"


def test_evaluation_needs_only_core():
    layers = {_layer(m) for f in (KERNELS / "evaluation").rglob("*.py") for m, _ in _imports(f)}
    assert layers - {None, "evaluation"} <= {"core"}, layers


@pytest.mark.parametrize("module", ["engine.loop", "engine.seams", "engine.method"])
def test_the_engine_does_not_know_back_ends_or_the_demo(module):
    f = KERNELS / (module.replace(".", "/") + ".py")
    layers = {_layer(m) for m, _ in _imports(f)} - {None}
    assert not layers & {"backends", "demo", "cli", "methods"}, layers


def test_no_load_path_unpickles():
    """Nothing of the pack can unpickle: no pickle / torch.load / numpy pickles, and every diffusers or
    transformers weight load asks for safetensors (a tokenizer or image processor reads JSON/text only)."""
    found = []
    for path in sorted(KERNELS.rglob("*.py")) + sorted((ROOT / "nodes").rglob("*.py")) + [ROOT / "__init__.py"]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports a pickle module")
            if isinstance(node, ast.Call):
                f = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if f in ("torch.load", "np.load", "numpy.load") and kw.get("allow_pickle") != "False":
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {f}")
                if f.endswith("from_pretrained") and "Tokenizer" not in f and "Processor" not in f \
                        and kw.get("use_safetensors") != "True" and "folder_kwargs" not in kw.get(None, ""):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {f} without use_safetensors=True")
    assert not found, "\n".join(found)


def test_the_repository_root_is_no_top_level_import_location_once_the_package_is_imported():
    # kernels/ shares its name with Hugging Face's `kernels` distribution, which transformers >= 5.25 imports at top
    # level: run from the repository root (`python -m fewshot_personalize ...`), ours would shadow it
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("import os, sys; import fewshot_personalize; import importlib.util as u; "
            "spec = u.find_spec('kernels'); "
            "print(any(os.path.abspath(p or os.curdir) == os.getcwd() for p in sys.path), "
            "spec is not None and os.path.dirname(os.path.abspath(spec.origin or '')) == os.path.join(os.getcwd(), 'kernels'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out
