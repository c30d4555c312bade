"""fewshot-personalize: few-shot personalization of text-to-image diffusion models.

ComfyUI entry point. The engine (``fewshot_personalize.kernels``) never needs ComfyUI; the node classes in
``nodes/`` are imported only when ComfyUI is importable, and are exported through ``comfy_entrypoint``
(V3 node API) only.
"""

__version__ = "0.1.0"

try:  # ComfyUI present? (GGUF-style guard: importing the library alone must not need ComfyUI)
    import comfy.utils  # noqa: F401
    from comfy_api.latest import ComfyExtension  # noqa: F401
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401
