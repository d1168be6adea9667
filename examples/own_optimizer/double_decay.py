"""A defect found in published custom optimizers: weight decay applied twice.  The
class hands `weight_decay` to the base optimizer (which decays the weights before
`update_step`, decoupled, as AdamW) and decays them again inside `update_step`."""

import keras
from keras import ops

from adam_like import AdamLike


@keras.saving.register_keras_serializable(package="examples")
class DoubleDecayAdam(AdamLike):
    def update_step(self, gradient, variable, learning_rate):
        super().update_step(gradient, variable, learning_rate)
        if self.weight_decay:
            lr = ops.cast(learning_rate, variable.dtype)
            self.assign_sub(variable, ops.multiply(variable, lr * self.weight_decay))
