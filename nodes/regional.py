"""Nodes ``FSP_Region`` and ``FSP_ApplyRegions``: Mix-of-Show's regionally controllable sampling (Gu et al., NeurIPS
2023, §3.4) for the stock KSampler: each region's prompt drives cross-attention inside its mask or box, the global
prompt elsewhere."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .backend.regional import add_region, apply_regions

RegionsSocket = io.Custom("FSP_REGIONS")
MAX_SIZE = 16384  # ComfyUI's MAX_RESOLUTION


class RegionPromptNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        def pixel(name: str, default: int, tip: str) -> io.Int.Input:
            return io.Int.Input(name, default=default, min=0, max=MAX_SIZE, step=8,
                                tooltip=tip + " (used when no mask is connected)")

        return io.Schema(
            node_id="FSP_Region",
            display_name="Region prompt",
            category="fewshot/sampling",
            description="One region of Mix-of-Show's regional sampling: a prompt (e.g. with an ED-LoRA token) that "
                        "drives the image inside a mask or a pixel box. Chain several through 'regions', then "
                        "connect to Apply regional sampling.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The region's prompt from CLIP Text Encode (the same "
                                      "CLIP as the global prompt; an ED-LoRA / fused CLIP is fine). Only its text "
                                      "is used; the pooled output stays the global prompt's."),
                io.Mask.Input("mask", optional=True, tooltip="Where the region is (any size: resized to width x "
                              "height, then to each attention layer's grid). Without a mask, the box below is used."),
                RegionsSocket.Input("regions", optional=True, tooltip="Regions from an earlier Region prompt node; "
                                    "this one is added after them."),
                pixel("x0", 0, "Left edge of the box in pixels."),
                pixel("y0", 0, "Top edge of the box in pixels."),
                pixel("x1", 512, "Right edge of the box in pixels (exclusive)."),
                pixel("y1", 512, "Bottom edge of the box in pixels (exclusive)."),
                io.Int.Input("width", default=512, min=8, max=MAX_SIZE, step=8,
                             tooltip="Width of the image you sample (as in Empty Latent Image); the box and the mask "
                                     "are on an image of this size."),
                io.Int.Input("height", default=512, min=8, max=MAX_SIZE, step=8,
                             tooltip="Height of the image you sample (as in Empty Latent Image)."),
            ],
            outputs=[RegionsSocket.Output(display_name="REGIONS")],
        )

    @classmethod
    def execute(cls, conditioning, x0, y0, x1, y1, width, height, mask=None, regions=None) -> io.NodeOutput:
        out, text = add_region(regions, conditioning, mask, (x0, y0, x1, y1), width, height)
        return io.NodeOutput(out, ui=ui.PreviewText(text))


class ApplyRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FSP_ApplyRegions",
            display_name="Apply regional sampling",
            category="fewshot/sampling",
            description="Mix-of-Show's regional sampling (§3.4): in every cross-attention layer the image inside "
                        "each region attends to that region's prompt, elsewhere to the global prompt; overlaps are "
                        "averaged; optionally a region layout first, which makes each region draw its own object. "
                        "Feed both outputs to the stock KSampler (the negative prompt as usual).",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (after Apply ED-LoRA / fused concepts when "
                               "the prompts use concept tokens). It is not changed: a patched copy is output."),
                io.Conditioning.Input("positive", tooltip="The global prompt (CLIP Text Encode): the whole scene, "
                                      "e.g. 'a <cat1> and a <dog1> on the beach'. Its pooled output is kept."),
                RegionsSocket.Input("regions", tooltip="The regions (Region prompt nodes, chained)."),
                io.Float.Input("layout", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Region layout: for this share of the steps (from the first; e.g. 0.4) each "
                                       "region's part of the latent is also denoised as a picture of its own with its "
                                       "prompt, so that each region draws its own object (area composition). 0: off."),
                io.Boolean.Input("region_attention", default=True, optional=True,
                                 tooltip="Mix-of-Show's region-aware cross-attention in every step. Off: the layout "
                                         "alone places the objects (needs layout > 0)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.Conditioning.Output(display_name="positive")],
        )

    @classmethod
    def execute(cls, model, positive, regions, layout=0.0, region_attention=True) -> io.NodeOutput:
        out, conditioning, text = apply_regions(model, positive, regions, layout, region_attention)
        return io.NodeOutput(out, conditioning, ui=ui.PreviewText(text))
