"""Scanned transformer layers (ViT, BERT with scan=True) keep one stacked array per param, with a
leading layer axis: the block index that freezing schemes see for them."""
from jaxtl.errors import SchemeError


class StackedBlocks:
  """The block 'index' of a scanned layer param: one array holds every block, so it can only be
  frozen or trained as a whole. Comparisons that split the stack raise a SchemeError (e.g.
  last_n_blocks:N with 0 < N < num_blocks; N = 0 and N = num_blocks work), and so does
  arithmetic (layer-wise LR decay)."""

  def __init__(self, num_blocks, model):
    self.num_blocks, self.model = num_blocks, model

  def _error(self):
    return SchemeError(
        f'a scanned {self.model} (scan=True) stores its {self.num_blocks} blocks as one stacked '
        'array (encoder/layers/...), which cannot be frozen per block; build it with scan=False '
        "(load_pretrained(..., overrides={'scan': False})) to freeze some blocks")

  def __ge__(self, first):   # "Every block in the stack is at index >= first."
    if first <= 0:
      return True
    if first >= self.num_blocks:
      return False
    raise self._error()

  def __lt__(self, first):
    return not self.__ge__(first)

  def __gt__(self, last):
    return self.__ge__(last + 1)

  def __le__(self, last):
    return not self.__gt__(last)

  def _no_number(self, *unused):
    raise self._error()

  # Arithmetic on the index (e.g. layer-wise LR decay) needs one block per param: refuse clearly.
  __index__ = __int__ = __float__ = _no_number
  __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _no_number

  def __repr__(self):
    return f'StackedBlocks({self.num_blocks})'
