"""The article's experiment: data, model, initial weights, batch order, training.

Imports keras, so the backend must be chosen (KERAS_BACKEND) before importing
this module.  Two models train on the same data:

- `article_model()`: the article's MLP, built with its own code (Dense 12-13-13
  relu, Dense 2 softmax);
- `stacked_model(n)`: n independent copies of that MLP in one Keras model.  Each
  Dense layer becomes one weight tensor [n, in, out] whose slice k is copy k's
  kernel, input and output are [batch, n, ...] and copy k reads column k.  The
  loss is the sum over copies of each copy's mean loss, so the gradient of copy
  k's slice is exactly the gradient of copy k's own loss; every configuration's
  optimizer is elementwise, so copy k's update is its own.  tests/test_convergence.py
  checks this against separate `article_model()` runs.

A seed fixes a copy's initial weights and its batch order, drawn with numpy, so
a seed starts every configuration and every backend from the same weights and
feeds the same batches.
"""

from __future__ import annotations

import copy
import zlib

import keras
import numpy as np
from keras import layers, ops

HIDDEN = (12, 13, 13)
CLASSES = 2
BATCH_SIZE = 32
N_SAMPLES = 300
NOISE = 0.1
DATA_SEED = 42


def dataset():
    """make_moons(n_samples=300, noise=0.1, random_state=42), as in the article."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=N_SAMPLES, noise=NOISE, random_state=DATA_SEED)
    return x.astype("float32"), y.astype("int32")


def _rng(seed: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def layer_sizes(inputs: int = 2) -> list:
    sizes = [inputs, *HIDDEN, CLASSES]
    return list(zip(sizes[:-1], sizes[1:]))


def initial_weights(seed: int) -> list:
    """[kernel, bias, ...] of the article's model for one seed: Keras's Dense
    defaults (glorot_uniform kernel, zero bias), drawn with numpy."""
    rng = _rng(seed, "initial weights")
    weights = []
    for fan_in, fan_out in layer_sizes():
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        weights.append(rng.uniform(-limit, limit, (fan_in, fan_out)).astype("float32"))
        weights.append(np.zeros(fan_out, "float32"))
    return weights


def batch_orders(seeds):
    """Endless epochs: each yields [copies, N_SAMPLES] sample indices, a fresh
    permutation per seed and epoch (a seed's sequence does not depend on the
    other seeds)."""
    rngs = [_rng(seed, "batch order") for seed in seeds]
    while True:
        yield np.stack([rng.permutation(N_SAMPLES) for rng in rngs])


def article_model(input_shape=(2,)):
    """The article's build_model, verbatim."""
    inputs = layers.Input(shape=input_shape)
    x = layers.Dense(12, activation='relu')(inputs)
    x = layers.Dense(13, activation='relu')(x)
    x = layers.Dense(13, activation='relu')(x)
    outputs = layers.Dense(2, activation='softmax')(x)
    return keras.Model(inputs=inputs, outputs=outputs)


class StackedDense(layers.Layer):
    """n independent Dense layers: [batch, n, in] -> [batch, n, out]."""

    def __init__(self, copies, units, activation, **kwargs):
        super().__init__(**kwargs)
        self.copies, self.units = copies, units
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        self.kernel = self.add_weight((self.copies, input_shape[-1], self.units), name="kernel")
        self.bias = self.add_weight((self.copies, self.units), initializer="zeros", name="bias")

    def call(self, x):
        return self.activation(ops.einsum("bki,kio->bko", x, self.kernel) + self.bias)


def stacked_model(copies: int):
    inputs = layers.Input(shape=(copies, 2))
    x = inputs
    for units in HIDDEN:
        x = StackedDense(copies, units, "relu")(x)
    outputs = StackedDense(copies, CLASSES, "softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def stack_weights(per_copy: list) -> list:
    """Per-copy weight lists -> the stacked model's weights."""
    return [np.stack(tensors) for tensors in zip(*per_copy)]


def unstack_weights(stacked: list, copy: int) -> list:
    return [np.asarray(w)[copy] for w in stacked]


def per_copy_loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


def per_copy_accuracy(y_true, y_pred):
    predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
    return ops.cast(ops.equal(predicted, ops.cast(y_true, "int32")), "float32")


def summed_loss(y_true, y_pred):
    """Per sample, the sum over copies; Keras then averages over the batch, which
    gives the sum over copies of each copy's mean loss."""
    return ops.sum(per_copy_loss(y_true, y_pred), axis=-1)


class PerCopyMean(keras.metrics.Metric):
    """The epoch mean of a per-sample value, one per copy (a vector result)."""

    def __init__(self, fn, copies, name):
        super().__init__(name=name)
        self.fn = fn
        self.total = self.add_variable((copies,), initializer="zeros", name="total")
        self.count = self.add_variable((), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        values = self.fn(y_true, y_pred)
        self.total.assign_add(ops.sum(values, axis=0))
        self.count.assign_add(ops.cast(ops.shape(values)[0], "float32"))

    def result(self):
        return self.total / self.count


def _batches(x, y, seeds, epochs):
    """Yield the batches of every epoch in order: copy k's batch j of an epoch
    holds samples order[k, 32j:32(j+1)] of that epoch's order."""
    orders = batch_orders(seeds)
    for _ in range(epochs):
        order = next(orders)
        for start in range(0, N_SAMPLES, BATCH_SIZE):
            idx = order[:, start:start + BATCH_SIZE].T  # [batch, copies]
            yield x[idx], y[idx]


def steps_per_epoch() -> int:
    return -(-N_SAMPLES // BATCH_SIZE)


class _EpochCallback(keras.callbacks.Callback):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def on_epoch_end(self, epoch, logs=None):
        self.fn(epoch + 1)


def built(optimizer_config: dict):
    """The optimizer of a configuration dict as the verification's workers build it
    (from its class; a serialized schedule deserialized)."""
    from verify.worker.run import build_optimizer

    config = copy.deepcopy(optimizer_config)
    return build_optimizer(keras, config["class_name"], config.get("config", {}))


def train(optimizer_config: dict, seeds, epochs: int, *, on_epoch=None, optimizer=None):
    """Train one stacked model, one copy per seed, with model.fit.

    Returns {"loss": [copies, epochs], "accuracy": [copies, epochs]} (float64
    arrays of Keras's epoch means) and the final weights per copy."""
    seeds = list(seeds)
    copies = len(seeds)
    x, y = dataset()
    model = stacked_model(copies)
    model.set_weights(stack_weights([initial_weights(s) for s in seeds]))
    model.compile(optimizer=optimizer or built(optimizer_config),
                  loss=summed_loss,
                  metrics=[PerCopyMean(per_copy_loss, copies, "copy_loss"),
                           PerCopyMean(per_copy_accuracy, copies, "copy_accuracy")])
    callbacks = [_EpochCallback(on_epoch)] if on_epoch else []
    history = model.fit(_batches(x, y, seeds, epochs), epochs=epochs,
                        steps_per_epoch=steps_per_epoch(), shuffle=False, verbose=0,
                        callbacks=callbacks)
    curves = {name: np.stack([np.asarray(v, dtype="float64") for v in history.history[key]],
                             axis=1)
              for name, key in (("loss", "copy_loss"), ("accuracy", "copy_accuracy"))}
    weights = [unstack_weights(model.get_weights(), k) for k in range(copies)]
    return curves, weights


def train_single(optimizer_config: dict, seed: int, epochs: int, *, optimizer=None):
    """The article's model and fit call for one seed, fed that seed's batch order
    (shuffle=False instead of Keras's shuffling).  Returns the history dict and
    the final weights."""
    x, y = dataset()
    model = article_model()
    model.set_weights(initial_weights(seed))
    model.compile(optimizer=optimizer or built(optimizer_config),
                  loss='sparse_categorical_crossentropy', metrics=['accuracy'])
    batches = ((bx[:, 0], by[:, 0]) for bx, by in _batches(x, y, [seed], epochs))
    history = model.fit(batches, epochs=epochs, steps_per_epoch=steps_per_epoch(),
                        shuffle=False, verbose=0)
    return history.history, model.get_weights()
