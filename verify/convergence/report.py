"""Write the experiment's report: claims.json, claims.md, report.html, PNGs, curves.npz."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tabulate import tabulate

from verify.convergence import claims as claims_mod
from verify.convergence import html, plots
from verify.convergence.tables import (CRITERIA_NOTE, OVERLAY, claim_table, configuration_rows,
                                       configuration_table, settings_line, threshold_table)


def write(out: Path, curves: dict, settings: dict, environment: dict) -> list:
    """Write every file into `out` (an empty folder); returns the claim rows."""
    keras_version = ", ".join(sorted({e["keras"] for e in environment["backends"].values()}))
    losses = {b: {c: v["loss"] for c, v in by.items()} for b, by in curves.items()}
    rows = claims_mod.evaluate_all(losses)
    config_rows = configuration_rows(curves)
    images = {}
    for config_id in settings["optimizers"]:
        name = f"{config_id}.png"
        images[name] = plots.configuration_figure(
            config_id, settings["configurations_described"][config_id],
            {b: losses[b][config_id] for b in losses}, keras_version)
    images[OVERLAY] = plots.overlay_figure(losses, keras_version)
    for name, data in images.items():
        (out / name).write_bytes(data)
    np.savez_compressed(out / "curves.npz", **{
        f"{b}/{c}/{metric}": v[metric].astype(np.float32)
        for b, by in curves.items() for c, v in by.items() for metric in ("loss", "accuracy")})
    document = {"environment": environment, "settings": settings,
                "thresholds": claims_mod.THRESHOLDS, "measures": claims_mod.MEASURES,
                "claims": rows, "not_from_curves": claims_mod.NOT_FROM_CURVES,
                "configurations": config_rows}
    (out / "claims.json").write_text(json.dumps(document, indent=1) + "\n")
    (out / "claims.md").write_text(markdown(document))
    (out / "report.html").write_text(html.render(document, images))
    return rows


def markdown(doc: dict) -> str:
    settings, env = doc["settings"], doc["environment"]
    lines = ["# The article's make_moons experiment, reproduced", "",
             settings_line(settings, env), "",
             "Model, data and training as in the article: Dense 12-13-13 relu, Dense 2 "
             "softmax; `make_moons(n_samples=300, noise=0.1, random_state=42)`; "
             "`sparse_categorical_crossentropy`, batch size 32, real `model.fit`.", "",
             "## Claims", "", CRITERIA_NOTE, ""]
    headers, body = claim_table(doc["claims"])
    lines += [tabulate(body, headers, tablefmt="github"), "", "### Thresholds", ""]
    headers, body = threshold_table()
    lines += [tabulate(body, headers, tablefmt="github"), "", "### Measures", ""]
    lines += [f"- `{k}`: {v}" for k, v in doc["measures"].items()]
    lines += ["", "### Statements the curves cannot decide", ""]
    lines += [f"- {s['section']}: \u201c{s['quote']}\u201d: {s['why']}"
              for s in doc["not_from_curves"]]
    lines += ["", "## Configurations", "",
              "Over seeds: median [min, max]; `reached near zero` counts the seeds that got below the "
              "near-zero loss within the run.", ""]
    headers, body = configuration_table(doc["configurations"])
    lines += [tabulate(body, headers, tablefmt="github"), "", "## Plots", "",
              f"![all configurations]({OVERLAY})", ""]
    lines += [f"![{c}]({c}.png)" for c in settings["optimizers"]]
    lines += ["", "---", "", "## Environment", "", "```",
              json.dumps(env, indent=1), "```", ""]
    return "\n".join(lines)
