"""headwise: find out what every attention head of a transformer does, show it, put it to work.

    import headwise
    m = headwise.load("smollm2-135m")
    atlas = headwise.profile(m)
    atlas.save("atlas-smollm2")
"""

from .atlas import Atlas
from .errors import HeadwiseError
from .geometry import Geometry
from .instrument import (
           AttentionChunk,
           HeadEdits,
           Observer,
           Session,
           ablation_scale,
           attach,
           single_head_ablation_scales,
)
from .load import LoadedModel, ModelInfo, from_model, load
from .profile import ProfileSettings, profile

__all__ = ["Atlas", "AttentionChunk", "Geometry", "HeadEdits", "HeadwiseError", "LoadedModel", "ModelInfo",
           "Observer", "ProfileSettings", "Session", "ablation_scale", "attach", "from_model", "load", "profile",
           "single_head_ablation_scales"]
