"""The method-generic loop reproduces DreamBooth-LoRA exactly: adapter tensors and losses of two fixed-seed runs
on the demo model, recorded with the trainer as it was before the engine became method-generic (commit 5384e23,
tests/fixtures/dreambooth_lora_reference.safetensors), are matched bit for bit."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fewshot_personalize.kernels.backends.diffusers import DiffusersDenoiser, DiffusersTextEncoder, load_pipeline
from fewshot_personalize.kernels.demo.model import MODEL_DIR
from fewshot_personalize.kernels.engine.config import TrainConfig
from fewshot_personalize.kernels.engine.data import TrainData
from fewshot_personalize.kernels.engine.loop import Trainer
from fewshot_personalize.kernels.methods import DreamBoothLora, LoraSettings

FIXTURE = Path(__file__).parent / "fixtures" / "dreambooth_lora_reference.safetensors"
LORA_KEYS = ("rank", "alpha", "train_text_encoder", "text_lr")


def _recorded():
    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def _data(seed, with_prior):
    g = torch.Generator().manual_seed(seed)
    inst = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    cls = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    masks = (torch.rand(3, 1, 64, 64, generator=g) > 0.5).float()
    return TrainData(inst, cls, None) if with_prior else TrainData(inst, None, masks)


@pytest.mark.skipif(not (MODEL_DIR / "model_index.json").is_file(), reason="demo model weights not present")
@pytest.mark.parametrize("run", ["prior_text", "unet_masked"])
def test_new_loop_reproduces_the_recorded_dreambooth_run(run):
    tensors, meta = _recorded()
    kw = json.loads(meta[run])
    lora = LoraSettings(**{k: kw.pop(k) for k in LORA_KEYS if k in kw})
    cfg = TrainConfig(instance_prompts=kw.pop("instance_prompt"), **kw)
    pipe = load_pipeline(str(MODEL_DIR))
    with Trainer(DiffusersDenoiser(pipe), DiffusersTextEncoder(pipe), DreamBoothLora(lora),
                 _data(11, cfg.class_prompt is not None), cfg) as trainer:
        result = trainer.train()
        files = trainer.export()["lora"].tensors
    assert result.losses == tensors[f"{run}/losses"].tolist()
    expected = {k[len(run) + 1:]: v for k, v in tensors.items() if k.startswith(run + "/") and not k.endswith("losses")}
    assert sorted(files) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(files[k], v), k
