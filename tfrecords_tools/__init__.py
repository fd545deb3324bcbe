"""tfrecords_tools: videos -> TFRecords of spacetime patches. Knows PyAV, numpy and TF's record types; never Keras."""

from tfrecords_tools.spec import PatchSpec  # noqa: F401
