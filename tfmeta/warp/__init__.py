"""WarpGrad's warp layers and the helper that inserts them into a model (the algorithm: `tfmeta.WarpGrad`)."""

from tfmeta.warp.augment import insert_warps
from tfmeta.warp.layers import (FiLM, ResidualWarp, WarpConv2D, WarpConvBlock, WarpDense, WarpLayer,
                                WarpRNNCell, WarpScale)

__all__ = ["FiLM", "ResidualWarp", "WarpConv2D", "WarpConvBlock", "WarpDense", "WarpLayer", "WarpRNNCell", "WarpScale",
           "insert_warps"]
