"""Every config under configs/ takes the README's memory-and-precision flags: the CLI rejects a
field a config does not have, so a flag the README shows must exist wherever it applies."""
import re

import pytest

from conftest import ROOT, load_config
from jaxtl import models

CONFIGS = sorted((ROOT / 'configs').glob('*.py'))


def _readme_flags():
  """The dotted config fields of the README's "Memory and precision" paragraph."""
  text = (ROOT / 'README.md').read_text()
  section = text[text.index('**Memory and precision:**'):]
  section = section[:section.index('\n\n')]
  return sorted(set(re.findall(r'--config\.([\w.]+)=', section)))


def _has(config, dotted):
  node = config
  for key in dotted.split('.'):
    if key not in node:
      return False
    node = node[key]
  return True


def _applies(config, field):
  if field.startswith('optim.'):
    return 'optim' in config  # Phase configs give each phase its own optim.
  if field in ('model.overrides.remat', 'model.overrides.scan'):  # BERT and ViT only.
    kind = (config.model.get('name') or config.model.get('source') or '').lower()
    return any(word in kind for word in ('bert', 'vit', 'minilm'))
  return True


def test_readme_lists_the_flags():
  assert {'model.overrides.dtype', 'optim.mu_dtype', 'grad_accum_steps',
          'model.overrides.remat'} <= set(_readme_flags())


@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_has_the_readme_flags(path):
  config = load_config(path.stem)
  missing = [f for f in _readme_flags() if _applies(config, f) and not _has(config, f)]
  assert not missing, f'{path.name} lacks {missing}'
  if config.model.get('name'):  # A registry model builds with the precision flag set.
    overrides = dict(config.model.overrides, dtype='bfloat16')
    module = models.create(config.model.name, num_classes=3, **overrides)
    assert str(module.dtype) == 'bfloat16'
