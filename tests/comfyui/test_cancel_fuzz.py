"""Cancel fuzz: every trainer node is cancelled at random points of its run (VAE encoding, the VAE round trip,
training steps, checkpoint writes), as ComfyUI's Cancel button does it (the interrupt flag, raised at the node's
next check). Afterwards the caller's MODEL / CLIP are bit-identical (weights hashed) and carry no patch, no
temporary or half-written file is left, and resuming from the checkpoint ends where an uninterrupted run ends."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import torch

from .test_nodes import RES, assert_clean, images

pytestmark = pytest.mark.comfyui
if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set: the ComfyUI suite needs a ComfyUI source checkout (v0.3.64 or newer)",
                allow_module_level=True)

STEPS = 4
POINTS_PER_NODE = 4  # 5 trainers x 4 = 20 random cancel points
NODES = ["dreambooth", "textual_inversion", "catversion", "pivotal", "ed_lora"]


def run_node(kind: str, objs, **checkpoint):
    """One trainer node on the tiny model (no preview), checkpointing every 2 steps under ``checkpoint_name``."""
    from fewshot_personalize.nodes.train import TrainConcept
    from fewshot_personalize.nodes.train_catversion import TrainCatVersion
    from fewshot_personalize.nodes.train_edlora import TrainEdLora
    from fewshot_personalize.nodes.train_embedding import TrainTextualInversion
    from fewshot_personalize.nodes.train_pivotal import TrainPivotal

    m, c, v = objs
    opt = {"preview_steps": [0], "checkpoint_every": [2], **{k: [val] for k, val in checkpoint.items()}}
    base = ([m], [c], [v], [images()])
    run = ([RES], [1], [0])
    with torch.inference_mode():  # as ComfyUI runs every node
        if kind == "dreambooth":
            out = TrainConcept.execute(*base, ["a photo of sks toy"], [STEPS], [1e-3], [4], [True], *run, **opt)
        elif kind == "textual_inversion":
            out = TrainTextualInversion.execute(*base, ["<sks>"], ["toy"], [2], ["custom prompt"], [STEPS], [5e-2],
                                                *run, prompt=["a photo of {}"], **opt)
        elif kind == "catversion":
            out = TrainCatVersion.execute(*base, ["toy"], ["object"], [""], [1], [STEPS], [5e-2], *run, **opt)
        elif kind == "pivotal":
            out = TrainPivotal.execute(*base, ["<sks>"], ["toy"], [1], ["custom prompt"], [2], [True], [5e-2],
                                       [STEPS], [1e-3], *run, prompt=["a photo of {} toy"], **opt)
        else:
            out = TrainEdLora.execute(*base, ["<toy1>"], ["toy"], ["custom prompt"], [2], [5e-2], [1e-3], [STEPS],
                                      [1e-3], *run, prompt=["a photo of a {}"], **opt)
    return learned_tensors(out.args)


def learned_tensors(outputs) -> dict[str, torch.Tensor]:
    """The trained files among a node's outputs (adapters, embeddings, K/V tokens, concepts) as one dict."""
    found = {}
    for i, o in enumerate(outputs):
        t = getattr(o, "tensors", None)
        if t is None:
            continue
        for k, v in (t() if callable(t) else t).items():
            found[f"{i}.{k}"] = v.detach().clone()
    assert found, "the node returned nothing trained"
    return found


def weights_hash(m, c) -> str:
    h = hashlib.sha256()
    for module in (m.model, c.cond_stage_model):
        for k, t in sorted(module.state_dict().items()):
            h.update(k.encode())
            h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class CancelAt:
    """Counts the run's cancel-worthy moments (VAE encode / decode calls, progress updates, file writes) and
    presses Cancel at moment ``at`` (None: only count)."""

    def __init__(self, monkeypatch, at: int | None):
        import comfy.model_management as mm
        import comfy.utils

        from fewshot_personalize.kernels.formats import safetensors_io
        from fewshot_personalize.nodes.backend.denoiser import ComfyDenoiser

        self.at, self.count, self.kinds = at, 0, []
        for owner, name in [(ComfyDenoiser, "encode_images"), (ComfyDenoiser, "decode_latents"),
                            (comfy.utils.ProgressBar, "update_absolute"), (safetensors_io, "atomic_write")]:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name, mm))

    def _wrap(self, real, name, mm):
        def wrapped(*args, **kwargs):
            if self.count == self.at:
                mm.interrupt_current_processing(True)  # what the Cancel button does; raised at the next check
            self.count += 1
            self.kinds.append(name)
            return real(*args, **kwargs)

        return wrapped


def leftovers(root) -> list[str]:
    """Temporary or half-written files under ``root``: temp names, or safetensors files that do not load."""
    from fewshot_personalize.kernels.formats.safetensors_io import load_safetensors

    bad = []
    for folder, dirs, files in os.walk(root):
        bad += [os.path.join(folder, d) for d in dirs if d.endswith(".tmp")]
        for f in files:
            path = os.path.join(folder, f)
            if f.endswith(".tmp") or f.startswith(".tmp"):
                bad.append(path)
            elif f.endswith(".safetensors"):
                try:
                    load_safetensors(path)
                except Exception:
                    bad.append(path)
    return bad


@pytest.mark.parametrize("kind", NODES)
def test_cancel_at_random_points_changes_nothing_and_resumes_identically(kind, tiny_objects, loras_dir, monkeypatch):
    import comfy.model_management as mm

    m, c, _ = tiny_objects
    before = weights_hash(m, c)
    with monkeypatch.context() as mp:
        counter = CancelAt(mp, at=None)
        reference = run_node(kind, tiny_objects)  # uninterrupted, no checkpoint
    moments = counter.count
    assert {"encode_images", "decode_latents", "update_absolute"} <= set(counter.kinds)
    output = loras_dir.parent / "output"
    rng = random.Random(f"cancel-fuzz-{kind}")
    # a checkpointed run has the same moments plus its checkpoint writes: draw over all of them
    points = sorted(rng.sample(range(moments + STEPS // 2), POINTS_PER_NODE))
    seen = []
    for point in points:
        name = f"fuzz_{kind}_{point}"
        with monkeypatch.context() as mp:
            counter = CancelAt(mp, at=point)
            try:
                run_node(kind, tiny_objects, checkpoint_name=name)
                finished = True
            except mm.InterruptProcessingException:
                finished = False
        pressed_during = counter.kinds[point] if point < len(counter.kinds) else "after the run"
        if finished:  # Cancel pressed after the node's last check: ComfyUI stops before the next node
            assert counter.count - 1 <= point or pressed_during == "atomic_write", (kind, point, counter.kinds)
        mm.interrupt_current_processing(False)
        seen.append(f"{point}/{moments} {pressed_during}{' (finished)' if finished else ''}")
        assert weights_hash(m, c) == before, (kind, point, pressed_during)
        assert_clean(m, c)
        assert leftovers(output) == [], (kind, point, pressed_during)
        resumed = run_node(kind, tiny_objects, checkpoint_name=name, resume=True)
        assert resumed.keys() == reference.keys()
        for k, t in reference.items():
            torch.testing.assert_close(resumed[k], t, atol=1e-6, rtol=0, msg=f"{kind} cancelled at {point} "
                                                                              f"({pressed_during}): {k}")
        assert weights_hash(m, c) == before
    print(f"{kind}: Cancel pressed at " + ", ".join(seen))  # shown with -s: where the points fell
