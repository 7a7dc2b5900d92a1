"""Model registry: `create(name, **overrides)` returns a Flax Linen module.

Every model returns `(logits, out)`, gives `example_inputs()` for `init`, and exposes its block
structure through `num_blocks` and `param_group(path)` ('stem' | 'block' | 'neck' | 'head', block
index) for freezing schemes.
"""
import jax

from jaxtl import host_memory, ops
from jaxtl.models import bert
from jaxtl.models import mobilenet_v2, resnet, vgg
from jaxtl.models import vit

REGISTRY = {
    'bert-base': bert.BertBase,
    'bert-large': bert.BertLarge,
    'minilm-l6': bert.MiniLML6,
    'minilm-l12': bert.MiniLML12,
    'bert-tiny': bert.BertTiny,
    'resnet18': resnet.ResNet18,
    'resnet34': resnet.ResNet34,
    'resnet50': resnet.ResNet50,
    'resnet101': resnet.ResNet101,
    'resnet152': resnet.ResNet152,
    'keras_resnet50': resnet.KerasResNet50,
    'mobilenet_v2': mobilenet_v2.MobileNetV2,
    'vgg11': vgg.VGG11,
    'vgg13': vgg.VGG13,
    'vgg16': vgg.VGG16,
    'vgg19': vgg.VGG19,
    'vgg11_bn': vgg.VGG11BN,
    'vgg13_bn': vgg.VGG13BN,
    'vgg16_bn': vgg.VGG16BN,
    'vgg19_bn': vgg.VGG19BN,
    'keras_vgg16': vgg.KerasVGG16,
    'keras_vgg19': vgg.KerasVGG19,
    'vit-ti16': vit.ViTTi16,
    'vit-s16': vit.ViTS16,
    'vit-b16': vit.ViTB16,
    'vit-b32': vit.ViTB32,
    'vit-l16': vit.ViTL16,
}


def create(name: str, **overrides):
  """The named model variant, with any of its fields overridden (e.g. num_classes=5)."""
  if name not in REGISTRY:
    from jaxtl.errors import ConfigError
    raise ConfigError(f'unknown model {name!r}; known models: {", ".join(sorted(REGISTRY))}')
  return REGISTRY[name](**overrides)


def init(module, seed: int = 0, shardings=None):
  """Random variables for `module`, from its example inputs, in one jitted init. The key is
  `ops.fused_key(seed)`: jax.random.key(seed)'s values, without the temporaries of jax's threefry
  loop on the CPU (BERT-base's init plans 20 MiB of them, not 289). The init is compiled first and
  the heap the compiler freed is handed back before it runs: the params would otherwise be placed
  above it (ResNet-50's init peaked 320 MiB above the baseline, now 250; see
  host_memory.release_freed_host_memory).

  `shardings`, if given, maps the variables' structure (their jax.eval_shape) to a sharding for
  each (train.create_model passes config.mesh's): the init is then compiled with those
  out_shardings, so each device computes and holds only its own shard of every variable and a
  model too large for one device is never whole on any (the values are the same: jax's
  partitionable threefry draws the same numbers whatever the sharding)."""
  init_fn = lambda: module.init(ops.fused_key(seed), *module.example_inputs())
  out_shardings = None if shardings is None else shardings(jax.eval_shape(init_fn))
  compiled = jax.jit(init_fn, out_shardings=out_shardings).lower().compile()
  host_memory.release_freed_host_memory()
  return compiled()
