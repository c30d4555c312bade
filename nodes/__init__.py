"""ComfyUI glue: node classes (one file per concern). The only code in this pack that imports comfy.*."""

from comfy_api.latest import ComfyExtension, io

from .apply_adapter import ApplyAdapter
from .demo_loader import LoadDemoModel
from .save_adapter import SaveAdapter
from .train import TrainConcept

NODES: list[type[io.ComfyNode]] = [TrainConcept, SaveAdapter, ApplyAdapter, LoadDemoModel]


class FewshotPersonalizeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FewshotPersonalizeExtension:
    return FewshotPersonalizeExtension()
