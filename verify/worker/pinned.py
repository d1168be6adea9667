"""The Keras config every worker runs with (verify/processes.py sets it up), and the
worker's check that it does."""

# Keras's defaults (keras/src/backend/config.py)
PINNED_KERAS_CONFIG = {"floatx": "float32", "epsilon": 1e-07,
                       "image_data_format": "channels_last", "nnx_enabled": False}


def check_pinned(keras) -> dict:
    """In a worker: the Keras config it runs with; raises if it is not the pinned one."""
    seen = {"floatx": keras.config.floatx(), "epsilon": keras.config.epsilon(),
            "image_data_format": keras.config.image_data_format(),
            "backend": keras.backend.backend()}
    for key in ("floatx", "epsilon", "image_data_format"):
        if seen[key] != PINNED_KERAS_CONFIG[key]:
            raise RuntimeError(f"Keras runs with {key}={seen[key]!r}, not the pinned "
                               f"{PINNED_KERAS_CONFIG[key]!r}")
    return seen
