"""Training methods, one file each, as plug-ins of the engine's loop (:class:`..engine.method.Method`)."""

from .catversion import CatVersion, CatVersionSettings
from .dreambooth_lora import DreamBoothLora, LoraSettings
from .ed_lora import EdLora, EdLoraSettings
from .pivotal import PivotalSettings, PivotalTuning
from .textual_inversion import TextualInversion, TextualInversionSettings

#: command-line / node name → method class
METHODS = {m.name: m for m in (DreamBoothLora, TextualInversion, CatVersion, PivotalTuning, EdLora)}

__all__ = ["METHODS", "CatVersion", "CatVersionSettings", "DreamBoothLora", "EdLora", "EdLoraSettings", "LoraSettings", "PivotalSettings",
           "PivotalTuning", "TextualInversion", "TextualInversionSettings"]
