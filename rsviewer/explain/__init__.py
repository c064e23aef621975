"""Explanations of a retrieval match (SPEC §6): which pixels and which words carry the
similarity of an image with a query.

    from rsviewer.explain import explain, available_methods
    ex = explain(model, "tile.jpg", "two tennis courts", "gradcam")
    ex.heatmap            # (H, W) float32 in [0, 1] at the image's resolution

Methods (:data:`METHODS`): ``gradcam``, ``gradcam++``, ``scorecam`` (on the image–text
similarity), ``rollout`` (attention rollout of a transformer stack), ``attention``
(the architecture's own maps), ``patch`` (query vs each projected local feature),
``tokens`` (MSSA semantic tokens), ``words`` (which query words carry the match).
Overlays and PNGs: :mod:`rsviewer.explain.overlay`; deletion/insertion faithfulness:
:mod:`rsviewer.explain.faithfulness`. No Qt is imported here.
"""
from .core import (
    CAM_METHODS,
    HEATMAP_METHODS,
    METHODS,
    Explanation,
    ImageSimilarityTarget,
    SimilarityTarget,
    gradcam_layer_names,
    map_stats,
    upsample,
)
from .run import available_methods, broken_methods, explain

__all__ = [
    "CAM_METHODS",
    "HEATMAP_METHODS",
    "METHODS",
    "Explanation",
    "ImageSimilarityTarget",
    "SimilarityTarget",
    "available_methods",
    "broken_methods",
    "explain",
    "gradcam_layer_names",
    "map_stats",
    "upsample",
]
