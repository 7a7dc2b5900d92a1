"""A freezing scheme of your own, as one function: freeze attention (and embeddings), train the
MLPs, and train the new head at 10x the LR. Otherwise the default job (MiniLM on BBC News).

  python train.py --config configs/bert_mlp_only.py --workdir runs/mlp_only
"""
from configs import default


def scheme(path, leaf):
  if path.startswith('classifier/'):
    return 'head*10'
  if path.startswith('embeddings/') or '/attention' in path:
    return 'frozen'
  return 'mlp'


def get_config():
  config = default.get_config()
  config.freeze.scheme = scheme
  config.optim.lr_mult = {}
  return config
