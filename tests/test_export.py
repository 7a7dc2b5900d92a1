"""jaxtl.export: a run's model, loaded back by the framework it was exported for (transformers for
BERT and ViT, torchvision-layout torch modules for the CNNs), gives the logits jaxtl gives.

The workdirs are written as train.py writes them (jaxtl.run.write: run.json and a text run's
tokenizer; an orbax checkpoint of the train state), with random params and BatchNorm statistics
instead of a training run's: an export reads nothing else, and training would only cost time.
"""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_cnns
from jaxtl import checkpoint, lora, models, run
from jaxtl import train as train_lib
from jaxtl.data import images
from jaxtl.errors import JaxtlError
from jaxtl.export import export, main
from jaxtl.weights import strict

TOL = 1e-4
CLASSES = ['négatif', 'neutral', 'positive']  # Not ASCII, to see labels survive.


def _apply(module, variables, *args, **kwargs):
  logits, _ = jax.jit(lambda v, *a: module.apply(v, *a, train=False, **kwargs))(variables, *args)
  return np.asarray(logits)


def _random_variables(module, *inputs, seed=0):
  """Variables of `module` drawn at random: no zero bias or head, no identity norm, running
  statistics far from (0, 1), kernels scaled by fan-in so activations stay O(1)."""
  shapes = strict.flatten(jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs)))
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in shapes.items():
    name, shape = path.rsplit('/', 1)[-1], leaf.shape
    if name == 'var':
      value = rng.uniform(0.5, 1.5, shape)
    elif name == 'scale':
      value = 1 + 0.1 * rng.normal(size=shape)
    elif name in ('kernel', 'lora_a', 'lora_b'):
      value = rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
    elif name == 'embedding':
      value = rng.normal(size=shape)
    else:  # bias, mean, cls, pos_embedding.
      value = 0.1 * rng.normal(size=shape)
    out[path] = value.astype(np.float32)
  return strict.unflatten(out)


def _write_run(workdir, module, variables, class_names=CLASSES, data=None, step=3):
  """A workdir as train.py leaves it: run.json and a checkpoint of the train state."""
  workdir.mkdir(parents=True)
  run.write(workdir, module, class_names, data or types.SimpleNamespace())
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  state = train_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=variables['params'],
                               model_state=model_state, opt_state={}, rng=jax.random.PRNGKey(0))
  checkpoint.save(checkpoint.manager(workdir), state)
  return workdir


def _leftovers(parent):
  return [p.name for p in parent.iterdir() if p.name.startswith('.')]


# ---------------------------------------------------------------------------------------------
# A text run: mean-pooled bert-tiny with LoRA adapters, and its tokenizer.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def text_run(tmp_path_factory):
  from transformers import BertTokenizerFast
  root = tmp_path_factory.mktemp('text_run')
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + 'the cat sat on a mat rain sun'.split()
  BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / 'tok')
  base = models.create('bert-tiny', num_classes=2, pooling='mean')
  module = lora.LoRA(base, rank=2, alpha=4.0)
  variables = _random_variables(module, *base.example_inputs())  # lora_b != 0: merging matters.
  data = types.SimpleNamespace(tokenizer_dir=root / 'tok', max_length=10)  # As text.TextData.
  return _write_run(root / 'run', module, variables, ['rain', 'sun'], data)


def test_mean_pooled_lora_bert_round_trip(text_run, tmp_path):
  """The encoder as a BertModel, the head beside it, the adapters merged, the tokenizer copied:
  transformers' BertModel + a masked mean + a Linear give jaxtl's logits."""
  import safetensors.torch
  import transformers
  out = export(text_run, tmp_path / 'export')
  assert sorted(p.name for p in out.iterdir()) >= ['classifier.safetensors', 'config.json',
                                                  'model.safetensors', 'tokenizer.json']
  config = json.loads((out / 'config.json').read_text())
  assert config['architectures'] == ['BertModel']
  assert config['jaxtl'] == {'pooling': 'mean', 'classifier': 'classifier.safetensors'}
  assert config['id2label'] == {'0': 'rain', '1': 'sun'}

  texts = ['the cat sat on the mat sun', 'rain on a cat']
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  original = transformers.AutoTokenizer.from_pretrained(text_run / 'tokenizer')
  batch = tokenizer(texts, padding='max_length', max_length=10, truncation=True,
                    return_tensors='pt')
  assert (batch['input_ids'] == original(texts, padding='max_length', max_length=10,
                                         truncation=True, return_tensors='pt')['input_ids']).all()
  assert (batch['attention_mask'] == 0).any()  # Padding: the mean must be masked.

  bert = transformers.BertModel.from_pretrained(out, add_pooling_layer=False).eval()
  head = torch.nn.Linear(bert.config.hidden_size, len(config['id2label']))
  head.load_state_dict(safetensors.torch.load_file(out / 'classifier.safetensors'))
  with torch.no_grad():
    hidden = bert(**batch).last_hidden_state
    mask = batch['attention_mask'][..., None].float()
    ref = head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()
  loaded = run.load(text_run)
  ids, mask = (batch[k].numpy().astype(np.int32) for k in ('input_ids', 'attention_mask'))
  ours = _apply(loaded.module, loaded.variables, ids, attention_mask=mask)
  print('bert mean+lora max |diff|', np.abs(ours - ref).max())
  assert np.abs(ours - ref).max() < TOL
  # The adapters were merged into the kernels (W + alpha / rank * A B), not dropped.
  query = loaded.variables['params']['encoder']['layer_0']['attention']['query']
  merged = query['kernel'] + 2.0 * query['lora_a'] @ query['lora_b']
  exported = safetensors.torch.load_file(out / 'model.safetensors')
  np.testing.assert_allclose(exported['encoder.layer.0.attention.self.query.weight'].numpy(),
                             merged.T, atol=1e-6)


def test_cli_writes_and_refuses_a_non_empty_out(text_run, tmp_path, capsys):
  out = tmp_path / 'cli'
  assert main(['--workdir', str(text_run), '--out', str(out)]) == 0
  printed = capsys.readouterr().out
  assert str(out / 'model.safetensors') in printed and str(out / 'config.json') in printed
  before = sorted(p.name for p in out.iterdir())
  assert main(['--workdir', str(text_run), '--out', str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: --out') and 'not an empty directory' in err and '\n' not in err
  assert sorted(p.name for p in out.iterdir()) == before
  assert not _leftovers(tmp_path)


def test_cli_bad_workdir_exits_2(tmp_path, capsys):
  assert main(['--workdir', str(tmp_path / 'nope'), '--out', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and 'not a jaxtl run' in err and '\n' not in err
  assert not (tmp_path / 'out').exists()
  with pytest.raises(SystemExit) as exit_:  # argparse's errors: one line too.
    main(['--workdir', str(tmp_path), '--out', str(tmp_path / 'out'), '--format', 'onnx'])
  assert exit_.value.code == 2
  assert capsys.readouterr().err.startswith("error: argument --format: invalid choice: 'onnx'")


# ---------------------------------------------------------------------------------------------
# BERT with its pooler: BertForSequenceClassification.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module', params=[False, True], ids=['unrolled', 'scanned'])
def bert_run(tmp_path_factory, request):
  module = models.create('bert-tiny', num_classes=3, scan=request.param)
  variables = _random_variables(module, *module.example_inputs())
  if request.param:  # Stacked layer params, (num_layers, ...), unstacked by the export.
    assert variables['params']['encoder']['layers']['intermediate']['kernel'].shape == (2, 32, 64)
  return _write_run(tmp_path_factory.mktemp('bert') / 'run', module, variables)


def test_bert_for_sequence_classification(bert_run, tmp_path):
  import transformers
  out = export(bert_run, tmp_path / 'bert')
  config = json.loads((out / 'config.json').read_text())
  assert config['architectures'] == ['BertForSequenceClassification']
  assert config['id2label'] == {str(i): name for i, name in enumerate(CLASSES)}
  assert config['label2id'] == {name: i for i, name in enumerate(CLASSES)}
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert type(model).__name__ == 'BertForSequenceClassification'
  assert model.config.id2label[0] == 'négatif'
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 128, (2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  types_ = (np.arange(12) >= 6).astype(np.int32)[None].repeat(2, 0)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                token_type_ids=torch.tensor(types_, dtype=torch.long)).logits.numpy()
  loaded = run.load(bert_run)
  ours = _apply(loaded.module, loaded.variables, ids, attention_mask=mask, token_type_ids=types_)
  print('bert cls max |diff|', np.abs(ours - ref).max())
  assert np.abs(ours - ref).max() < TOL


def test_wrong_format_for_the_model(bert_run, tmp_path):
  with pytest.raises(JaxtlError, match=r"--format 'torchvision': a Bert .* exports only as 'hf'"):
    export(bert_run, tmp_path / 'x', format='torchvision')
  with pytest.raises(JaxtlError, match=r"--format 'onnx' is not one of hf, torchvision"):
    export(bert_run, tmp_path / 'x', format='onnx')
  assert not (tmp_path / 'x').exists() and not _leftovers(tmp_path)


def test_non_empty_out_dir_is_refused(bert_run, tmp_path):
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'keep.txt').write_text('mine')
  with pytest.raises(JaxtlError, match=r'full: exists and is not an empty directory'):
    export(bert_run, tmp_path / 'full')
  assert [p.name for p in (tmp_path / 'full').iterdir()] == ['keep.txt']
  (tmp_path / 'empty').mkdir()  # An empty one is fine.
  assert (export(bert_run, tmp_path / 'empty') / 'model.safetensors').is_file()


# ---------------------------------------------------------------------------------------------
# ViT: ViTForImageClassification, unrolled or scanned.
# ---------------------------------------------------------------------------------------------
def _tiny_vit(**fields):
  return models.vit.ViT(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                        mlp_dim=48, num_classes=3, **fields)


@pytest.mark.parametrize('scan', [False, True])
def test_vit_for_image_classification(scan, tmp_path):
  import transformers
  module = _tiny_vit(scan=scan, hidden_act='gelu_tanh')
  variables = _random_variables(module, *module.example_inputs())
  pre = images.Preprocess(image_size=32, crop_fraction=1.0, mean=(0.5,) * 3, std=(0.25,) * 3)
  workdir = _write_run(tmp_path / 'run', module, variables,
                       data=types.SimpleNamespace(preprocess=pre))
  out = export(workdir, tmp_path / 'vit')
  model = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
  assert type(model).__name__ == 'ViTForImageClassification'
  assert model.config.id2label == dict(enumerate(CLASSES))
  processor = transformers.ViTImageProcessor.from_pretrained(out)  # PIL fallback here.
  assert list(processor.image_std) == [0.25] * 3 and processor.size['height'] == 32
  x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).logits.numpy()
  loaded = run.load(workdir)
  ours = _apply(loaded.module, loaded.variables, x)
  print(f'vit scan={scan} max |diff|', np.abs(ours - ref).max())
  assert np.abs(ours - ref).max() < TOL


@pytest.mark.parametrize('fields,message', [
    (dict(pooling='gap'), r"pooling='gap' cannot export as 'hf'.*class token"),
    (dict(representation_size=16), r"representation_size=16 .*cannot export as 'hf'"),
])
def test_vit_without_a_hf_class(fields, message, tmp_path):
  module = _tiny_vit(**fields)
  workdir = _write_run(tmp_path / 'run', module,
                       _random_variables(module, *module.example_inputs()))
  with pytest.raises(JaxtlError, match=message):
    export(workdir, tmp_path / 'vit')
  assert not (tmp_path / 'vit').exists() and not _leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# CNNs: torchvision state dicts.
# ---------------------------------------------------------------------------------------------
CNNS = {  # jaxtl name, overrides, image size, torchvision-layout reference, expected arch.
    # torchvision's widths, one basic block per stage (downsampling ones and one without).
    'resnet18': (dict(stage_sizes=(1, 1, 1, 1)), 32,
                 lambda: torch_cnns.ResNet(torch_cnns.BasicBlock, [1, 1, 1, 1], 3), None),
    # 64 px: a 2x2 map pooled to 7x7, so fc1's rows see distinct positions.
    'vgg11_bn': (dict(fc_width=16), 64, lambda: torch_cnns.VGG(11, True, 3, fc_width=16), None),
    'mobilenet_v2': (dict(width_mult=0.35), 32, lambda: torch_cnns.MobileNetV2(3, 0.35),
                     'mobilenet_v2'),
    # Keras layout: NHWC flatten before fc1, no adaptive pool (the input must be 224).
    'keras_vgg16': (dict(fc_width=16), 224, lambda: torch_cnns.VGG(16, False, 3, fc_width=16),
                    None),
}


@pytest.mark.parametrize('name', list(CNNS))
def test_torchvision_state_dict(name, tmp_path):
  import safetensors.torch
  overrides, size, reference, arch = CNNS[name]
  module = models.create(name, num_classes=3, **overrides)
  x = np.random.default_rng(3).normal(size=(1 if size > 32 else 2, size, size, 3))
  x = x.astype(np.float32)
  variables = _random_variables(module, x)
  workdir = _write_run(tmp_path / 'run', module, variables)
  out = export(workdir, tmp_path / name)
  info = json.loads((out / 'model.json').read_text())
  assert (info['format'], info['arch'], info['class_names']) == ('torchvision', arch, CLASSES)
  assert info['kwargs']['num_classes'] == 3
  state = safetensors.torch.load_file(out / 'model.safetensors')
  ref = reference().eval()
  ref.load_state_dict(state)  # Strict: every key, every shape, num_batches_tracked included.
  with torch.no_grad():
    ref_logits = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))[0].numpy()
  ours = _apply(module, variables, x)
  print(f'{name} max |diff|', np.abs(ours - ref_logits).max(), 'logit scale',
        np.abs(ref_logits).max())
  assert np.abs(ours - ref_logits).max() < TOL


def test_keras_resnet50_is_refused(tmp_path):
  module = models.create('keras_resnet50', num_classes=3, stage_sizes=(1, 1, 1, 1),
                         widths=(16, 16, 16, 16), stem_width=8)
  x = np.zeros((1, 32, 32, 3), np.float32)
  workdir = _write_run(tmp_path / 'run', module, _random_variables(module, x))
  with pytest.raises(JaxtlError, match=r"stride_in_1x1=True, conv_bias=True: ResNet v1 as "
                                       r"keras_resnet50\) cannot export as 'torchvision'"):
    export(workdir, tmp_path / 'resnet')
  with pytest.raises(JaxtlError, match=r"a ResNet .* exports only as 'torchvision'"):
    export(workdir, tmp_path / 'resnet', format='hf')
  assert not (tmp_path / 'resnet').exists() and not _leftovers(tmp_path)


def test_torchvision_builder_names():
  from jaxtl.export import _torchvision_arch
  arch = lambda name, **fields: _torchvision_arch(models.create(name, num_classes=5, **fields))
  assert (arch('resnet50'), arch('vgg16_bn'), arch('mobilenet_v2', width_mult=0.5)) == (
      'resnet50', 'vgg16_bn', 'mobilenet_v2')
  assert arch('keras_vgg19') == 'vgg19'  # Same layers; the export permutes fc1's rows.
  assert arch('resnet18', stage_sizes=(1, 1, 1, 1)) is None  # No torchvision builder makes it.
  assert arch('vgg11', fc_width=16) is None
