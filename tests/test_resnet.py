"""ResNet: parity against transformers' PyTorch ResNet (random init, basic and bottleneck blocks,
several depths, save_pretrained) and against a torchvision-layout PyTorch ResNet (see
torch_cnns.py: torchvision itself does not install beside torch 2.13), in logits and every stage's
features; torchvision .pth in both the zip and the legacy format; param counts of all depths;
freeze presets over residual blocks; clear errors for the wrong checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import torch_cnns
from jaxtl import freeze, load_pretrained, models
from jaxtl.errors import WeightsError

TOL = 1e-4


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _images(n=2, size=64, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _max_diffs(logits, out, ref_logits, ref_stages):
  diffs = [np.abs(np.asarray(logits) - ref_logits.detach().numpy()).max()]
  diffs += [np.abs(np.asarray(ours) - _nhwc(ref)).max() for ours, ref in zip(out['stages'],
                                                                               ref_stages)]
  return diffs


HF_CASES = {
    'basic_1111': dict(layer_type='basic', depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64]),
    'basic_2222': dict(layer_type='basic', depths=[2, 2, 2, 2], hidden_sizes=[16, 32, 64, 64]),
    'bottleneck_1211': dict(layer_type='bottleneck', depths=[1, 2, 1, 1],
                            hidden_sizes=[32, 64, 128, 256]),
}


@pytest.mark.parametrize('case', sorted(HF_CASES))
def test_hf_resnet_parity(case, tmp_path):
  torch.manual_seed(0)
  config = transformers.ResNetConfig(embedding_size=16, num_labels=5, **HF_CASES[case])
  ref = torch_cnns.randomize_bn(transformers.ResNetForImageClassification(config)).eval()
  ref.save_pretrained(tmp_path)
  module, variables = load_pretrained(tmp_path, verbose=False)
  assert set(variables) == {'params', 'batch_stats'}
  x = _images()
  logits, out = module.apply(variables, x, train=False)
  with torch.no_grad():
    ref_out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True)
  diffs = _max_diffs(logits, out, ref_out.logits, ref_out.hidden_states[1:])
  assert max(diffs) < TOL, diffs
  assert module.bn_momentum == 0.9 and module.bn_eps == 1e-5


def test_hf_resnet_headless_model_and_new_head(tmp_path):
  """A ResNetModel (no classifier) loads headless; num_classes puts a zero head on top."""
  torch.manual_seed(1)
  config = transformers.ResNetConfig(embedding_size=16, layer_type='basic', depths=[1, 1, 1, 1],
                                     hidden_sizes=[16, 32, 48, 64])
  ref = torch_cnns.randomize_bn(transformers.ResNetModel(config)).eval()
  ref.save_pretrained(tmp_path)
  module, variables = load_pretrained(tmp_path, verbose=False)
  x = _images(seed=1)
  logits, out = module.apply(variables, x, train=False)
  assert logits is None
  with torch.no_grad():
    pooled = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output.flatten(1).numpy()
  assert np.abs(np.asarray(out['pre_logits']) - pooled).max() < TOL
  module, variables = load_pretrained(tmp_path, num_classes=3, verbose=False)
  logits, _ = module.apply(variables, x, train=False)
  assert logits.shape == (2, 3) and not np.any(np.asarray(logits))


@pytest.mark.parametrize('depth', [18, 50])
@pytest.mark.parametrize('legacy', [False, True])
def test_torchvision_resnet_parity(depth, legacy, tmp_path):
  torch.manual_seed(depth)
  ref = torch_cnns.randomize_bn(torch_cnns.resnet(depth), seed=depth).eval()
  path = tmp_path / f'resnet{depth}.pth'
  torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=not legacy)
  module, variables = load_pretrained(path, verbose=False)  # The depth comes from the keys.
  assert module.num_blocks == sum(models.resnet.DEPTHS[depth][0])
  x = _images(seed=depth)
  logits, out = jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)
  with torch.no_grad():
    ref_logits, ref_stages = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  diffs = _max_diffs(logits, out, ref_logits, ref_stages)
  assert max(diffs) < TOL, diffs


@pytest.mark.parametrize('depth', [18, 34, 50, 101, 152])
def test_param_counts_match_torchvision_layout(depth):
  module = models.create(f'resnet{depth}', num_classes=1000)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *module.example_inputs())
  with torch.device('meta'):  # Shapes only.
    ref = torch_cnns.resnet(depth)
  ref_params = sum(p.numel() for p in ref.parameters())
  ref_stats = sum(b.numel() for n, b in ref.named_buffers() if 'running' in n)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  assert count(shapes['params']) == ref_params
  assert count(shapes['batch_stats']) == ref_stats


def test_last_n_blocks_unfreezes_residual_blocks():
  module = models.create('resnet18', num_classes=4)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  labels = freeze.flatten(freeze.label_params(shapes['params'], 'last_n_blocks:2', module))
  assert labels['fc/kernel'] == 'head'
  assert labels['conv1/kernel'] == labels['bn1/scale'] == 'frozen'
  assert labels['block_5/conv2/kernel'] == 'frozen'
  assert labels['block_6/conv1/kernel'] == labels['block_7/bn2/scale'] == 'trainable'


def test_wrong_checkpoints_are_named(tmp_path):
  torch.manual_seed(0)
  r18 = tmp_path / 'r18.pth'
  torch.save(torch_cnns.resnet(18).state_dict(), r18)
  with pytest.raises(WeightsError, match=r"r18.pth: arch 'resnet50' given, but the checkpoint "
                                         r"holds resnet18"):
    load_pretrained(r18, arch='resnet50', verbose=False)
  mobilenet = tmp_path / 'mobilenet.pth'
  torch.save(torch_cnns.MobileNetV2().state_dict(), mobilenet)
  with pytest.raises(WeightsError, match=r"mobilenet.pth: arch 'resnet50' given, but the file "
                                         r"holds no ResNet keys .*features.0.0.weight"):
    load_pretrained(mobilenet, arch='resnet50', verbose=False)
  unknown = tmp_path / 'custom.pth'
  torch.save({'backbone.stem.weight': torch.zeros(8, 3, 3, 3)}, unknown)
  with pytest.raises(WeightsError, match=r'custom.pth: cannot tell the architecture from its keys '
                                         r'\(backbone.stem.weight.*pass arch='):
    load_pretrained(unknown, verbose=False)


@pytest.mark.parametrize('blocks', ['basic_2222', 'bottleneck_1211'])
def test_torchvision_resnet_training_step_parity(blocks, tmp_path):
  """In training mode (BatchNorm on batch statistics: jaxtl.ops.BatchNorm's own backward pass;
  the convs' matmul weight gradients; the max pool's gradient) the logits, every param's
  gradient and the running means equal PyTorch's. Both sides run in float64: a randomly
  initialised ResNet in training mode is too ill-conditioned for a float32 comparison (PyTorch's
  own float32 gradients of ResNet-50 differ from its float64 ones by up to 20 %). PyTorch's
  gradients come back in jaxtl's layout through the loader itself: a state dict whose params are
  their gradients."""
  kind, sizes = blocks.split('_')
  block = torch_cnns.BasicBlock if kind == 'basic' else torch_cnns.Bottleneck
  torch.manual_seed(len(kind))
  ref = torch_cnns.randomize_bn(torch_cnns.ResNet(block, [int(s) for s in sizes], 7), seed=3)
  path = tmp_path / 'resnet.pth'
  torch.save(ref.state_dict(), path)
  module, variables = load_pretrained(path, verbose=False)
  x = _images(n=4, size=64, seed=5).astype(np.float64)
  weights = np.random.default_rng(6).normal(size=(4, 7))

  with jax.enable_x64(True):
    module = module.clone(dtype=jnp.float64, param_dtype=jnp.float64)
    variables = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), variables)

    def loss(params):
      (logits, _), new = module.apply(
          {'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
          mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits) * weights), (logits, new['batch_stats'])
    (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables['params'])
    logits, stats, grads = jax.tree.map(np.asarray, (logits, stats, grads))

  ref = ref.double().train()
  ref_logits, _ = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  (torch.sin(ref_logits) * torch.from_numpy(weights)).sum().backward()
  assert np.abs(logits - ref_logits.detach().numpy()).max() < TOL
  grad_path = tmp_path / 'grads.pth'
  torch.save({**{n: b for n, b in ref.named_buffers()},
              **{n: p.grad for n, p in ref.named_parameters()}}, grad_path)
  _, ref_grads = load_pretrained(grad_path, verbose=False)
  flat, ref_flat = freeze.flatten(grads), freeze.flatten(ref_grads['params'])
  assert flat.keys() == ref_flat.keys()
  errors = {k: np.abs(flat[k] - np.asarray(ref_flat[k], np.float64)).max()
               / max(np.abs(np.asarray(ref_flat[k])).max(), 1e-12) for k in flat}
  worst = max(errors, key=errors.get)
  assert errors[worst] < TOL, (worst, errors[worst])
  # Running means move as PyTorch's (momentum 0.1 there is 0.9 in Flax's convention). Running
  # variances do not quite: Flax averages the biased batch variance, PyTorch the unbiased one.
  torch.save(ref.state_dict(), path)
  _, ref_after = load_pretrained(path, verbose=False)
  ours, theirs = freeze.flatten(stats), freeze.flatten(ref_after['batch_stats'])
  means = [k for k in ours if k.endswith('/mean')]
  assert len(means) == len(ours) // 2
  assert max(np.abs(ours[k] - np.asarray(theirs[k])).max() for k in means) < TOL
