"""stpkeras: videos -> spacetime patches in TFRecords -> tf.data -> Keras 3 Conv3D -> SavedModels.

Importing this package is cheap: TensorFlow and Keras load only when a stage needs them.
"""

__version__ = "0.1.0"
