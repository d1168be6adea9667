"""Record the per-step gradients of one real training run for the harness's
`moons` scenario: `KERAS_BACKEND=torch python -m verify.convergence.record`.

The article's model and fit call (train_single) for one configuration and seed,
with an optimizer of the same class and config that stores every gradient it
is given before applying it.  torch, because its trainer runs train_step
eagerly, so the optimizer sees concrete gradients.  Writes
verify/data/moons_gradients.npz: `gradients` float32 [steps, parameters] (the
model's trainable weights flattened in order) and the run's description.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

OUTPUT = Path(__file__).resolve().parents[1] / "data" / "moons_gradients.npz"


def recording_optimizer(keras_config: dict, store: list):
    import keras
    from keras import ops

    base = type(keras.optimizers.get(copy.deepcopy(keras_config)))

    class Recording(base):
        def apply(self, grads, trainable_variables=None):
            store.append(np.concatenate([np.ravel(ops.convert_to_numpy(g)) for g in grads]))
            return super().apply(grads, trainable_variables)

    return Recording(**keras_config["config"])


def record(configuration_id: str, seed: int, epochs: int):
    import keras

    from verify.configurations import CONFIGURATIONS
    from verify.convergence import model

    if keras.backend.backend() != "torch":
        raise SystemExit("record with KERAS_BACKEND=torch (its train_step runs eagerly)")
    config = CONFIGURATIONS[configuration_id].keras_config()
    store = []
    history, _ = model.train_single(config, seed, epochs,
                                    optimizer=recording_optimizer(config, store))
    gradients = np.stack(store).astype(np.float32)
    description = {"configuration": configuration_id, "keras_config": config, "seed": seed,
                   "epochs": epochs, "steps": int(gradients.shape[0]),
                   "parameters": int(gradients.shape[1]), "backend": "torch",
                   "keras": keras.__version__, "final_loss": float(history["loss"][-1])}
    return gradients, description


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--output", default=str(OUTPUT))
    args = p.parse_args(argv)
    gradients, description = record(args.optimizer, args.seed, args.epochs)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, gradients=gradients,
                        description=np.array(json.dumps(description)))
    print(json.dumps(description))


if __name__ == "__main__":
    main()
