"""The report's tables and sentences, shared by the markdown and HTML renderings."""

from __future__ import annotations

from verify.convergence import claims as claims_mod

OVERLAY = "overlay.png"


def fmt(x, kind="loss") -> str:
    if x is None:
        return "-"
    if x == "inf":
        return "never"
    if kind == "epochs":
        return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
    return f"{x:.3g}"


def span(summary: dict, kind="loss") -> str:
    if not summary.get("runs"):
        return "-"
    return f"{fmt(summary['median'], kind)} [{fmt(summary['min'], kind)}, " \
           f"{fmt(summary['max'], kind)}]"


def measured(row: dict) -> str:
    kind = "epochs" if row["measure"] == "epochs_to_near_zero" else "loss"
    parts = []
    for key, summary in row["values"].items():
        label = f"vs {key}: " if key else ""
        parts.append(label + span(summary, kind))
    return "; ".join(parts) or row.get("reason", "-")


def holding(row: dict) -> str:
    if not row["runs"]:
        return "-"
    per = ", ".join(f"{b} {v['holding']}/{v['runs']}" for b, v in row["by_backend"].items())
    return f"{row['holding']}/{row['runs']} ({per})"


def claim_table(rows) -> tuple:
    headers = ["#", "section", "statement (quoted)", "criterion", "measured: median [min, max]",
               "runs where it holds", "verdict"]
    body = [[i + 1, r["section"], f"\u201c{r['quote']}\u201d", r["criterion"], measured(r),
             holding(r), r["verdict"]] for i, r in enumerate(rows)]
    return headers, body


def configuration_rows(curves: dict) -> list:
    rows = []
    for backend, by_config in curves.items():
        for config_id, c in by_config.items():
            stats = claims_mod.configuration_stats(c["loss"])
            reached = stats["epochs_to_near_zero"]
            rows.append({
                "configuration": config_id, "backend": backend, "epochs": stats["epochs"],
                "seeds": int(c["loss"].shape[0]),
                "epochs_to_near_zero": reached, "epochs_to": stats["epochs_to"],
                "final_loss": stats["final_loss"],
                "final_accuracy": claims_mod._summary(c["accuracy"][:, -1]),
                "max_rebound": stats["max_rebound"]})
    return rows


def configuration_table(rows) -> tuple:
    headers = ["configuration", "backend", "epochs",
               *(f"epochs to loss < {level}" + (" (near zero)" if level == claims_mod.NEAR_ZERO
                                                else "") for level in claims_mod.LEVELS),
               "reached near zero", "final loss", "final accuracy", "largest rebound"]
    body = [[r["configuration"], r["backend"], r["epochs"],
             *(span(r["epochs_to"][str(level)], "epochs") for level in claims_mod.LEVELS),
             f"{r['epochs_to_near_zero']['finite']}/{r['seeds']}", span(r["final_loss"]),
             span(r["final_accuracy"]), span(r["max_rebound"])] for r in rows]
    return headers, body


def threshold_table() -> tuple:
    return (["name", "value", "why"],
            [[k, v["value"], v["why"]] for k, v in claims_mod.THRESHOLDS.items()])


CRITERIA_NOTE = (
    "The criteria and thresholds were fixed in `verify/convergence/claims.py` before the "
    "first full run and were not changed after seeing results. Each run is one seed on one "
    "backend; seeds fix the initial weights (Keras's glorot-uniform/zeros, drawn with numpy) "
    "and the batch order, the same on every backend and for every configuration, so "
    "comparisons are paired by seed. Epoch k is Keras's epoch-mean training loss "
    "(`history['loss'][k-1]`), the value the article plots. Verdict: *holds* on every run, "
    "*does not hold* on none, *holds on some seeds* otherwise.")


def settings_line(settings: dict, environment: dict) -> str:
    epochs = ", ".join(f"{c} {settings['epochs'][c]}" for c in settings["optimizers"])
    return (f"{len(settings['optimizers'])} configurations x {settings['seeds']} seeds x "
            f"backends {', '.join(settings['backends'])}; epochs: {epochs}; "
            f"wall time {environment['wall_seconds']:.0f} s")
