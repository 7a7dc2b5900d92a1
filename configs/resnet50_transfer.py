"""The classic two-phase transfer recipe on an ImageNet ResNet-50 (the Keras tutorial this project
grew from): phase 1 freezes the convolutional base (BatchNorm included: it runs on its running
statistics) and trains a new head on global-average-pooled features with Adam; phase 2 unfreezes
the top residual blocks (the last stage, conv5_x) and continues with SGD at lr 1e-4, momentum 0.9.

  python train.py --config configs/resnet50_transfer.py --workdir runs/resnet50_flowers

Needs a network: microsoft/resnet-50 from the Hugging Face Hub and tfds tf_flowers. Offline, point
it at local files, e.g. --config.model.source=/path/to/resnet50-0676ba61.pth (torchvision) or
.../resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 (Keras; the pipeline then feeds BGR
minus the Caffe mean by itself), and --config.data.kind=image_folder --config.data.path=DIR.
Not run to completion here (no ResNet-50 weights or flower photos offline); the test suite runs
this config end to end on a tiny random ResNet and a tiny image folder (tests/test_train_images.py).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = dict(source='hf:microsoft/resnet-50', arch='', name='', dont_load=[],
                      overrides=dict(dtype='float32'))
  # Preprocessing (size, mean/std, crop, channel order) comes from the weights' pretrained_cfg.
  config.data = dict(kind='image_tfds', name='tf_flowers', path='', test_path='',
                     test_fraction=0.2, train_split='', test_split='', max_train_examples=0,
                     max_test_examples=0, on_bad_image='stop', augment='crop_flip',
                     crop_scale=(0.25, 1.0), image_size=0)
  config.bn_mode = 'follow_freeze'   # Frozen BN runs on (and keeps) its running statistics.
  config.phases = [
      # Phase 1: the base frozen, a new zero-initialised head trained with Adam.
      dict(freeze=dict(scheme='linear_probe'), num_epochs=5,
           optim=dict(name='adamw', lr=1e-3, weight_decay=0.0, schedule='constant')),
      # Phase 2: the top 3 residual blocks (conv5_x) and the head, SGD at a low learning rate.
      dict(freeze=dict(scheme='last_n_blocks:3'), num_epochs=5,
           optim=dict(name='sgd', lr=1e-4, momentum=0.9, schedule='constant')),
  ]
  config.batch_size = 32
  config.log_every_steps = 10
  config.checkpoint_every_steps = 200
  config.grad_accum_steps = 1   # k > 1: each step averages the gradients of k micro-batches.
  config.on_nonfinite = 'stop'  # Or 'skip': a non-finite loss/gradient skips the update.
  # data=-1: all devices; fsdp: shard params and optimizer state over them (README).
  config.mesh = dict(data=-1, fsdp=False, fsdp_min_size=2**16, rules=[])
  # A head-only phase on fixed inputs trains on features computed once: auto|memory|disk|off.
  config.feature_cache = 'auto'
  config.distributed = False  # True: jax.distributed.initialize() (GPU cluster, TPU pod).
  return config
