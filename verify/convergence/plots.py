"""Loss-curve figures (matplotlib, Agg): one per configuration, one overlay."""

from __future__ import annotations

import numpy as np

from verify.convergence.claims import NEAR_ZERO
from verify.report.figures import plt, png  # Agg, deterministic PNG


def configuration_figure(config_id: str, description: str, losses: dict, keras_version: str
                         ) -> bytes:
    return png(configuration_plot(config_id, description, losses, keras_version))


def overlay_figure(losses: dict, keras_version: str) -> bytes:
    return png(overlay_plot(losses, keras_version))


def configuration_plot(config_id: str, description: str, losses: dict, keras_version: str):
    """losses: backend -> [seeds, epochs].  The article's plot (blue loss against
    epoch, linear axes), one panel per backend: median over seeds, the
    interquartile range and the full range shaded."""
    backends = list(losses)
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.4), squeeze=False,
                             sharey=True)
    top = max(float(np.max(v)) for v in losses.values())
    for ax, backend in zip(axes[0], backends):
        loss = losses[backend]
        epochs = np.arange(1, loss.shape[1] + 1)
        q = np.percentile(loss, [0, 25, 50, 75, 100], axis=0)
        ax.fill_between(epochs, q[0], q[4], color="b", alpha=0.12, linewidth=0, label="range")
        ax.fill_between(epochs, q[1], q[3], color="b", alpha=0.25, linewidth=0,
                        label="interquartile")
        ax.plot(epochs, q[2], "b", linewidth=1.2, label="median")
        ax.axhline(NEAR_ZERO, color="0.4", linestyle=":", linewidth=0.8,
                   label=f"near zero ({NEAR_ZERO})")
        ax.set(xlabel="Epoch", ylabel="Loss", ylim=(0, top * 1.05), xlim=(1, epochs[-1]),
               title=f"{backend}, {loss.shape[0]} seeds")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{config_id}: {description}  (Keras {keras_version})", fontsize=10)
    fig.tight_layout()
    return fig


def overlay_plot(losses: dict, keras_version: str):
    """losses: backend -> configuration id -> [seeds, epochs]; medians over
    seeds, log-log axes, one panel per backend, one legend for all."""
    backends = list(losses)
    fig, axes = plt.subplots(1, len(backends), figsize=(5.5 * len(backends) + 2.2, 4.6),
                             squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    styles = ("-", "--", "-.", ":")
    for ax, backend in zip(axes[0], backends):
        seeds = 0
        for i, (config_id, loss) in enumerate(losses[backend].items()):
            seeds = loss.shape[0]
            epochs = np.arange(1, loss.shape[1] + 1)
            ax.plot(epochs, np.median(loss, axis=0), color=colors(i % 10),
                    linestyle=styles[i % len(styles)], linewidth=1.2, label=config_id)
        ax.axhline(NEAR_ZERO, color="0.4", linestyle=":", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="Epoch (log scale)",
               ylabel="Loss, median over seeds (log scale)", title=f"{backend}, {seeds} seeds")
        ax.grid(True, which="major", linewidth=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(f"All configurations (Keras {keras_version}); dotted line: near zero "
                 f"({NEAR_ZERO})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    return fig
