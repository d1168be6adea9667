"""The update AdamLike should compute, one weight at a time, in plain numpy (Kingma and
Ba 2015, Algorithm 1, with epsilon outside the square root and the bias corrections
folded into the step size, as Keras writes it).  `step` is 1-based; the base
optimizer's features (weight decay, clipping, EMA, accumulation, loss scaling) are
applied around it by the harness, as Keras's base optimizer applies them."""

import numpy as np


def update(step, gradient, weight, slots, learning_rate=0.001, beta_1=0.9, beta_2=0.999,
           epsilon=1e-7, **hyperparameters):
    m, v = slots["momentum"], slots["velocity"]
    alpha = learning_rate * np.sqrt(1 - beta_2 ** step) / (1 - beta_1 ** step)
    m = m + (gradient - m) * (1 - beta_1)
    v = v + (np.square(gradient) - v) * (1 - beta_2)
    weight = weight - m * alpha / (np.sqrt(v) + epsilon)
    return weight, {"momentum": m, "velocity": v}
