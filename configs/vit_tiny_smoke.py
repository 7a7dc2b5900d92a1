"""Smoke test for the Vision Transformer: a tiny ViT (4 blocks of width 64, 7x7 patches: 16 tokens
and the class token) trained from scratch on a 2,000-image subset of Fashion-MNIST, fully offline,
in about a minute on a CPU.

  apt-get install -y dataset-fashion-mnist            # /usr/share/datasets/fashion-mnist
  python train.py --config configs/vit_tiny_smoke.py --workdir /tmp/jaxtl_vit_smoke

The 28x28 grayscale images become RGB in [-1, 1] (mean = std = 0.5, as Google's ViT weights
expect), at their own size: no resize, no crop, horizontal flips only.

Reached (2-core CPU, shared with other jobs): test accuracy 0.770 on the 1,000 held-out images
after 12 epochs (744 steps), 70 s including compiles. For scale: a raw-pixel logistic regression
on a 2k/1k split of Fashion-MNIST reaches about 0.79 (offline-assets notes); a ViT trained from
scratch needs far more data than this to beat it. The point here is that everything runs.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = dict(name='vit-ti16', source='', arch='', dont_load=[], overrides=dict(
      image_size=28, patch_size=7, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128,
      dropout_rate=0.0, stochastic_depth=0.05, dtype='float32', remat=False,
      scan=False))
  config.data = dict(kind='fashion_mnist', path='/usr/share/datasets/fashion-mnist',
                     max_train_examples=2000, max_test_examples=1000, image_size=28,
                     crop_fraction=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                     augment='flip', on_bad_image='stop')
  config.freeze = dict(scheme='full')
  config.optim = dict(name='adamw', lr=3e-3, weight_decay=0.0, warmup_fraction=0.1,
                      schedule='cosine', clip_norm=1.0, mu_dtype='')
  config.batch_size = 32
  config.num_epochs = 12
  config.log_every_steps = 10
  config.checkpoint_every_steps = 1000
  config.grad_accum_steps = 1   # k > 1: each step averages the gradients of k micro-batches.
  config.on_nonfinite = 'stop'  # Or 'skip': a non-finite loss/gradient skips the update.
  # data=-1: all devices; fsdp: shard params and optimizer state over them (README).
  config.mesh = dict(data=-1, fsdp=False, fsdp_min_size=2**16, rules=[])
  # A head-only phase on fixed inputs trains on features computed once: auto|memory|disk|off.
  config.feature_cache = 'auto'
  config.distributed = False  # True: jax.distributed.initialize() (GPU cluster, TPU pod).
  return config
