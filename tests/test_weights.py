"""load_pretrained's strictness and its errors: every problem names the file, key and shape."""
import json
import os
import shutil

import numpy as np
import pytest

import jaxtl
from jaxtl.errors import WeightsError
from jaxtl.weights import files, torch_pickle
from conftest import make_hf_bert


def test_missing_path():
  with pytest.raises(WeightsError, match='/no/such/model.*does not exist'):
    jaxtl.load_pretrained('/no/such/model')


def test_directory_without_config(tmp_path):
  (tmp_path / 'model.safetensors').write_bytes(b'')
  with pytest.raises(WeightsError, match=f'{tmp_path}: no config.json'):
    jaxtl.load_pretrained(tmp_path)


def test_directory_without_weights(tmp_path, tiny_bert_dir):
  directory, _ = tiny_bert_dir
  os.remove(directory / 'model.safetensors')
  with pytest.raises(WeightsError, match='no weights file.*model.safetensors.*pytorch_model.bin'):
    jaxtl.load_pretrained(directory)


def test_other_architecture(tmp_path, tiny_bert_dir):
  directory, _ = tiny_bert_dir
  config = json.loads((directory / 'config.json').read_text())
  config.update(model_type='gpt2', architectures=['GPT2LMHeadModel'])
  (directory / 'config.json').write_text(json.dumps(config))
  with pytest.raises(WeightsError, match="config.json: model_type 'gpt2'.*not supported"):
    jaxtl.load_pretrained(directory)


def test_shape_mismatch_names_both_keys_and_shapes(tmp_path, tiny_bert_dir):
  directory, _ = tiny_bert_dir
  config = json.loads((directory / 'config.json').read_text())
  config['intermediate_size'] = 40  # The weights were made with 37.
  (directory / 'config.json').write_text(json.dumps(config))
  with pytest.raises(WeightsError) as e:
    jaxtl.load_pretrained(directory)
  msg = str(e.value)
  assert 'shape mismatch' in msg
  assert ('bert.encoder.layer.0.intermediate.dense.weight (37, 32) -> '
          'params/encoder/layer_0/intermediate/kernel (32, 40)') in msg
  assert 'bert.encoder.layer.1.output.dense.weight (32, 37) -> params/encoder/layer_1/output/kernel (40, 32)' in msg, msg
  assert 'not in the checkpoint' not in msg  # A mismatch is reported once, as a mismatch.


def _rewrite(directory, edit):
  from safetensors.numpy import save_file
  tensors = files.read_tensors(directory / 'model.safetensors')
  tensors = {k: np.array(v) for k, v in edit(dict(tensors)).items()}
  save_file(tensors, str(directory / 'model.safetensors'))


def test_missing_tensor_is_reported(tiny_bert_dir):
  directory, _ = tiny_bert_dir
  _rewrite(directory, lambda t: {k: v for k, v in t.items() if 'layer.1.output.dense.bias' not in k})
  with pytest.raises(WeightsError, match=r'1 model variable\(s\) not in the checkpoint:\s+'
                                         r'params/encoder/layer_1/output/bias \(32,\)'):
    jaxtl.load_pretrained(directory)


def test_unexpected_tensor_is_reported_and_can_be_dropped(tiny_bert_dir):
  directory, _ = tiny_bert_dir
  _rewrite(directory, lambda t: {**t, 'bert.extra.adapter.weight': np.ones((4, 5), np.float32)})
  with pytest.raises(WeightsError, match=r'no place for.*\n\s+bert\.extra\.adapter\.weight \(4, 5\)'):
    jaxtl.load_pretrained(directory)
  module, variables = jaxtl.load_pretrained(directory, dont_load=[r'bert\.extra\..*'])
  assert 'classifier' in variables['params']


def test_dont_load_a_model_param_starts_it_at_zero(tiny_bert_dir):
  directory, _ = tiny_bert_dir
  _, variables = jaxtl.load_pretrained(directory, dont_load=['pooler/.*'])
  assert not np.any(variables['params']['pooler']['kernel'])
  assert np.any(variables['params']['encoder']['layer_0']['output']['kernel'])


def test_truncated_safetensors(tiny_bert_dir):
  directory, _ = tiny_bert_dir
  data = (directory / 'model.safetensors').read_bytes()
  (directory / 'model.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(WeightsError, match='model.safetensors: corrupt or truncated'):
    jaxtl.load_pretrained(directory)


def test_truncated_torch_bin(tmp_path, tiny_bert_dir):
  import torch
  directory, model = tiny_bert_dir
  os.remove(directory / 'model.safetensors')
  for legacy in (False, True):
    path = directory / 'pytorch_model.bin'
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 1000])
    with pytest.raises(WeightsError, match='pytorch_model.bin: (corrupt or )?truncated'):
      jaxtl.load_pretrained(directory)


class _Evil:
  def __reduce__(self):
    return (os.system, ('touch /tmp/jaxtl_pwned',))


@pytest.mark.parametrize('legacy', [False, True])
def test_pickle_that_runs_code_is_refused(tmp_path, tiny_bert_dir, legacy):
  import torch
  directory, model = tiny_bert_dir
  os.remove(directory / 'model.safetensors')
  marker = '/tmp/jaxtl_pwned'
  if os.path.exists(marker):
    os.remove(marker)
  state = dict(model.state_dict())
  state['evil'] = _Evil()
  torch.save(state, directory / 'pytorch_model.bin', _use_new_zipfile_serialization=not legacy)
  with pytest.raises(WeightsError, match=r'asks for (posix|os)\.system.*refusing'):
    jaxtl.load_pretrained(directory)
  assert not os.path.exists(marker)


def test_torch_reader_matches_torch_load(tmp_path):
  """Our torch-free reader against torch.load, for dtypes, scalars and non-contiguous views."""
  import torch
  state = {'f32': torch.randn(3, 4), 'f16': torch.randn(5).half(), 'i64': torch.arange(6),
           'scalar': torch.tensor(3.5), 'transposed': torch.randn(4, 3).t(),
           'view': torch.randn(10)[2:7], 'bf16': torch.randn(3).bfloat16()}
  for legacy in (False, True):
    path = tmp_path / f'x{legacy}.pth'
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    ours = torch_pickle.load(path)
    assert set(ours) == set(state)
    for k, v in state.items():
      ref = v.float().numpy() if k == 'bf16' else v.numpy()
      np.testing.assert_array_equal(np.asarray(ours[k], dtype=ref.dtype), ref, err_msg=k)
      assert ours[k].shape == tuple(v.shape)


def test_sharded_safetensors(tmp_path):
  model = make_hf_bert(tmp_path / 'one', num_labels=2)
  model.save_pretrained(tmp_path / 'sharded', max_shard_size='20KB')
  assert (tmp_path / 'sharded' / 'model.safetensors.index.json').exists()
  _, a = jaxtl.load_pretrained(tmp_path / 'one')
  _, b = jaxtl.load_pretrained(tmp_path / 'sharded')
  import jax
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_old_gamma_beta_names_load(tiny_bert_dir):
  directory, _ = tiny_bert_dir
  rename = lambda k: k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace(
      'LayerNorm.bias', 'LayerNorm.beta')
  _, ref = jaxtl.load_pretrained(directory)
  _rewrite(directory, lambda t: {rename(k): v for k, v in t.items()})
  _, ours = jaxtl.load_pretrained(directory)
  import jax
  jax.tree_util.tree_map(np.testing.assert_array_equal, ref, ours)


def test_hub_offline_uses_the_cache(tmp_path, tiny_bert_dir, monkeypatch):
  """hf:org/name from a populated cache with the hub unreachable; a clear error otherwise."""
  import huggingface_hub
  directory, _ = tiny_bert_dir
  cache = tmp_path / 'hub'
  snapshot = cache / 'models--someorg--tiny-bert' / 'snapshots' / ('0' * 40)
  shutil.copytree(directory, snapshot)
  (cache / 'models--someorg--tiny-bert' / 'refs').mkdir()
  (cache / 'models--someorg--tiny-bert' / 'refs' / 'main').write_text('0' * 40)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  module, variables = jaxtl.load_pretrained('hf:someorg/tiny-bert')
  assert module.num_classes == 3
  with pytest.raises(WeightsError, match='hf:someorg/absent: the Hugging Face Hub is unreachable '
                                         'and the model is not in the local cache'):
    jaxtl.load_pretrained('hf:someorg/absent')


def test_pkg_source_names_the_missing_package():
  with pytest.raises(WeightsError, match="package 'no_such_weights_pkg' is not installed"):
    jaxtl.load_pretrained('pkg:no_such_weights_pkg/model')
