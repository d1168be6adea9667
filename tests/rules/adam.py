"""Keras's Adam, keras/src/optimizers/adam.py, update_step (Keras 3), in plain numpy:

    alpha = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)
    m += (g - m) * (1 - beta_1);  v += (g**2 - v) * (1 - beta_2)
    w -= m * alpha / (sqrt(v) + epsilon)
"""

import numpy as np


def update(step, gradient, weight, slots, learning_rate=0.001, beta_1=0.9, beta_2=0.999,
           epsilon=1e-7, **hyperparameters):
    m, v = slots["momentum"], slots["velocity"]
    alpha = learning_rate * np.sqrt(1 - beta_2 ** step) / (1 - beta_1 ** step)
    m = m + (gradient - m) * (1 - beta_1)
    v = v + (np.square(gradient) - v) * (1 - beta_2)
    weight = weight - m * alpha / (np.sqrt(v) + epsilon)
    return weight, {"momentum": m, "velocity": v}
