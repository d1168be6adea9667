"""The self-contained HTML report: one file, figures embedded as base64 PNG."""

from __future__ import annotations

import json
from html import escape

from verify.convergence import tables
from verify.report import htmlkit

STYLE = """
td.holds { background: #d9f2d9; } td.some { background: #fff2cc; }
td.fails { background: #f8d7da; } td.none { background: #eee; }
"""

VERDICT_CLASS = {"holds": "holds", "holds on some seeds": "some", "does not hold": "fails",
                 "not measured": "none"}


def _table(headers, body, verdict_column=None) -> str:
    return htmlkit.table(headers, body, cell_class=lambda i, cell: (
        VERDICT_CLASS[cell] if i == verdict_column else None))


def _img(images, name, alt) -> str:
    return htmlkit.img(images[name], alt)


def render(doc: dict, images: dict) -> str:
    settings, env = doc["settings"], doc["environment"]
    parts = ["<h1>The article's make_moons experiment, reproduced</h1>",
             f"<p>{escape(tables.settings_line(settings, env))}</p>",
             "<p>Model, data and training as in the article: Dense 12-13-13 relu, Dense 2 "
             "softmax; <code>make_moons(n_samples=300, noise=0.1, random_state=42)</code>; "
             "<code>sparse_categorical_crossentropy</code>, batch size 32, real "
             "<code>model.fit</code>.</p>",
             "<h2>Claims</h2>", f"<p>{escape(tables.CRITERIA_NOTE)}</p>"]
    headers, body = tables.claim_table(doc["claims"])
    parts.append(_table(headers, body, verdict_column=len(headers) - 1))
    parts.append("<h3>Thresholds</h3>")
    parts.append(_table(*tables.threshold_table()))
    parts.append("<h3>Measures</h3><ul>" + "".join(
        f"<li><code>{escape(k)}</code>: {escape(v)}</li>" for k, v in doc["measures"].items())
        + "</ul>")
    parts.append("<h3>Statements the curves cannot decide</h3><ul>" + "".join(
        f"<li>{escape(s['section'])}: \u201c{escape(s['quote'])}\u201d: {escape(s['why'])}</li>"
        for s in doc["not_from_curves"]) + "</ul>")
    parts.append("<h2>All configurations</h2>")
    parts.append(_img(images, tables.OVERLAY, "all configurations, log-log"))
    parts.append("<h2>Configurations</h2><p>Over seeds: median [min, max]; <i>reached near zero</i> "
                 "counts the seeds that got below the near-zero loss within the run.</p>")
    parts.append(_table(*tables.configuration_table(doc["configurations"])))
    for config_id in settings["optimizers"]:
        parts.append(f"<h3>{escape(config_id)}: "
                     f"{escape(settings['configurations_described'][config_id])}</h3>")
        parts.append(_img(images, f"{config_id}.png", config_id))
    parts.append("<hr><h2>Environment</h2><pre>" + escape(json.dumps(env, indent=1)) + "</pre>")
    return htmlkit.page("make_moons experiment: claims", parts, STYLE)
