"""Click models built from a feature schema and any embedding layer (ROBE, full tables, a plan's layer, ...).

Every model takes {"dense": float32 [B, n_dense], "sparse": int64 [B, n_sparse]} and returns the click
probability [B, 1].
"""

from tfcompress.models.dcn import Cross, build_dcn
from tfcompress.models.dlrm import DotInteraction, build_dlrm
from tfcompress.models.mlp import build_mlp

__all__ = ["Cross", "DotInteraction", "build_dcn", "build_dlrm", "build_mlp"]
