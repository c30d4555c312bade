"""Pivotal tuning: Textual Inversion and DreamBooth-LoRA trained together in one run (the recipe of diffusers'
advanced DreamBooth-LoRA script and of kohya's "pivotal" option): the placeholder's embeddings and the LoRA
layers are optimised jointly, each at its own learning rate. Files: one LoRA file that bundles the embedding
(A1111 ``bundle_emb.*`` keys), plus the two parts on their own."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.config import TrainConfig
from ..engine.method import Artifact, Method, ParamGroup
from ..formats.embedding_file import bundle_name, bundled_tensors
from .dreambooth_lora import DreamBoothLora, LoraSettings
from .textual_inversion import TextualInversion, TextualInversionSettings


@dataclass
class PivotalSettings:
    lora: LoraSettings = field(default_factory=LoraSettings)
    embedding: TextualInversionSettings = field(default_factory=TextualInversionSettings)


class PivotalTuning(Method):
    name = "pivotal"
    uses_prior = True

    def __init__(self, settings: PivotalSettings | None = None):
        super().__init__(settings or PivotalSettings())
        self.lora = DreamBoothLora(self.settings.lora)
        self.ti = TextualInversion(self.settings.embedding)

    @property
    def changes_text(self) -> bool:
        return True

    def check_prompts(self, prompts: tuple[str, ...]) -> None:
        self.ti.check_prompts(prompts)

    def preflight(self, denoiser, text_encoder) -> None:
        self.lora.preflight(denoiser, text_encoder)
        self.ti.preflight(denoiser, text_encoder)

    def attach(self, denoiser, text_encoder, cfg: TrainConfig) -> list[ParamGroup]:
        self.family = denoiser.family
        groups = self.lora.attach(denoiser, text_encoder, cfg)
        return groups + self.ti.attach(denoiser, text_encoder, cfg)

    def detach(self) -> None:
        self.ti.detach()
        self.lora.detach()

    def set_training(self, on: bool) -> None:
        self.lora.set_training(on)

    def export(self, cfg: TrainConfig, steps: int, **info) -> dict[str, Artifact]:
        lora = self.lora.export(cfg, steps, **info)["lora"]
        emb = self.ti.export(cfg, steps, **info)["embedding"]
        token = self.settings.embedding.token
        combined_meta = {**lora.metadata, "fsp.method": self.name, "fsp.token": token,
                         "fsp.num_vectors": emb.metadata["fsp.num_vectors"], "fsp.encoders": emb.metadata["fsp.encoders"],
                         "fsp.bundle_name": bundle_name(token),
                         **{k: v for k, v in emb.metadata.items() if k.startswith("fsp.width.")}}
        combined = {**lora.tensors, **bundled_tensors(bundle_name(token), self.ti.tensors(), self.family)}
        lora.metadata["fsp.trained_with"] = emb.metadata["fsp.trained_with"] = self.name
        return {"pivotal": Artifact("pivotal", combined, combined_meta), "lora": lora, "embedding": emb}
