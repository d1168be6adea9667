"""Helper for tests/test_convergence.py, run as a script with KERAS_BACKEND set:
python tests/convergence_equivalence.py EPOCHS SEEDS CONFIG_ID...

For each configuration, trains the stacked model (one copy per seed) and, for
each seed, the article's own model alone on the same initial weights and batch
order; prints one JSON line per configuration with the largest differences of
the per-epoch losses and of the final weights.  The first configuration's
stacked run is repeated: its line says whether the repeat was identical, bit
for bit."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from verify.configurations import CONFIGURATIONS  # noqa: E402
from verify.convergence import model  # noqa: E402


def compare(config_id, seeds, epochs, repeat):
    config = CONFIGURATIONS[config_id].keras_config()
    curves, weights = model.train(config, seeds, epochs)
    result = {"id": config_id, "loss_diff": 0.0, "weight_diff": 0.0, "weight_scale": 0.0,
              "loss_range": [float(curves["loss"].min()), float(curves["loss"].max())]}
    if repeat:
        again, _ = model.train(config, seeds, epochs)
        result["repeat_identical"] = all(np.array_equal(curves[m], again[m]) for m in curves)
    for k, seed in enumerate(seeds):
        history, single = model.train_single(config, seed, epochs)
        result["loss_diff"] = max(result["loss_diff"], float(np.max(np.abs(
            np.asarray(history["loss"]) - curves["loss"][k]))))
        for a, b in zip(single, weights[k]):
            result["weight_diff"] = max(result["weight_diff"], float(np.max(np.abs(a - b))))
            result["weight_scale"] = max(result["weight_scale"], float(np.max(np.abs(a))))
    return result


def main(epochs, seeds, ids):
    for i, config_id in enumerate(ids):
        print(json.dumps(compare(config_id, seeds, epochs, repeat=i == 0)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(s) for s in sys.argv[2].split(",")], sys.argv[3:])
