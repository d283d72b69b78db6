"""Per-weight copies of Keras initializers."""

import keras


def fresh(initializer):
    """A new instance of `initializer` (an initializer, its name or its config) for one weight.

    A Keras 3 initializer without a seed picks one when it is created and then returns the same
    values at every call, so one instance shared by several weights gives them identical (or, for
    other shapes, overlapping) values. A copy made from the config of an unseeded initializer
    draws its own seed (reproducible under `keras.utils.set_random_seed`); a seeded one keeps
    its seed.
    """
    initializer = keras.initializers.get(initializer)
    return initializer.__class__.from_config(initializer.get_config())
