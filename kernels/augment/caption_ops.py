"""Caption changes that go with a view: Custom Diffusion's scale tags, and kohya-style tag shuffle and dropout
(a caption is comma-separated tags; the first ``keep`` stay where they are)."""

from __future__ import annotations

import torch

from .settings import CLOSE_ABOVE, FAR_BELOW, AugmentSettings


def scale_tag(caption: str, scale: float, settings: AugmentSettings, u: float) -> str:
    """The caption of a view at ``scale`` (``u`` in [0, 1) picks the template): a far tag when the photo is under
    :data:`FAR_BELOW` of the frame, a close tag when enlarged past :data:`CLOSE_ABOVE`, else unchanged."""
    if not settings.scale_tags:
        return caption
    if scale < FAR_BELOW:
        templates = settings.far_tags
    elif scale > CLOSE_ABOVE:
        templates = settings.close_tags
    else:
        return caption
    return templates[min(int(u * len(templates)), len(templates) - 1)].format(caption)


def shuffle_and_drop(caption: str, settings: AugmentSettings, gen: torch.Generator) -> str:
    """Shuffle the tags after the first ``keep_tags`` and drop each of them with ``tag_dropout`` (always the same
    number of draws for a caption, so the result is a pure function of the generator's state)."""
    tags = [t.strip() for t in caption.split(",")]
    keep, rest = tags[: settings.keep_tags], tags[settings.keep_tags:]
    order = torch.randperm(len(rest), generator=gen).tolist()
    dropped = (torch.rand(len(rest), generator=gen) < settings.tag_dropout).tolist()
    if settings.shuffle_tags:
        rest, dropped = [rest[i] for i in order], [dropped[i] for i in order]
    rest = [t for t, d in zip(rest, dropped) if not d]
    return ", ".join(t for t in keep + rest if t)


def caption_views(captions: list[str], scales: torch.Tensor, rescaled: torch.Tensor, settings: AugmentSettings,
                  gen: torch.Generator) -> list[str]:
    """Each view's caption: tags shuffled and dropped, the scale tag of a rescaled view, and the whole caption
    dropped (an unconditional sample) with ``caption_dropout``."""
    u_tag = torch.rand(len(captions), generator=gen)
    u_drop = torch.rand(len(captions), generator=gen)
    out = []
    for i, caption in enumerate(captions):
        c = shuffle_and_drop(caption, settings, gen)
        if bool(rescaled[i]):
            c = scale_tag(c, float(scales[i]), settings, float(u_tag[i]))
        out.append("" if float(u_drop[i]) < settings.caption_dropout else c)
    return out
