"""ViT checkpoints in the big_vision .npz and timm layouts (written here from the same random torch
weights as a transformers model) give transformers' outputs within 1e-4, in scanned and unrolled
model modes; position embeddings resample for another image size; bad inputs are named."""
import warnings

import jax
import numpy as np
import pytest
import torch

import jaxtl
from jaxtl import weights
from jaxtl.errors import ConfigError, WeightsError
from jaxtl.weights import vit as vit_weights
from vit_checkpoints import big_vision_npz, images, make_hf_vit, reference, save_timm

TOL = 1e-4
# eps 1e-6 as big_vision and timm use; 5 heads of 8 (width 40 is no named variant).
CONFIG = dict(image_size=48, patch_size=16, hidden_size=40, num_hidden_layers=3,
              num_attention_heads=5, intermediate_size=56, layer_norm_eps=1e-6)


@pytest.fixture(scope='module')
def torch_vit():
  model = make_hf_vit(None, num_labels=4, **CONFIG)
  x, pixels = images(CONFIG)
  return model, x, reference(model, pixels)


def _check(module, variables, x, ref):
  logits, out = jax.jit(module.apply)(variables, x)
  np.testing.assert_allclose(logits, ref['logits'], atol=TOL, rtol=0)
  assert len(out['hidden_states']) == len(ref['hidden_states'])
  for i, (ours, theirs) in enumerate(zip(out['hidden_states'], ref['hidden_states'])):
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0, err_msg=f'hidden state {i}')
  np.testing.assert_allclose(out['encoded'], ref['encoded'], atol=TOL, rtol=0)
  return logits


@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('style', ['original', 'big_vision', 'scanned'])
def test_big_vision_npz_parity(tmp_path, torch_vit, style, scan):
  model, x, ref = torch_vit
  path = tmp_path / 'vit.npz'
  big_vision_npz(model, path, style)
  # big_vision trains with Flax's tanh GELU; transformers' reference uses the exact one.
  module, variables = jaxtl.load_pretrained(path, overrides={'hidden_act': 'gelu', 'scan': scan},
                                           verbose=False)
  assert (module.num_heads, module.num_layers, module.mlp_dim) == (5, 3, 56)
  assert module.image_size == 48 and module.num_classes == 4
  _check(module, variables, x, ref)


def test_big_vision_npz_defaults_to_tanh_gelu(tmp_path, torch_vit):
  model, _, _ = torch_vit
  big_vision_npz(model, tmp_path / 'vit.npz')
  module, _ = jaxtl.load_pretrained(tmp_path / 'vit.npz', verbose=False)
  assert module.hidden_act == 'gelu_tanh' and module.layer_norm_eps == 1e-6


def test_big_vision_headless_with_pre_logits(tmp_path):
  """An in21k-style checkpoint: pre_logits (tanh) and no head; it equals transformers' ViTModel
  pooler output."""
  config = dict(CONFIG, num_hidden_layers=1)
  model = make_hf_vit(None, **config)
  x, pixels = images(config)
  ref = reference(model, pixels)
  big_vision_npz(model, tmp_path / 'vit.npz')
  module, variables = jaxtl.load_pretrained(tmp_path / 'vit.npz', overrides={'hidden_act': 'gelu'},
                                           verbose=False)
  logits, out = jax.jit(module.apply)(variables, x)
  assert logits is None and module.representation_size == 40
  np.testing.assert_allclose(out['pre_logits'], ref['pooled'], atol=TOL, rtol=0)


@pytest.mark.parametrize('suffix', ['safetensors', 'pth'])
@pytest.mark.parametrize('scan', [False, True])
def test_timm_state_dict_parity(tmp_path, torch_vit, suffix, scan):
  model, x, ref = torch_vit
  path = tmp_path / f'vit_timm.{suffix}'
  save_timm(model, path)
  # timm state dicts do not store the head count (qkv is fused); 40 wide is no named variant.
  with pytest.warns(UserWarning, match='does not store its number of heads; assuming'):
    module, variables = jaxtl.load_pretrained(path, overrides={'num_heads': 5, 'scan': scan},
                                             verbose=False)
  assert module.hidden_act == 'gelu'
  _check(module, variables, x, ref)


def test_timm_heads_of_a_named_width_need_no_override(tmp_path):
  config = dict(CONFIG, hidden_size=192, num_attention_heads=3, intermediate_size=64,
                num_hidden_layers=1)
  model = make_hf_vit(None, num_labels=2, **config)
  save_timm(model, tmp_path / 'vit_timm.safetensors')
  x, pixels = images(config)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    module, variables = jaxtl.load_pretrained(tmp_path / 'vit_timm.safetensors', verbose=False)
  assert module.num_heads == 3
  _check(module, variables, x, reference(model, pixels))


def test_new_head_replaces_the_checkpoint_head(tmp_path, torch_vit):
  model, x, _ = torch_vit
  big_vision_npz(model, tmp_path / 'vit.npz')
  module, variables = jaxtl.load_pretrained(tmp_path / 'vit.npz', num_classes=7, verbose=False)
  head = variables['params']['head']
  assert head['kernel'].shape == (40, 7) and not np.any(head['kernel']) and not np.any(head['bias'])
  logits, _ = jax.jit(module.apply)(variables, x)
  np.testing.assert_array_equal(logits, np.zeros((3, 7)))


# ---------------------------------------------------------------------------------------------
# Resolution change.
# ---------------------------------------------------------------------------------------------
def test_resampling_to_the_same_grid_is_the_identity(tmp_path, torch_vit):
  model, _, _ = torch_vit
  pos = np.random.default_rng(0).normal(size=(1, 10, 8)).astype(np.float32)
  assert vit_weights.resample_pos_embedding(pos, (3, 3), (3, 3)) is pos
  big_vision_npz(model, tmp_path / 'vit.npz')
  _, variables = jaxtl.load_pretrained(tmp_path / 'vit.npz', overrides={'image_size': 48},
                                      verbose=False)
  np.testing.assert_array_equal(variables['params']['pos_embedding'],
                                model.state_dict()['vit.embeddings.position_embeddings'].numpy())


def test_224_checkpoint_runs_at_384_with_bilinear_position_embeddings(tmp_path):
  """A 14x14-grid checkpoint fine-tuned at 384 (24x24): the grid is resampled like torch's
  bilinear interpolate (align_corners=False), the class token's row kept; the model then matches
  transformers at 384 given the same resampled embeddings."""
  config = dict(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=40)
  model = make_hf_vit(tmp_path, num_labels=3, **config)
  module, variables = jaxtl.load_pretrained(tmp_path, overrides={'image_size': 384},
                                           verbose=False)
  pos = variables['params']['pos_embedding']
  assert pos.shape == (1, 1 + 24 * 24, 32)

  source = model.vit.embeddings.position_embeddings.detach()
  grid = source[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(24, 24), mode='bilinear',
                                         align_corners=False)
  resampled = torch.cat([source[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 576, 32)], dim=1)
  np.testing.assert_allclose(pos, resampled.numpy(), atol=1e-6, rtol=0)

  model384 = make_hf_vit(None, num_labels=3, **dict(config, image_size=384))
  state = model.state_dict()
  state['vit.embeddings.position_embeddings'] = resampled
  model384.load_state_dict(state)
  x, pixels = images(dict(config, image_size=384), batch=2)
  ref = reference(model384, pixels)
  logits, out = jax.jit(module.apply)(variables, x)
  np.testing.assert_allclose(logits, ref['logits'], atol=TOL, rtol=0)
  np.testing.assert_allclose(out['encoded'], ref['encoded'], atol=TOL, rtol=0)


def test_scanned_npz_resamples_too(tmp_path, torch_vit):
  model, _, _ = torch_vit
  big_vision_npz(model, tmp_path / 'vit.npz', 'scanned')
  module, variables = jaxtl.load_pretrained(tmp_path / 'vit.npz', verbose=False,
                                           overrides={'image_size': 64, 'scan': True})
  assert variables['params']['pos_embedding'].shape == (1, 17, 40)
  assert variables['params']['encoder']['layers']['norm1']['scale'].shape == (3, 40)
  logits, _ = jax.jit(module.apply)(variables, np.zeros((1, 64, 64, 3), np.float32))
  assert logits.shape == (1, 4) and np.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# Preprocessing that goes with the weights.
# ---------------------------------------------------------------------------------------------
def test_pretrained_cfg_per_source(tmp_path, torch_vit):
  import transformers
  model, _, _ = torch_vit
  hf_dir = tmp_path / 'hf'
  model.save_pretrained(hf_dir)
  transformers.ViTImageProcessor(size={'height': 48, 'width': 48}).save_pretrained(hf_dir)
  cfg = weights.pretrained_cfg(hf_dir)
  assert cfg == dict(input_size=48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_fraction=1.0,
                     interpolation='bilinear', channel_order='RGB')

  big_vision_npz(model, tmp_path / 'vit.npz')
  cfg = weights.pretrained_cfg(tmp_path / 'vit.npz')
  assert cfg['input_size'] == 48 and cfg['mean'] == (0.5,) * 3 and cfg['crop_fraction'] == 1.0

  (tmp_path / 'timm').mkdir()
  save_timm(model, tmp_path / 'timm' / 'vit.safetensors')
  cfg = weights.pretrained_cfg(tmp_path / 'timm' / 'vit.safetensors')
  assert cfg['interpolation'] == 'bicubic' and cfg['crop_fraction'] == 0.9

  from jaxtl.data import images as image_data
  pre = image_data.make_preprocess({}, weights.pretrained_cfg(tmp_path / 'vit.npz'))
  assert pre.image_size == 48 and pre.mean == (0.5,) * 3 and pre.resize_size == 48


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------
def test_npz_of_another_model_is_named(tmp_path):
  path = tmp_path / 'bit_resnet.npz'
  np.savez(path, **{'resnet/root_block/standardized_conv2d/kernel': np.zeros((7, 7, 3, 8)),
                    'resnet/block1/unit01/a/standardized_conv2d/kernel': np.zeros((1, 1, 8, 8)),
                    'head/conv2d/kernel': np.zeros((1, 1, 8, 10))})
  with pytest.raises(WeightsError, match=r'bit_resnet\.npz: cannot tell the architecture'):
    jaxtl.load_pretrained(path, verbose=False)
  with pytest.raises(WeightsError, match=r'bit_resnet\.npz: not a ViT checkpoint.*'
                                         r'resnet/root_block/standardized_conv2d/kernel'):
    jaxtl.load_pretrained(path, arch='vit', verbose=False)


def test_patch_size_mismatch_is_named(tmp_path, torch_vit):
  model, _, _ = torch_vit
  big_vision_npz(model, tmp_path / 'vit.npz')
  with pytest.raises(WeightsError, match=r"vit\.npz: patch size mismatch: embedding/kernel "
                                         r"\(16, 16, 3, 40\) has 16x16 patches but the model's "
                                         r'patch_size is 8'):
    jaxtl.load_pretrained(tmp_path / 'vit.npz', overrides={'patch_size': 8}, verbose=False)
  # A config.json that disagrees with its own weights.
  model.save_pretrained(tmp_path / 'hf')
  config = (tmp_path / 'hf' / 'config.json').read_text()
  (tmp_path / 'hf' / 'config.json').write_text(config.replace('"patch_size": 16',
                                                              '"patch_size": 32'))
  with pytest.raises(WeightsError, match=r'config\.json patch_size 32 does not match '
                                         r'vit\.embeddings\.patch_embeddings\.projection\.weight '
                                         r'\(40, 3, 16, 16\)'):
    jaxtl.load_pretrained(tmp_path / 'hf', verbose=False)


def test_image_size_not_divisible_by_the_patch_is_named(tmp_path, torch_vit):
  model, _, _ = torch_vit
  big_vision_npz(model, tmp_path / 'vit.npz')
  with pytest.raises(ConfigError, match='image_size 100x100 is not divisible by patch_size 16x16'):
    jaxtl.load_pretrained(tmp_path / 'vit.npz', overrides={'image_size': 100}, verbose=False)


def test_unknown_tensors_are_listed(tmp_path, torch_vit):
  """Strict: a tensor the ViT has no place for (here a timm register token) is an error."""
  model, _, _ = torch_vit
  path = tmp_path / 'vit_timm.pth'
  save_timm(model, path)
  state = torch.load(path)
  state['reg_token'] = torch.zeros(1, 4, 40)
  torch.save(state, path)
  with pytest.warns(UserWarning), pytest.raises(WeightsError, match=r'reg_token \(1, 4, 40\)'):
    jaxtl.load_pretrained(path, overrides={'num_heads': 5}, verbose=False)
