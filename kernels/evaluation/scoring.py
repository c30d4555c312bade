"""Which metric is computed on which images: the JSON the command line prints and the node returns.

CLIP-I and DINO (subject fidelity), CLIP-T (prompt fidelity; needs a prompt and a CLIP text tower), DreamBooth
arXiv 2208.12242 §4.1; their masked variants (CatVersion arXiv 2311.14631) when the generated images or the
references have masks (a set without masks is used whole; ``masked`` says which were masked); PRES with class
images and DIV with two generated images or more (DreamBooth §4.3, see :mod:`.metrics`), on DINO features, or on
CLIP image features without a DINO model. A key is present only when its metric was computed.
"""

from __future__ import annotations

from ..core.errors import UserInputError
from .feature_models import ImageFeatureModel
from .image_sets import ImageSet
from .metrics import diversity, mean_pairwise, prompt_similarity


def score(images: ImageSet, references: ImageSet, clip: ImageFeatureModel | None = None,
          dino: ImageFeatureModel | None = None, prompt: str | None = None,
          class_images: ImageSet | None = None) -> dict:
    """The metrics of ``images`` (generated from ``prompt``) against ``references``, as a JSON-ready dict."""
    if clip is None and dino is None:
        raise UserInputError("no feature model: give a CLIP model, a DINO model or both")
    prompt = (prompt or "").strip() or None
    if prompt is not None and (clip is None or clip.text_problem):
        why = clip.text_problem if clip is not None else "CLIP-T needs a CLIP model with a text tower"
        raise UserInputError(f"{why}; leave the prompt out to score without CLIP-T")
    cache: dict[tuple, object] = {}

    def feats(model: ImageFeatureModel, s: ImageSet, subject: bool = False):
        subject = subject and s.has_masks
        key = (model.kind, id(s), subject)
        if key not in cache:
            cache[key] = model.image_features(s.subjects(model.background) if subject else s.images)
        return cache[key]

    out: dict = {}
    masked = images.has_masks or references.has_masks
    for model, name in ((clip, "clip_i"), (dino, "dino")):
        if model is None:
            continue
        out[name] = mean_pairwise(feats(model, images), feats(model, references))
        if masked:
            out[f"{name}_masked"] = mean_pairwise(feats(model, images, True), feats(model, references, True))
    if prompt is not None:
        text = clip.text_features([prompt])
        out["clip_t"] = prompt_similarity(feats(clip, images), text)
        if images.has_masks:
            out["clip_t_masked"] = prompt_similarity(feats(clip, images, True), text)
    prior = dino or clip
    notes = []
    if class_images is not None:
        out["pres"] = mean_pairwise(feats(prior, class_images), feats(prior, references))
    if len(images) >= 2:
        out["div"] = diversity(feats(prior, images))
        notes.append(f"div is 1 - the mean {prior.kind.upper()} cosine between distinct generated images, a stand-in "
                     "for DreamBooth's LPIPS-based DIV")
    else:
        notes.append("div needs at least 2 generated images")
    out["masked"] = {"images": images.has_masks, "references": references.has_masks}
    out["models"] = {"clip": clip.name if clip else None, "dino": dino.name if dino else None,
                     "pres_and_div": prior.kind}
    out["counts"] = {"images": len(images), "references": len(references),
                     **({"class_images": len(class_images)} if class_images is not None else {})}
    out["prompt"] = prompt
    out["notes"] = notes
    return out
