"""The ``fsp.*`` metadata every file of this project carries (safetensors metadata: strings only).

One writer for all methods and front ends, so a file says the same thing whether the command line or a ComfyUI
node wrote it: booleans are ``true``/``false``, numbers ``str(x)``, absent values are left out.
"""

from __future__ import annotations

from ..core.errors import UserInputError

FORMAT_VERSION = "1"


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(_text(x) for x in v)
    return v if isinstance(v, str) else str(v)


def fsp_metadata(*, method: str, family: str, steps: int, **fields) -> dict[str, str]:
    """``fsp.format_version``, ``fsp.method``, ``fsp.base_family``, ``fsp.steps`` and ``fsp.<field>`` for every
    other field that is not None."""
    meta = {"fsp.format_version": FORMAT_VERSION, "fsp.method": method, "fsp.base_family": family,
            "fsp.steps": str(steps)}
    for k, v in fields.items():
        if v is not None:
            meta[f"fsp.{k}"] = _text(v)
    return meta


def recorded_family(meta: dict[str, str]) -> str | None:
    """The base-model family a file records: ours (``fsp.base_family``) or kohya's ``ss_base_model_version``."""
    recorded = meta.get("fsp.base_family")
    if recorded is None:
        version = meta.get("ss_base_model_version", "")
        recorded = {"sd_v1": "sd1", "sd_v2": "sd2"}.get(version, "sdxl" if version.startswith("sdxl") else None)
    return recorded


def check_family(meta: dict[str, str], family: str, source: str) -> None:
    """Refuse a file whose recorded base family differs from the model's (e.g. an SDXL LoRA on SD1.5)."""
    recorded = recorded_family(meta)
    if recorded is not None and recorded != family:
        raise UserInputError(f"{source} was trained for a {recorded} model, but this model is {family}")
