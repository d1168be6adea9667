"""One module per optimizer family of formulas; one `Optimizer` per Keras class.

Adding an optimizer: a module here (defaults, states, pieces, update, points)
and its entry in OPTIMIZERS.
"""

from reference.optimizers.adadelta import ADADELTA
from reference.optimizers.adafactor import ADAFACTOR
from reference.optimizers.adagrad import ADAGRAD
from reference.optimizers.adam import ADAM, ADAMW
from reference.optimizers.adamax import ADAMAX
from reference.optimizers.ftrl import FTRL
from reference.optimizers.lamb import LAMB
from reference.optimizers.lion import LION
from reference.optimizers.muon import MUON
from reference.optimizers.nadam import NADAM
from reference.optimizers.rmsprop import RMSPROP
from reference.optimizers.schedule_free_adamw import SCHEDULE_FREE_ADAMW
from reference.optimizers.sgd import SGD

OPTIMIZERS = {o.class_name: o for o in (SGD, ADAGRAD, RMSPROP, ADAM, ADAMW, NADAM, LION,
                                            ADAMAX, ADADELTA, FTRL, LAMB,
                                            SCHEDULE_FREE_ADAMW, ADAFACTOR, MUON)}
