"""Model augmentation: a copy of a Keras model with warp layers inserted after selected layers.

The other way to warp a model, model partitioning, needs no new layers: `tfmeta.Partition(slow=[...])` makes
existing layers slow, and WarpGrad meta-learns them as warps while the inner loop adapts the rest.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Optional, Sequence, Union

import keras

LayerSelector = Union[str, Sequence[str], Callable[[keras.layers.Layer], bool]]
WarpFactory = Union[type, Callable[[keras.layers.Layer], keras.layers.Layer]]


def _selector(after: LayerSelector) -> Callable[[keras.layers.Layer], bool]:
    if callable(after):
        return after
    patterns = [after] if isinstance(after, str) else list(after)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"`after` must be a glob, a list of globs or a predicate on layers; got {after!r}.")
    return lambda layer: any(fnmatch.fnmatchcase(layer.name, p) for p in patterns)


def insert_warps(model: keras.Model, warp: WarpFactory, after: LayerSelector, copy_weights: bool = True,
                 name: Optional[str] = None) -> keras.Model:
    """A copy of `model` (Sequential or functional) with a warp layer after every layer `after` selects.

    Args:
      model: a built Keras model.
      warp: a warp layer class, instantiated as `warp(name=f"warp_{layer.name}", dtype=layer.dtype_policy)`, or
        a function of the selected layer returning the warp layer to put after it.
      after: glob(s) matched against layer names (e.g. `"act_*"` after each conv4 block's activation), or a
        predicate on layers.
      copy_weights: start the copied layers from `model`'s weights (otherwise they are re-initialised).
    """
    selected = _selector(after)
    if isinstance(warp, type):
        make_warp = lambda layer: warp(name=f"warp_{layer.name}", dtype=layer.dtype_policy)  # noqa: E731
    else:
        make_warp = warp
    hits = []

    def warp_after(layer, outputs):
        if not selected(layer):
            return outputs
        hits.append(layer.name)
        return make_warp(layer)(outputs)

    if isinstance(model, keras.Sequential):
        layers = []
        for layer in model.layers:
            layers.append(layer.__class__.from_config(layer.get_config()))
            if selected(layer):
                hits.append(layer.name)
                layers.append(make_warp(layer))
        warped = keras.Sequential([keras.Input(model.input_shape[1:]), *layers], name=name or f"warped_{model.name}")
    else:
        warped = keras.models.clone_model(
            model, call_function=lambda layer, *args, **kwargs: warp_after(layer, layer(*args, **kwargs)))
        if name:
            warped.name = name
    if not hits:
        raise ValueError(f"`after` selects no layer of model '{model.name}'; its layers are "
                         f"{[layer.name for layer in model.layers]}.")
    if copy_weights:
        for layer in model.layers:
            if layer.weights:
                warped.get_layer(layer.name).set_weights(layer.get_weights())
    return warped
