"""Flax ViT against transformers' PyTorch ViT: logits, the final-normed tokens and every layer's
tokens within 1e-4, loaded from Hugging Face directories; the named variants' sizes; scan, remat,
stochastic depth and the block structure used by freezing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxtl
from jaxtl import freeze, models
from jaxtl.errors import ConfigError, SchemeError
from conftest import check_unread_rows_are_skipped
from vit_checkpoints import images, make_hf_vit, reference

TOL = 1e-4
CONFIGS = {
    # 4x4 patches of 16, 3 layers, 4 heads.
    'patch16': dict(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=3,
                    num_attention_heads=4, intermediate_size=64),
    # Patch 32 without q/k/v biases, eps 1e-6 (the big_vision / timm value).
    'patch32_no_qkv_bias': dict(image_size=64, patch_size=32, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=37, qkv_bias=False,
                                layer_norm_eps=1e-6),
    # Non-square 32x48 image in 8-pixel patches, 5 layers, 3 heads, tanh GELU, odd sizes.
    'patch8_nonsquare_deep': dict(image_size=[32, 48], patch_size=8, hidden_size=36,
                                  num_hidden_layers=5, num_attention_heads=3, intermediate_size=50,
                                  hidden_act='gelu_pytorch_tanh'),
}


def _check(logits, out, ref, num_layers):
  if ref['logits'] is not None:
    np.testing.assert_allclose(logits, ref['logits'], atol=TOL, rtol=0)
  assert len(out['hidden_states']) == num_layers + 1
  for i, (ours, theirs) in enumerate(zip(out['hidden_states'], ref['hidden_states'])):
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0, err_msg=f'hidden state {i}')
  np.testing.assert_allclose(out['encoded'], ref['encoded'], atol=TOL, rtol=0)
  if ref['pooled'] is not None:
    np.testing.assert_allclose(out['pre_logits'], ref['pooled'], atol=TOL, rtol=0)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_image_classification_parity(tmp_path, name):
  config = CONFIGS[name]
  model = make_hf_vit(tmp_path, num_labels=5, **config)
  x, pixels = images(config)
  ref = reference(model, pixels)

  module, variables = jaxtl.load_pretrained(tmp_path, verbose=False)
  logits, out = jax.jit(module.apply)(variables, x)

  assert logits.shape == (3, 5) and module.patch_size == config['patch_size']
  assert module.qkv_bias == config.get('qkv_bias', True)
  _check(logits, out, ref, config['num_hidden_layers'])
  np.testing.assert_array_equal(out['pooled'], out['encoded'][:, 0])


def test_vit_model_with_pooler_is_headless_with_pre_logits(tmp_path):
  """A plain ViTModel: no head; its tanh pooler becomes the pre-logits layer."""
  config = CONFIGS['patch32_no_qkv_bias']
  model = make_hf_vit(tmp_path, **config)
  x, pixels = images(config)
  ref = reference(model, pixels)
  module, variables = jaxtl.load_pretrained(tmp_path, verbose=False)
  logits, out = jax.jit(module.apply)(variables, x)
  assert logits is None and 'head' not in variables['params']
  assert module.representation_size == config['hidden_size']
  _check(logits, out, ref, config['num_hidden_layers'])


def test_transformers5_in_memory_state_dict_loads(tmp_path):
  """A torch.save of model.state_dict() under transformers 5 uses new names (layers.N.attention.
  q_proj); it loads like the saved layout."""
  config = CONFIGS['patch16']
  model = make_hf_vit(tmp_path, num_labels=3, **config)
  (tmp_path / 'model.safetensors').unlink()
  torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
  x, pixels = images(config)
  module, variables = jaxtl.load_pretrained(tmp_path, verbose=False)
  logits, out = jax.jit(module.apply)(variables, x)
  _check(logits, out, reference(model, pixels), config['num_hidden_layers'])


@pytest.mark.parametrize('remat', [False, True])
def test_scan_matches_unrolled_from_the_same_checkpoint(tmp_path, remat):
  config = CONFIGS['patch16']
  model = make_hf_vit(tmp_path, num_labels=5, **config)
  x, pixels = images(config)
  ref = reference(model, pixels)
  _, unrolled = jaxtl.load_pretrained(tmp_path, verbose=False)
  module, scanned = jaxtl.load_pretrained(tmp_path, overrides={'scan': True, 'remat': remat},
                                          verbose=False)
  layers = scanned['params']['encoder']['layers']
  assert list(scanned['params']['encoder']) == ['layers']
  assert layers['attention']['query']['kernel'].shape == (3, 48, 48)
  np.testing.assert_array_equal(layers['mlp']['fc1']['kernel'][2],
                                unrolled['params']['encoder']['layer_2']['mlp']['fc1']['kernel'])
  logits, out = jax.jit(module.apply)(scanned, x)
  _check(logits, out, ref, config['num_hidden_layers'])
  ref_logits, ref_out = jax.jit(module.clone(scan=False, remat=False).apply)(unrolled, x)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6, rtol=0)
  for ours, theirs in zip(out['hidden_states'], ref_out['hidden_states']):
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def _random_params(module, seed=0):
  """Random params of the module's shapes (numpy: no init to compile)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())['params']
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(scale=0.2, size=s.shape), jnp.float32), shapes)


@pytest.mark.parametrize('scan', [False, True])
def test_train_mode_dropout_and_stochastic_depth(scan):
  """Stochastic depth draws from the 'dropout' rng; the first block's rate is 0 (linear from 0),
  so its output equals eval mode while the last block's does not; gradients are finite."""
  module = models.create('vit-ti16', image_size=32, num_layers=3, hidden_size=32, num_heads=2,
                         mlp_dim=48, num_classes=4, stochastic_depth=0.5, scan=scan,
                         remat=scan)
  params = _random_params(module)
  x = jax.random.normal(jax.random.key(2), (16, 32, 32, 3))
  apply = jax.jit(lambda p, train: module.apply({'params': p}, x, train=train,
                                                rngs={'dropout': jax.random.key(3)}),
                  static_argnums=1)
  _, eval_out = apply(params, False)
  _, train_out = apply(params, True)
  np.testing.assert_allclose(train_out['hidden_states'][1], eval_out['hidden_states'][1],
                             atol=1e-6)
  assert not np.allclose(train_out['hidden_states'][3], eval_out['hidden_states'][3], atol=1e-3)
  grads = jax.jit(jax.grad(lambda p: apply(p, True)[0].sum()))(params)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def test_last_block_skips_the_rows_the_head_does_not_read():
  """Under 'token' pooling the last block computes the class token's row apart from the others,
  so that a classifier's step skips the rest (conftest.check_unread_rows_are_skipped says how
  that is checked). Against transformers, logits and every row: test_image_classification_parity."""
  # 32x32 images in 8x8 patches: 16 patches and the class token.
  module = models.create('vit-ti16', image_size=32, patch_size=8, num_layers=2, hidden_size=32,
                         num_heads=2, mlp_dim=64, num_classes=3)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  check_unread_rows_are_skipped(lambda p: module.apply({'params': p}, x), _random_params(module),
                                batch=4, length=17, width=32, mlp_width=64)


VARIANTS = {  # registry name: transformers ViTConfig fields.
    'vit-ti16': dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                     intermediate_size=768),
    'vit-s16': dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                    intermediate_size=1536),
    'vit-b16': dict(),
    'vit-b32': dict(patch_size=32),
    'vit-l16': dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                    intermediate_size=4096),
}


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_variant_param_counts_match_transformers(name):
  module = models.create(name, num_classes=1000)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  with torch.device('meta'):  # Shapes only.
    ref = transformers.ViTForImageClassification(
        transformers.ViTConfig(num_labels=1000, **VARIANTS[name]))
  assert ours == sum(p.numel() for p in ref.parameters())
  assert module.num_blocks == ref.config.num_hidden_layers
  if name == 'vit-b16':
    assert ours == 86_567_656  # ViT-B/16 at 224 with a 1000-way head.


def test_block_structure_and_freezing_presets():
  module = models.create('vit-ti16', image_size=32, num_layers=4, num_classes=3, hidden_size=32,
                         num_heads=2, mlp_dim=48, representation_size=16)
  params = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())['params']
  assert module.param_group('embedding/kernel') == ('stem', None)
  assert module.param_group('pos_embedding') == ('stem', None)
  assert module.param_group('cls') == ('stem', None)
  assert module.param_group('encoder/layer_3/mlp/fc1/kernel') == ('block', 3)
  assert module.param_group('encoder_norm/scale') == ('neck', None)
  assert module.param_group('pre_logits/kernel') == ('neck', None)
  assert module.param_group('head/bias') == ('head', None)
  labels = freeze.flatten(freeze.label_params(params, 'last_n_blocks:1', module))
  assert labels['encoder/layer_3/attention/query/kernel'] == 'trainable'
  assert labels['encoder/layer_2/attention/query/kernel'] == 'frozen'
  assert labels['encoder_norm/scale'] == 'trainable' and labels['head/kernel'] == 'head'
  assert labels['pos_embedding'] == 'frozen'


def test_scanned_blocks_freeze_together_or_say_why():
  module = models.create('vit-ti16', image_size=32, num_layers=4, num_classes=3, hidden_size=32,
                         num_heads=2, mlp_dim=48, scan=True)
  params = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())['params']
  for scheme, want in (('full', 'trainable'), ('linear_probe', 'frozen'),
                       ('last_n_blocks:4', 'trainable'), ('last_n_blocks:0', 'frozen')):
    labels = freeze.flatten(freeze.label_params(params, scheme, module))
    assert labels['encoder/layers/mlp/fc2/kernel'] == want, scheme
  with pytest.raises(SchemeError, match=r'scanned ViT \(scan=True\) stores its 4 blocks as one '
                                        r"stacked array .*scan': False"):
    freeze.label_params(params, 'last_n_blocks:2', module)
  with pytest.raises(SchemeError, match=r'scanned ViT'):  # Per-block LR needs per-block params.
    freeze.label_params(params, 'layer_decay:0.75', module)


@pytest.mark.parametrize('scan', [False, True])
def test_lora_adapts_attention_in_both_layouts(scan):
  """LoRA's default targets (attention query and value) find the ViT's Dense layers; in a scanned
  model the adapters stack along the layer axis like the kernels they adapt."""
  from jaxtl import lora
  module = models.create('vit-ti16', image_size=32, num_layers=2, hidden_size=32, num_heads=2,
                         mlp_dim=48, num_classes=3, scan=scan)
  params = _random_params(module)
  wrapped, variables = lora.add_adapters(module, {'params': params}, rank=4)
  adapters = {p: a.shape for p, a in freeze.flatten(variables['params']).items() if 'lora' in p}
  if scan:
    assert adapters['encoder/layers/attention/query/lora_a'] == (2, 32, 4)
    assert adapters['encoder/layers/attention/value/lora_b'] == (2, 4, 32)
  else:
    assert adapters['encoder/layer_1/attention/value/lora_a'] == (32, 4)
  assert len(adapters) == (4 if scan else 8)  # q and v, A and B (per layer unless stacked).
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  # lora_b starts at zero: the adapted model computes what the base model does.
  np.testing.assert_allclose(jax.jit(wrapped.apply)(variables, x)[0],
                             jax.jit(module.apply)({'params': params}, x)[0], atol=1e-6)


def test_bad_configs_and_inputs_are_named():
  with pytest.raises(ConfigError, match='image_size 100x100 is not divisible by patch_size 16x16'):
    models.create('vit-b16', image_size=100)
  with pytest.raises(ConfigError, match='hidden_size 48 is not divisible by num_heads 5'):
    models.create('vit-ti16', hidden_size=48, num_heads=5)
  with pytest.raises(ConfigError, match="pooling 'max'"):
    models.create('vit-ti16', pooling='max')
  module = models.create('vit-ti16', image_size=32, num_layers=1, num_classes=2)
  variables = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  with pytest.raises(ConfigError, match=r'\(batch, 32, 32, 3\).*got \(2, 48, 48, 3\)'):
    jax.eval_shape(module.apply, variables, jnp.zeros((2, 48, 48, 3)))


def test_gap_pooling_has_no_class_token():
  module = models.create('vit-ti16', image_size=32, num_layers=1, num_classes=2, pooling='gap',
                         hidden_size=32, num_heads=2, mlp_dim=48)
  params = _random_params(module)
  assert 'cls' not in params
  assert params['pos_embedding'].shape == (1, 4, 32)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  _, out = jax.jit(module.apply)({'params': params}, x)
  np.testing.assert_allclose(out['pooled'], out['encoded'].mean(axis=1), atol=1e-6)
