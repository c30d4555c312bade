"""fewshot-personalize: few-shot personalization of text-to-image diffusion models.

ComfyUI entry point. The engine (``fewshot_personalize.kernels``) never needs ComfyUI; the node classes in
``nodes/`` are imported only when ComfyUI is importable, and are exported through ``comfy_entrypoint``
(V3 node API) only.
"""

__version__ = "0.1.0"


def _hide_repository_root_from_imports() -> None:
    """This folder is the package itself, and its ``kernels/`` subfolder shares its name with Hugging Face's
    ``kernels`` distribution, which transformers ≥ 5.25 imports at top level. When this folder is also on
    ``sys.path`` as a top-level location (``python -m fewshot_personalize …`` run from the repository root puts the
    current directory there), ``import kernels`` would find ours and transformers would fail to import. Our own
    modules are reached as ``fewshot_personalize.*`` only, so that entry is dropped."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


_hide_repository_root_from_imports()

try:  # ComfyUI present? (GGUF-style guard: importing the library alone must not need ComfyUI)
    import comfy.utils  # noqa: F401
    from comfy_api.latest import ComfyExtension  # noqa: F401
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401
