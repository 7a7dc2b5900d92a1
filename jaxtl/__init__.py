"""jaxtl: transfer learning in JAX."""
from jaxtl.errors import ConfigError, DataError, JaxtlError, SchemeError, WeightsError
from jaxtl.weights import load_pretrained
from jaxtl.export import export

__version__ = '0.1.0'
