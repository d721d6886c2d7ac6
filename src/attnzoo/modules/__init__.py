"""Attention modules, one file per paper. Importing this package registers all of them.

Each paper's file is imported explicitly below; a new module adds one import line here.
"""

from __future__ import annotations

from attnzoo.modules.bam import (
    BAM,
    bam_param_count,
)
from attnzoo.modules.cbam import (
    CBAM,
    ChannelGate,
    SpatialGate,
    cbam_param_count,
    channel_gate_param_count,
    spatial_gate_param_count,
)
from attnzoo.modules.ccnet import (
    CrissCrossAttention,
    cca_param_count,
)
from attnzoo.modules.coord import (
    CoordinateAttention,
    ca_param_count,
)
from attnzoo.modules.danet import (
    DANetChannelAttention,
    DANetPositionAttention,
    DualAttention,
    cam_param_count,
    dual_attention_param_count,
    pam_param_count,
)
from attnzoo.modules.eca import (
    EfficientChannelAttention,
    eca_kernel_size,
    eca_param_count,
)
from attnzoo.modules.ema import (
    EfficientMultiScaleAttention,
    ema_param_count,
)
from attnzoo.modules.fca import (
    MultiSpectralAttention,
    fca_param_count,
)
from attnzoo.modules.gather_excite import (
    GatherExcite,
    ge_hidden_channels,
    ge_param_count,
)
from attnzoo.modules.gc import (
    GlobalContext,
    gc_param_count,
)
from attnzoo.modules.nam import (
    NAM,
    PixelNorm,
    nam_param_count,
)
from attnzoo.modules.nonlocal_ import (
    NonLocal1d,
    NonLocal2d,
    NonLocal3d,
    nonlocal_param_count,
)
from attnzoo.modules.psa import (
    PolarizedSelfAttention,
    psa_param_count,
)
from attnzoo.modules.sagan import (
    SAGANSelfAttention,
    sagan_param_count,
)
from attnzoo.modules.scse import (
    SpatialChannelSE,
    scse_param_count,
)
from attnzoo.modules.se import (
    SqueezeExcitation,
    se_hidden_channels,
    se_param_count,
)
from attnzoo.modules.shuffle import (
    ShuffleAttention,
    channel_shuffle,
    sa_param_count,
)
from attnzoo.modules.simam import (
    SimAM,
    simam_param_count,
)
from attnzoo.modules.sk import (
    SelectiveKernel,
    sk_param_count,
)
from attnzoo.modules.triplet import (
    TripletAttention,
    TripletGate,
    triplet_param_count,
)

__all__ = [
    "BAM",
    "bam_param_count",
    "CBAM",
    "ChannelGate",
    "SpatialGate",
    "cbam_param_count",
    "channel_gate_param_count",
    "spatial_gate_param_count",
    "CrissCrossAttention",
    "cca_param_count",
    "CoordinateAttention",
    "ca_param_count",
    "DANetPositionAttention",
    "DANetChannelAttention",
    "DualAttention",
    "pam_param_count",
    "cam_param_count",
    "dual_attention_param_count",
    "EfficientChannelAttention",
    "eca_kernel_size",
    "eca_param_count",
    "EfficientMultiScaleAttention",
    "ema_param_count",
    "MultiSpectralAttention",
    "fca_param_count",
    "GatherExcite",
    "ge_hidden_channels",
    "ge_param_count",
    "GlobalContext",
    "gc_param_count",
    "NAM",
    "PixelNorm",
    "nam_param_count",
    "NonLocal1d",
    "NonLocal2d",
    "NonLocal3d",
    "nonlocal_param_count",
    "PolarizedSelfAttention",
    "psa_param_count",
    "SAGANSelfAttention",
    "sagan_param_count",
    "SpatialChannelSE",
    "scse_param_count",
    "SqueezeExcitation",
    "se_param_count",
    "se_hidden_channels",
    "ShuffleAttention",
    "channel_shuffle",
    "sa_param_count",
    "SimAM",
    "simam_param_count",
    "SelectiveKernel",
    "sk_param_count",
    "TripletAttention",
    "TripletGate",
    "triplet_param_count",
]
