"""Training methods, one file each, as plug-ins of the engine's loop (:class:`..engine.method.Method`)."""

from .catversion import CatVersion, CatVersionSettings
from .dreambooth_lora import DreamBoothLora, LoraSettings
from .pivotal import PivotalSettings, PivotalTuning
from .textual_inversion import TextualInversion, TextualInversionSettings

#: command-line / node name → method class
METHODS = {m.name: m for m in (DreamBoothLora, TextualInversion, CatVersion, PivotalTuning)}

__all__ = ["METHODS", "CatVersion", "CatVersionSettings", "DreamBoothLora", "LoraSettings", "PivotalSettings",
           "PivotalTuning", "TextualInversion", "TextualInversionSettings"]
