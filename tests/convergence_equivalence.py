"""Helper for tests/test_convergence.py, run as a script with KERAS_BACKEND set:
python tests/convergence_equivalence.py EPOCHS SEEDS CONFIG_ID...

For each configuration, trains the stacked model (one copy per seed) and, for
each seed, the article's own model alone on the same initial weights and batch
order; prints one JSON line per configuration with the largest differences of
the per-epoch losses and of the final weights, and whether a second stacked run
reproduced the first bit for bit."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from verify.configurations import CONFIGURATIONS  # noqa: E402
from verify.convergence import model  # noqa: E402


def main(epochs, seeds, ids):
    for config_id in ids:
        config = CONFIGURATIONS[config_id].keras_config()
        curves, weights = model.train(config, seeds, epochs)
        again, _ = model.train(config, seeds, epochs)
        loss_diff = weight_diff = 0.0
        weight_scale = 0.0
        for k, seed in enumerate(seeds):
            history, single = model.train_single(config, seed, epochs)
            loss_diff = max(loss_diff, float(np.max(np.abs(
                np.asarray(history["loss"]) - curves["loss"][k]))))
            for a, b in zip(single, weights[k]):
                weight_diff = max(weight_diff, float(np.max(np.abs(a - b))))
                weight_scale = max(weight_scale, float(np.max(np.abs(a))))
        print(json.dumps({
            "id": config_id, "loss_diff": loss_diff, "weight_diff": weight_diff,
            "weight_scale": weight_scale,
            "loss_range": [float(curves["loss"].min()), float(curves["loss"].max())],
            "reproducible": all(np.array_equal(curves[m], again[m]) for m in curves)}),
            flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], sys.argv[3:])
