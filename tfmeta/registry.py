"""One registration for a meta-learner, update rule or metric learner: Keras serialization and gin."""

from __future__ import annotations

from typing import Callable, Optional

import gin
import keras


def register(cls: Optional[type] = None, *, package: str = "tfmeta") -> type | Callable[[type], type]:
    """Class decorator: registers `cls` with Keras' serialization (so `.keras` files and `get_config` round trips
    find it, as `package>Name`) and with gin (as `package.Name`, so configs bind `Name.argument`), and returns it
    unchanged. `@tfmeta.register` or `@tfmeta.register(package="mine")`."""

    def wrap(cls: type) -> type:
        cls = keras.saving.register_keras_serializable(package=package)(cls)
        with gin.unlock_config():  # a class defined after a config was parsed (and locked) registers too
            gin.external_configurable(cls, module=package)  # Keras layers cannot be decorated by gin itself
        return cls

    return wrap if cls is None else wrap(cls)
