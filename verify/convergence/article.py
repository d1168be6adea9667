"""What the article ran: its epochs per configuration (`fit_show_model`'s
default of 800, or the `epochs=100` it passes from RMSprop on)."""

ARTICLE_EPOCHS = {
    "sgd": 800,
    "sgd_momentum": 800,
    "sgd_nesterov": 800,
    "adagrad": 800,
    "rmsprop": 100,
    "rmsprop_momentum_centered": 100,
    "adam": 100,
    "adamw": 100,
    "nadam": 100,
    "lion": 100,
}
