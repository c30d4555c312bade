"""ComfyUI glue: node classes (one file per concern). The only code in this pack that imports comfy.*."""

from comfy_api.latest import ComfyExtension, io


class FewshotPersonalizeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []


async def comfy_entrypoint() -> FewshotPersonalizeExtension:
    return FewshotPersonalizeExtension()
