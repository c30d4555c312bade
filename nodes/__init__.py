"""ComfyUI glue: node classes (one file per concern) over the ComfyUI back end in ``backend/``. The only code in
this pack that imports comfy.*."""

from comfy_api.latest import ComfyExtension, io

from .apply_adapter import ApplyAdapter
from .apply_layerwise import ApplyLayerwiseConcepts
from .augment import AugmentationNode, AugmentationPreview
from .backend.catversion import register_folder
from .catversion import LoadCatVersion, SaveCatVersion
from .demo_loader import LoadDemoModel
from .evaluate import EvaluateConcept, register_folder as register_eval_folder
from .fuse import FuseConcepts
from .load_concept import LoadConcept
from .regional import ApplyRegions, RegionPromptNode
from .save_adapter import SaveAdapter
from .save_concept import SaveConcept
from .save_embedding import SaveEmbedding
from .train import TrainConcept
from .train_catversion import TrainCatVersion
from .train_edlora import TrainEdLora
from .train_embedding import TrainTextualInversion
from .train_pivotal import TrainPivotal
from .training_images import LoadDemoConcept, LoadImageFolder

register_folder()  # models/catversion
register_eval_folder()  # models/fewshot_eval

NODES: list[type[io.ComfyNode]] = [
    TrainConcept, TrainTextualInversion, TrainCatVersion, TrainPivotal, TrainEdLora,  # fewshot/train
    AugmentationNode, AugmentationPreview,  # fewshot/train
    SaveAdapter, ApplyAdapter, ApplyLayerwiseConcepts, SaveEmbedding, SaveCatVersion, LoadCatVersion,  # fewshot/adapter
    FuseConcepts, SaveConcept,  # fewshot/adapter
    LoadDemoModel, LoadDemoConcept, LoadImageFolder, LoadConcept,  # fewshot/loaders
    RegionPromptNode, ApplyRegions,  # fewshot/sampling
    EvaluateConcept,  # fewshot/evaluate
]


class FewshotPersonalizeExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> FewshotPersonalizeExtension:
    return FewshotPersonalizeExtension()
