"""Classifiers: architectures (Keras 3), training data and metrics (tf.data), callbacks and multi-
worker training. May import ``schemas``, ``transforms.audio`` and ``transforms.features`` (for the
feature maths a model's input needs).
"""
