"""ViT checkpoints for tests, in all three layouts, from one random transformers ViT.

The Hugging Face directory is written by transformers itself (save_pretrained). The big_vision .npz
and the timm state dict are written here from the same torch tensors by renaming, independently of
jaxtl's converter, following the published layouts:
  big_vision / original ViT: embedding/kernel (HWIO), cls, Transformer/posembed_input/pos_embedding,
    Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
    LayerNorm_2, MlpBlock_3/Dense_{0,1}}, Transformer/encoder_norm, head; attention kernels keep
    the heads apart ((D, H, hd), out (H, hd, D)).
  big_vision since 2022: 'pos_embedding' at the top without the class token's row (that row is
    folded into 'cls'), per-type numbering (MultiHeadDotProductAttention_0, LayerNorm_1,
    MlpBlock_0), and optionally one scanned 'Transformer/encoderblock' with a leading layer axis.
  timm: cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv (fused q;k;v), attn.proj,
    norm2, mlp.fc1, mlp.fc2}, norm, head.
"""
import numpy as np


def make_hf_vit(directory, *, num_labels=None, seed=0, perturb=0.05, **config):
  """A transformers ViT (ViTForImageClassification with num_labels, else ViTModel with its
  pooler), every parameter perturbed from its init so that no bias is zero and no norm is the
  identity, saved with save_pretrained. Returns the torch model in eval mode."""
  import torch
  import transformers
  defaults = dict(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=37)
  defaults.update(config)
  torch.manual_seed(seed)
  vit_config = transformers.ViTConfig(num_labels=num_labels or 2, **defaults)
  model = (transformers.ViTForImageClassification(vit_config) if num_labels
           else transformers.ViTModel(vit_config))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * perturb)
  model.eval()
  if directory is not None:
    model.save_pretrained(directory)
  return model


def images(config, batch=3, seed=0):
  """(NHWC float32 for jaxtl, NCHW torch tensor for transformers)."""
  import torch
  size = config.get('image_size', 32)
  h, w = (size, size) if isinstance(size, int) else size
  x = np.random.default_rng(seed).normal(size=(batch, h, w, 3)).astype(np.float32)
  return x, torch.tensor(x.transpose(0, 3, 1, 2))


def reference(model, pixels):
  """transformers' outputs: logits (or None), hidden_states (embeddings + every layer), the
  final-normed tokens and the pooler output (ViTModel) or None."""
  import torch
  with torch.no_grad():
    base = model.vit if hasattr(model, 'vit') else model
    out = base(pixels, output_hidden_states=True)
    logits = model(pixels).logits.numpy() if hasattr(model, 'vit') else None
  pooled = None if out.pooler_output is None else out.pooler_output.numpy()
  return dict(logits=logits, hidden_states=[h.numpy() for h in out.hidden_states],
              encoded=out.last_hidden_state.numpy(), pooled=pooled)


def _state(model):
  """transformers' in-memory state dict (transformers-5 names), without the 'vit.' prefix."""
  sd = {}
  for key, value in model.state_dict().items():
    sd[key.removeprefix('vit.')] = value.detach().numpy()
  return sd


def _layer(sd, i, name):
  """A layer's tensor under transformers' in-memory names (layers.N.attention.q_proj, ...)."""
  return sd[f'layers.{i}.{name}']


def big_vision_npz(model, path, style='original'):
  """Write the model's weights as a big_vision .npz. style: 'original' (ViT paper / AugReg
  release names), 'big_vision' (2022 names, class-token row folded into cls) or 'scanned'."""
  sd = _state(model)
  cfg = model.config
  d, heads = cfg.hidden_size, cfg.num_attention_heads
  hd = d // heads
  kernel = sd['embeddings.patch_embeddings.projection.weight'].transpose(2, 3, 1, 0)  # HWIO
  out = {'embedding/kernel': kernel,
         'embedding/bias': sd['embeddings.patch_embeddings.projection.bias'],
         'Transformer/encoder_norm/scale': sd['layernorm.weight'],
         'Transformer/encoder_norm/bias': sd['layernorm.bias']}
  pos, cls = sd['embeddings.position_embeddings'], sd['embeddings.cls_token']
  if style == 'original':
    out['cls'], out['Transformer/posembed_input/pos_embedding'] = cls, pos
  else:
    out['cls'], out['pos_embedding'] = cls + pos[:, :1], pos[:, 1:]
  if 'classifier.weight' in sd:
    out['head/kernel'], out['head/bias'] = sd['classifier.weight'].T, sd['classifier.bias']
  if 'pooler.dense.weight' in sd:
    out['pre_logits/kernel'] = sd['pooler.dense.weight'].T
    out['pre_logits/bias'] = sd['pooler.dense.bias']
  names = (dict(ln1='LayerNorm_0', att='MultiHeadDotProductAttention_1', ln2='LayerNorm_2',
                mlp='MlpBlock_3') if style == 'original' else
           dict(ln1='LayerNorm_0', att='MultiHeadDotProductAttention_0', ln2='LayerNorm_1',
                mlp='MlpBlock_0'))
  layers = []
  for i in range(cfg.num_hidden_layers):
    t = lambda name: _layer(sd, i, name)
    layer = {
        f'{names["ln1"]}/scale': t('layernorm_before.weight'),
        f'{names["ln1"]}/bias': t('layernorm_before.bias'),
        f'{names["ln2"]}/scale': t('layernorm_after.weight'),
        f'{names["ln2"]}/bias': t('layernorm_after.bias'),
        f'{names["mlp"]}/Dense_0/kernel': t('mlp.fc1.weight').T,
        f'{names["mlp"]}/Dense_0/bias': t('mlp.fc1.bias'),
        f'{names["mlp"]}/Dense_1/kernel': t('mlp.fc2.weight').T,
        f'{names["mlp"]}/Dense_1/bias': t('mlp.fc2.bias'),
        f'{names["att"]}/out/kernel': t('attention.o_proj.weight').T.reshape(heads, hd, d),
        f'{names["att"]}/out/bias': t('attention.o_proj.bias'),
    }
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      kernel = t(f'attention.{theirs}.weight').T.reshape(d, heads, hd)
      layer[f'{names["att"]}/{ours}/kernel'] = kernel
      if cfg.qkv_bias:
        layer[f'{names["att"]}/{ours}/bias'] = t(f'attention.{theirs}.bias').reshape(heads, hd)
    layers.append(layer)
  if style == 'scanned':
    for name in layers[0]:
      out[f'Transformer/encoderblock/{name}'] = np.stack([layer[name] for layer in layers])
  else:
    for i, layer in enumerate(layers):
      for name, value in layer.items():
        out[f'Transformer/encoderblock_{i}/{name}'] = value
  np.savez(path, **out)
  return out


def timm_state_dict(model):
  """The model's weights under timm VisionTransformer names (q, k, v fused into qkv)."""
  sd = _state(model)
  cfg = model.config
  out = {'cls_token': sd['embeddings.cls_token'], 'pos_embed': sd['embeddings.position_embeddings'],
         'patch_embed.proj.weight': sd['embeddings.patch_embeddings.projection.weight'],
         'patch_embed.proj.bias': sd['embeddings.patch_embeddings.projection.bias'],
         'norm.weight': sd['layernorm.weight'], 'norm.bias': sd['layernorm.bias']}
  if 'classifier.weight' in sd:
    out['head.weight'], out['head.bias'] = sd['classifier.weight'], sd['classifier.bias']
  for i in range(cfg.num_hidden_layers):
    t = lambda name: _layer(sd, i, name)
    b = f'blocks.{i}.'
    for ours, theirs in (('norm1', 'layernorm_before'), ('norm2', 'layernorm_after')):
      out[b + ours + '.weight'], out[b + ours + '.bias'] = (t(theirs + '.weight'),
                                                            t(theirs + '.bias'))
    out[b + 'attn.qkv.weight'] = np.concatenate(
        [t(f'attention.{p}_proj.weight') for p in 'qkv'], axis=0)
    if cfg.qkv_bias:
      out[b + 'attn.qkv.bias'] = np.concatenate([t(f'attention.{p}_proj.bias') for p in 'qkv'])
    out[b + 'attn.proj.weight'], out[b + 'attn.proj.bias'] = (t('attention.o_proj.weight'),
                                                              t('attention.o_proj.bias'))
    out[b + 'mlp.fc1.weight'], out[b + 'mlp.fc1.bias'] = t('mlp.fc1.weight'), t('mlp.fc1.bias')
    out[b + 'mlp.fc2.weight'], out[b + 'mlp.fc2.bias'] = t('mlp.fc2.weight'), t('mlp.fc2.bias')
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_timm(model, path):
  """A timm-layout state dict as .safetensors or .pth (by the suffix)."""
  import torch
  sd = {k: torch.tensor(v) for k, v in timm_state_dict(model).items()}
  if str(path).endswith('.safetensors'):
    import safetensors.torch
    safetensors.torch.save_file(sd, str(path))
  else:
    torch.save(sd, path)
