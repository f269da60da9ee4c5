"""Classifiers: architectures (Keras 3, ``architectures.py``), training data and metrics (tf.data),
callbacks and multi-worker training. May import ``schemas``, ``transforms.audio`` (augmentation),
``transforms.features`` (embedding models), ``transforms.io`` (dataset descriptions) and
``transforms.tagging.events`` (average precision).
"""


def __getattr__(name: str):
    """Names of the module ``transforms/models.py`` of earlier releases (deprecated)."""
    from soundshard.transforms import moved_name

    return moved_name(__name__, "architectures", name)
