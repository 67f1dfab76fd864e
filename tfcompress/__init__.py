"""tfcompress: compressed embedding tables for TensorFlow/Keras recommendation models.

Import the pieces you need::

    from tfcompress.layers import RobeEmbedding
    from tfcompress.plan import make_plan
"""

__version__ = "0.1.0"
