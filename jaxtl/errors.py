"""jaxtl's errors: each names the file, key or config field that is wrong.

`train.py` prints these as one line and exits non-zero; any other exception is a bug and keeps its
traceback.
"""


class JaxtlError(Exception):
  """Base class for errors caused by the user's input, not by a bug."""


class WeightsError(JaxtlError):
  """A checkpoint is missing, unreadable, of another architecture, or does not fit the model."""


class ConfigError(JaxtlError):
  """A config field is unknown, missing or has a bad value."""


class DataError(JaxtlError):
  """A dataset is missing, empty or malformed (e.g. a label out of range)."""


class CheckpointError(JaxtlError):
  """A run's checkpoint in the workdir is unreadable, or of another model or freeze scheme."""


class SchemeError(JaxtlError):
  """A freezing scheme leaves a param uncovered, has a rule matching nothing, or a bad name."""
