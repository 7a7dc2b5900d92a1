"""The ViT paper's transfer recipe (Dosovitskiy et al., 2021, Sec. 4.1 and App. B.1.1): ViT-B/16
pre-trained on ImageNet-21k, fine-tuned at a higher resolution than it was trained at.

  python train.py --config configs/vit_b16_transfer.py --workdir runs/vit_b16_cifar10

  - Fine-tune at 384 (pre-trained at 224): the 14x14 grid of position embeddings is resampled to
    24x24 (bilinear, the class token's embedding kept apart) when the weights load.
  - The pre-trained head (the 21k-way pre-logits layer) is removed; a new zero-initialised head
    takes its place (load_pretrained zero-initialises every new head).
  - SGD with momentum 0.9, no weight decay, gradient clipping at global norm 1, a cosine schedule
    after a linear warmup (500 steps, as the released vit_jax configs); batch 512; learning rate
    0.03 (the paper sweeps {0.001, 0.003, 0.01, 0.03}); about 10k steps on CIFAR-10 (100 epochs
    at batch 512).
  - Augmentation: the paper resizes to 448 and takes a random 384 crop (area 0.73) plus a flip;
    here a random resized crop of 0.7-0.8 of the area (images.py also jitters the aspect ratio).
  - Inputs in [-1, 1] (mean = std = 0.5): the weights' pretrained_cfg says so; the images are
    resized to 384 without a centre crop (crop_fraction 1).
  - scan over the 12 blocks (one compiled block) and remat (recompute activations in the
    backward pass): 577 tokens x batch 512 does not fit an accelerator's memory otherwise. On a
    smaller accelerator lower --config.batch_size (the paper's numbers assume 512).

Needs a network (hf:google/vit-base-patch16-224-in21k and tfds cifar10) and an accelerator. NOT
run here: no network, no ViT weights offline, a 2-core CPU. What is verified: the test suite runs
this config as it is, with only the weights swapped for a tiny random Hugging Face ViT saved at
224 and the data for tfds.testing.mock_data (tests/test_vit_configs.py), so the resolution change,
head replacement, optimizer and schedule all build and train. No accuracy has been measured with
this config; the paper's CIFAR-10 results for ViT-B/16 are NOT reproduced here.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = dict(
      source='hf:google/vit-base-patch16-224-in21k', arch='', name='',
      # The in21k ViTModel's pooler is the paper's pre-logits layer: dropped for fine-tuning.
      dont_load=[r'pre_logits/.*'],
      overrides=dict(image_size=384, representation_size=None, dropout_rate=0.0,
                     resample_method='bilinear', scan=True, remat=True, dtype='float32'))
  # Preprocessing (mean/std 0.5) comes from the weights' pretrained_cfg; the size from here.
  config.data = dict(kind='image_tfds', name='cifar10', path='', test_path='', test_fraction=0.0,
                     train_split='train', test_split='test', max_train_examples=0,
                     max_test_examples=0, on_bad_image='stop', image_size=384, crop_fraction=1.0,
                     augment='crop_flip', crop_scale=(0.7, 0.8))
  config.freeze = dict(scheme='full')
  config.optim = dict(name='sgd', lr=0.03, momentum=0.9, nesterov=False, weight_decay=0.0,
                      schedule='cosine', warmup_steps=500, clip_norm=1.0,
                      mu_dtype='')  # mu_dtype='bfloat16': the momentum in bf16.
  config.batch_size = 512
  config.num_epochs = 100
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.grad_accum_steps = 1   # k > 1: each step averages the gradients of k micro-batches.
  config.on_nonfinite = 'stop'  # Or 'skip': a non-finite loss/gradient skips the update.
  # data=-1: all devices; fsdp: shard params and optimizer state over them (README).
  config.mesh = dict(data=-1, fsdp=False, fsdp_min_size=2**16, rules=[])
  # A head-only phase on fixed inputs trains on features computed once: auto|memory|disk|off.
  config.feature_cache = 'auto'
  config.distributed = False  # True: jax.distributed.initialize() (GPU cluster, TPU pod).
  return config
