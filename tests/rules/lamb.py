"""Keras's Lamb, keras/src/optimizers/lamb.py, update_step (Keras 3), in plain numpy:
Adam's moments, their bias-corrected ratio r, and the trust ratio ||w|| / ||r|| of
the whole weight (1 where either norm is 0)."""

import numpy as np


def update(step, gradient, weight, slots, learning_rate=0.001, beta_1=0.9, beta_2=0.999,
           epsilon=1e-7, **hyperparameters):
    m, v = slots["momentum"], slots["velocity"]
    m = m + (gradient - m) * (1 - beta_1)
    v = v + (np.square(gradient) - v) * (1 - beta_2)
    r = (m / (1.0 - beta_1 ** step)) / (np.sqrt(v / (1.0 - beta_2 ** step)) + epsilon)
    w_norm, r_norm = np.linalg.norm(weight), np.linalg.norm(r)
    ratio = np.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, 1.0)
    return weight - ratio * learning_rate * r, {"momentum": m, "velocity": v}
