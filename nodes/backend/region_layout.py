"""Region layout for Apply regional sampling: in the first share of the schedule each region's crop of the latent is
denoised with its own prompt (:mod:`...kernels.multi_concept.region_layout`), so each region draws its own object.

A ``model_function_wrapper`` on the MODEL clone (ComfyUI calls it with the model's ``apply_model`` and the batch it
is about to run). On conditional rows whose context is Apply regional sampling's [global | region 1 | …] (length
``(1+R)·part``), while the step's sigma is at or above the layout's, each region's crop is run through the same
model with that region's part of the context and the outputs are composed; other rows, other conditionings and
later steps pass through untouched. A wrapper already on the MODEL (another node's) is kept and called for every
run. ControlNet outputs are for the whole latent and are not given to the crop runs.
"""

from __future__ import annotations

import torch

from ...kernels.multi_concept.region_layout import compose_layout, layout_crops, per_sample


def _default_run(apply_model, args: dict) -> torch.Tensor:
    return apply_model(args["input"], args["timestep"], **args["c"])


def _cond_rows(flags: list, batch: int) -> torch.Tensor | None:
    """Indices of the conditional rows (ComfyUI's ``cond_or_uncond``: one flag per chunk, 0 = positive)."""
    if not flags or batch % len(flags):
        return None
    per = batch // len(flags)
    rows = [i for i, flag in enumerate(flags) for _ in range(per) if flag == 0]
    return torch.tensor(rows, dtype=torch.long) if rows else None


def _crop_args(value, rows: torch.Tensor, batch: int, spatial: tuple[int, int], crop):
    """A conditioning value for a crop run: per-row tensors restricted to ``rows``; latent-shaped ones cropped too."""
    value = per_sample(value, rows, batch)
    if isinstance(value, torch.Tensor) and value.dim() == 4 and tuple(value.shape[-2:]) == spatial:
        return crop.crop(value)
    return value


class RegionLayoutWrapper:
    """The ``model_function_wrapper`` of a region layout; shared by clones (immutable apart from a crop cache)."""

    def __init__(self, masks: torch.Tensor, regions: int, part_length: int, sigma_from: float, factor: int,
                 previous=None):
        self.masks = masks.detach().float().cpu()
        self.regions, self.part_length = regions, part_length
        self.sigma_from, self.factor = float(sigma_from), factor
        self.previous = previous
        self._crops: dict[tuple[int, int], list] = {}

    def __deepcopy__(self, memo):
        return self

    def _run(self, apply_model, args: dict) -> torch.Tensor:
        return (self.previous or _default_run)(apply_model, args)

    def __call__(self, apply_model, args: dict) -> torch.Tensor:
        out = self._run(apply_model, args)
        x, sigma, c = args["input"], args["timestep"], args["c"]
        context = c.get("c_crossattn")
        span = (1 + self.regions) * self.part_length
        if (x.dim() != 4 or context is None or context.shape[1] % span
                or float(sigma.flatten()[0]) < self.sigma_from):
            return out
        batch = x.shape[0]
        rows = _cond_rows(list(args.get("cond_or_uncond") or []), batch)
        if rows is None:
            return out
        spatial = tuple(x.shape[-2:])
        if spatial not in self._crops:
            self._crops[spatial] = layout_crops(self.masks, spatial[0], spatial[1], self.factor)
        crops = self._crops[spatial]
        cond_chunks = sum(1 for f in args["cond_or_uncond"] if f == 0)
        options = dict(c.get("transformer_options", {}))
        options["cond_or_uncond"] = [0] * cond_chunks
        if "uuids" in options:
            options["uuids"] = [u for u, f in zip(options["uuids"], args["cond_or_uncond"]) if f == 0]
        predictions = []
        device_rows = rows.to(x.device)
        for i, crop in enumerate(crops):
            part = context[device_rows, (1 + i) * self.part_length:(2 + i) * self.part_length]
            crop_c = {k: _crop_args(v, rows, batch, spatial, crop) for k, v in c.items()
                      if k not in ("control", "transformer_options", "c_crossattn")}
            crop_c.update(c_crossattn=part, transformer_options=options)
            predictions.append(self._run(apply_model, {"input": crop.crop(x[device_rows]),
                                                       "timestep": sigma[device_rows], "c": crop_c,
                                                       "cond_or_uncond": [0] * cond_chunks}))
        composed = out.clone()
        composed[device_rows] = compose_layout(out[device_rows], predictions, crops)
        return composed


def install_layout(model, masks: torch.Tensor, regions: int, part_length: int, until: float) -> str:
    """Put a :class:`RegionLayoutWrapper` on ``model`` (a clone: its model_options are its own) for the first
    ``until`` of the schedule. Returns a line for the user."""
    sigma_from = model.get_model_object("model_sampling").percent_to_sigma(until)
    channel_mult = getattr(model.get_model_object("diffusion_model"), "channel_mult", None) or (1,)
    factor = 2 ** (len(channel_mult) - 1)
    previous = model.model_options.get("model_function_wrapper")
    model.set_model_unet_function_wrapper(RegionLayoutWrapper(masks, regions, part_length, sigma_from, factor,
                                                               previous))
    kept = " (around the MODEL's existing model wrapper)" if previous is not None else ""
    return (f"region layout for the first {until:.0%} of the schedule: each region's crop of the latent is "
            f"denoised with its own prompt{kept}")
