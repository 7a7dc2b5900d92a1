"""Image classification data: a local folder of images per class, tfds image datasets, or the
Fashion-MNIST files of Debian's dataset-fashion-mnist; augmentation and normalisation per batch.

Images stay in memory as uint8 (small); each batch is turned into normalised float32 NHWC by
`ImageData.prepare(batch, train=...)`, which the train loop calls before every step:
  train: random resized crop (area fraction `crop_scale`, aspect ratio 3/4..4/3) + horizontal flip,
  eval:  resize to image_size / crop_fraction, centre crop image_size (timm / torchvision style),
then grayscale -> RGB, channel order, (x / 255 - mean) / std. The random crop and flip of a batch
depend only on (seed, epoch, step), so a resumed run sees the same pixels.

config.data fields (all but `kind` optional):
  kind: 'image_folder' | 'image_tfds' | 'fashion_mnist'
  path: image_folder: root/<class name>/*.{jpg,jpeg,png,bmp} (local or 'pkg:<package>/<path>');
    fashion_mnist: the folder of the idx .gz files (default /usr/share/datasets/fashion-mnist).
  test_path: image_folder test split; without it a stratified `test_fraction` (default 0.2) of the
    training images is held out (seeded). tfds datasets without a test split do the same.
  name, train_split, test_split, data_dir: image_tfds (tf_flowers, cifar10, oxford_iiit_pet,
    fashion_mnist, or any tfds dataset with 'image' and 'label' features).
  max_train_examples, max_test_examples: a seeded random subset of each split (0: all).
  on_bad_image: 'stop' (default: DataError naming the file) or 'skip' (skip and report the count).
  image_size, crop_fraction, mean, std, channel_order ('RGB' | 'BGR'), interpolation
    ('bilinear' | 'bicubic'): override the weights' pretrained_cfg (else ImageNet defaults).
  augment: 'crop_flip' (default) | 'flip' | 'none';  crop_scale: (min, max) area of the crop.

The pretrained_cfg of a weights source (jaxtl.weights.pretrained_cfg) is a dict with input_size,
crop_fraction, mean, std (per channel, in the model's channel order, on the [0, 1] pixel scale, so
Caffe-style "BGR minus mean" is mean = mean_255 / 255, std = 1 / 255), channel_order and
interpolation.
"""
import dataclasses
import functools
import gzip
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl import paths
from jaxtl.data import split_holdout
from jaxtl.errors import DataError, JaxtlError

KINDS = ('image_folder', 'image_tfds', 'fashion_mnist')
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot']
# tfds datasets whose held-out split is not called 'test'; None: hold out test_fraction of train.
TFDS_TEST_SPLITS = {'tf_flowers': None}

IMAGENET_CFG = dict(input_size=224, crop_fraction=0.875, interpolation='bilinear',
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channel_order='RGB')


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """What turns stored uint8 images into model inputs; built from pretrained_cfg + config.data."""
  image_size: int = 224
  crop_fraction: float = 0.875
  interpolation: str = 'bilinear'
  mean: tuple = IMAGENET_CFG['mean']
  std: tuple = IMAGENET_CFG['std']
  channel_order: str = 'RGB'
  augment: str = 'crop_flip'
  crop_scale: tuple = (0.08, 1.0)

  @property
  def resize_size(self):
    """The side the eval centre crop is taken from (e.g. 256 for 224 at 0.875)."""
    return int(round(self.image_size / self.crop_fraction))


def make_preprocess(cfg, pretrained_cfg=None) -> Preprocess:
  """Preprocess from the weights' pretrained_cfg, with any config.data field taking precedence."""
  merged = dict(IMAGENET_CFG, **(pretrained_cfg or {}))
  get = lambda field, key=None: cfg.get(field) or merged[key or field]
  pre = Preprocess(
      image_size=int(get('image_size', 'input_size')), crop_fraction=float(get('crop_fraction')),
      interpolation=get('interpolation'), mean=tuple(map(float, get('mean'))),
      std=tuple(map(float, get('std'))), channel_order=get('channel_order').upper(),
      augment=cfg.get('augment') or 'crop_flip',
      crop_scale=tuple(cfg.get('crop_scale') or (0.08, 1.0)))
  if pre.channel_order not in ('RGB', 'BGR'):
    raise DataError(f'config.data.channel_order {pre.channel_order!r} is not RGB or BGR')
  if pre.interpolation not in ('bilinear', 'bicubic'):
    raise DataError(f'config.data.interpolation {pre.interpolation!r} is not bilinear or bicubic')
  if pre.augment not in ('crop_flip', 'flip', 'none'):
    raise DataError(f'config.data.augment {pre.augment!r} is not one of crop_flip, flip, none')
  if len(pre.mean) != 3 or len(pre.std) != 3:
    raise DataError(f'mean {pre.mean} / std {pre.std}: need 3 values each')
  return pre


# ---------------------------------------------------------------------------------------------
# Per-batch transform: one jitted resample for the whole batch.
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=('size', 'method', 'bgr'))
def _transform(images, scale, translation, flip, mean, std, *, size, method, bgr):
  """uint8 [B, H, W, C] -> float32 [B, size, size, 3]; per example, output pixel p samples the
  input at (p - translation) / scale (jax.image.scale_and_translate, antialiased)."""
  x = images.astype(jnp.float32) / 255.0
  resample = lambda im, s, t: jax.image.scale_and_translate(
      im, (size, size, im.shape[-1]), (0, 1), s, t, method=method, antialias=True)
  x = jax.vmap(resample)(x, scale, translation)
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  x = jnp.clip(x, 0.0, 1.0)  # Bicubic overshoots; the pixels a model saw never did.
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if bgr:
    x = x[..., ::-1]
  return (x - mean) / std


def _random_boxes(rng, n, height, width, area_range, ratio_range=(3 / 4, 4 / 3), tries=10):
  """(y0, x0, h, w) per example, as torchvision's RandomResizedCrop draws them (falling back to
  the whole image when no try fits)."""
  boxes = np.tile(np.array([0.0, 0.0, height, width]), (n, 1))
  done = np.zeros(n, bool)
  for _ in range(tries):
    area = height * width * rng.uniform(*area_range, n)
    ratio = np.exp(rng.uniform(np.log(ratio_range[0]), np.log(ratio_range[1]), n))
    w, h = np.sqrt(area * ratio), np.sqrt(area / ratio)
    fits = ~done & (w <= width) & (h <= height)
    y0, x0 = rng.uniform(0, 1, n) * (height - h), rng.uniform(0, 1, n) * (width - w)
    boxes[fits] = np.stack([y0, x0, h, w], 1)[fits]
    done |= fits
  return boxes


@dataclasses.dataclass
class ImageData:
  train: dict           # 'images': uint8 [N, H, W, C] (C = 1 or 3, RGB), 'label': int32 [N]
  test: dict
  class_names: list
  preprocess: Preprocess
  skipped: list = dataclasses.field(default_factory=list)  # Unreadable files skipped.

  def prepare(self, batch: dict, *, train: bool, seed=0, epoch=0, step=0) -> dict:
    """The batch with 'images' as normalised float32 [B, S, S, 3] (other keys unchanged)."""
    pre = self.preprocess
    images = batch['images']
    n, height, width = images.shape[:3]
    size = pre.image_size
    if train and pre.augment != 'none':
      rng = np.random.default_rng([seed, epoch, step])
      if pre.augment == 'crop_flip':
        y0, x0, h, w = _random_boxes(rng, n, height, width, pre.crop_scale).T
      else:  # The eval view, flipped at random.
        y0, x0, h, w = self._centre_boxes(n, height, width).T
      flip = rng.uniform(size=n) < 0.5
    else:
      y0, x0, h, w = self._centre_boxes(n, height, width).T
      flip = np.zeros(n, bool)
    scale = np.stack([size / h, size / w], 1).astype(np.float32)
    translation = np.stack([-y0 * scale[:, 0], -x0 * scale[:, 1]], 1).astype(np.float32)
    x = _transform(images, scale, translation, flip, np.asarray(pre.mean, np.float32),
                   np.asarray(pre.std, np.float32), size=size,
                   method='cubic' if pre.interpolation == 'bicubic' else 'linear',
                   bgr=pre.channel_order == 'BGR')
    return {**batch, 'images': np.asarray(x)}

  def _centre_boxes(self, n, height, width):
    """Resize the shorter side to resize_size, take the centre image_size square: in input
    pixels, a centred square of side min(H, W) * crop_fraction."""
    side = min(height, width) * self.preprocess.image_size / self.preprocess.resize_size
    box = [(height - side) / 2, (width - side) / 2, side, side]
    return np.tile(np.array(box), (n, 1))


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------
def _pil():
  try:
    from PIL import Image
  except ImportError:
    raise DataError('reading image files needs Pillow (pip install pillow)') from None
  return Image


def _fit(image, side, interpolation):
  """A PIL image resized (shorter side = side) and centre-cropped to side x side, as uint8 RGB.

  Folders hold images of any size; storing them at the eval resize size keeps memory small and
  loses only what a centre crop would lose (the long side's margins)."""
  Image = _pil()
  resample = Image.BICUBIC if interpolation == 'bicubic' else Image.BILINEAR
  w, h = image.size
  scale = side / min(w, h)
  image = image.resize((max(side, round(w * scale)), max(side, round(h * scale))), resample)
  w, h = image.size
  left, top = (w - side) // 2, (h - side) // 2
  return np.asarray(image.crop((left, top, left + side, top + side)), np.uint8)


def read_image(path: pathlib.Path, side: int, interpolation='bilinear') -> np.ndarray:
  """uint8 [side, side, 3]; grayscale, palette and RGBA images become RGB."""
  Image = _pil()
  try:
    with Image.open(path) as image:
      return _fit(image.convert('RGB'), side, interpolation)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f'{path}: unreadable image ({type(e).__name__}: {e})') from None


def read_folder(root: pathlib.Path, side: int, interpolation='bilinear', on_bad_image='stop'):
  """(images uint8 [N, side, side, 3], labels, class names, skipped paths) from root/<class>/*."""
  if not root.is_dir():
    raise DataError(f'{root}: not a folder (expected {root}/<class name>/*.jpg)')
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.'))
  if not classes:
    raise DataError(f'{root}: no class sub-folders (expected {root}/<class name>/*.jpg)')
  images, labels, skipped = [], [], []
  for i, name in enumerate(classes):
    files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in EXTENSIONS)
    if not files:
      raise DataError(f'{root / name}: class folder holds no images ({", ".join(EXTENSIONS)})')
    for path in files:
      try:
        images.append(read_image(path, side, interpolation))
      except DataError:
        if on_bad_image != 'skip':
          raise
        skipped.append(str(path))
        continue
      labels.append(i)
  if not images:
    raise DataError(f'{root}: none of the images could be read')
  return np.stack(images), np.array(labels, np.int32), classes, skipped


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
  """An idx file (the MNIST format): big-endian magic, dims, then uint8 data."""
  try:
    raw = gzip.open(path).read() if path.suffix == '.gz' else path.read_bytes()
  except OSError as e:
    raise DataError(f'{path}: unreadable ({e})') from None
  ndim = raw[3] if len(raw) >= 4 else 0
  if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[:4], 'big') != magic:
    raise DataError(f'{path}: not an idx file with magic {magic:#x}')
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise DataError(f'{path}: truncated ({data.size} bytes of data for shape {dims})')
  return data.reshape(dims)


def read_fashion_mnist(directory: pathlib.Path, split: str):
  """(images uint8 [N, 28, 28, 1], labels int32) of 'train' or 't10k'."""
  images = _read_idx(directory / f'{split}-images-idx3-ubyte.gz', 0x803)
  labels = _read_idx(directory / f'{split}-labels-idx1-ubyte.gz', 0x801)
  if len(images) != len(labels):
    raise DataError(f'{directory}: {len(images)} {split} images but {len(labels)} labels')
  return images[..., None], labels.astype(np.int32)


def _read_tfds(cfg, side, interpolation):
  """[(images, labels)] for the train and test splits (test None when the dataset has none),
  and the class names."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(cfg.name, data_dir=cfg.get('data_dir') or None)
  builder.download_and_prepare()
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise DataError(f'tfds {cfg.name}: needs "image" and "label" features; it has '
                    f'{sorted(features.keys())}')
  names = list(features['label'].names)
  test_split = cfg.get('test_split') or TFDS_TEST_SPLITS.get(cfg.name, 'test')
  out = []
  for split in (cfg.get('train_split') or 'train', test_split):
    if split is None:
      out.append(None)
      continue
    images, labels = [], []
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      images.append(ex['image'])
      labels.append(int(ex['label']))
    if not images:
      raise DataError(f'tfds {cfg.name} split {split!r} is empty')
    out.append((_stack(images, side, interpolation), np.array(labels, np.int32)))
  return out, names


def _stack(images, side, interpolation):
  """Images of one square size no larger than `side` are kept as they are (CIFAR, MNIST: the
  batch transform upsamples them); others are resized and centre-cropped to side x side."""
  shapes = {im.shape for im in images}
  if len(shapes) == 1:
    (shape,) = shapes
    if shape[0] == shape[1] and shape[0] <= side:
      return np.stack(images).astype(np.uint8)
  Image = _pil()
  fit = lambda im: _fit(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert('RGB'),
                        side, interpolation)
  return np.stack([fit(im) for im in images])


def _subset(images, labels, limit, seed):
  if not limit or limit >= len(labels):
    return images, labels
  idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
  return images[idx], labels[idx]


def load(cfg, pretrained_cfg=None, seed=0) -> ImageData:
  """The train and test splits of `config.data` (an image kind), with their preprocessing."""
  pre = make_preprocess(cfg, pretrained_cfg)
  side, interp = pre.resize_size, pre.interpolation
  on_bad = cfg.get('on_bad_image') or 'stop'
  if on_bad not in ('stop', 'skip'):
    raise DataError(f'config.data.on_bad_image {on_bad!r} is not stop or skip')
  skipped, test = [], None
  try:
    if cfg.kind == 'image_folder':
      root = paths.resolve(cfg.path, what='config.data.path')
      train_x, train_y, names, skipped = read_folder(root, side, interp, on_bad)
      if cfg.get('test_path'):
        test_root = paths.resolve(cfg.test_path, what='config.data.test_path')
        test_x, test_y, test_names, test_skipped = read_folder(test_root, side, interp, on_bad)
        if test_names != names:
          raise DataError(f'config.data.test_path {cfg.test_path}: classes {test_names} differ '
                          f'from the training classes {names}')
        test, skipped = (test_x, test_y), skipped + test_skipped
    elif cfg.kind == 'fashion_mnist':
      directory = paths.resolve(cfg.get('path') or FASHION_MNIST_DIR, what='Fashion-MNIST folder')
      train_x, train_y = read_fashion_mnist(directory, 'train')
      test = read_fashion_mnist(directory, 't10k')
      names = FASHION_MNIST_CLASSES
    elif cfg.kind == 'image_tfds':
      ((train_x, train_y), test), names = _read_tfds(cfg, side, interp)
    else:
      raise DataError(f'config.data.kind {cfg.kind!r} is not an image kind ({", ".join(KINDS)})')
  except JaxtlError as e:
    if cfg.kind == 'fashion_mnist' and 'does not exist' in str(e):
      raise DataError(f'{e}; install it with `apt-get install -y dataset-fashion-mnist`') from None
    raise DataError(str(e)) from None
  if test is None:
    fraction = cfg.get('test_fraction') or 0.2
    train_idx, test_idx = split_holdout(train_y, fraction, seed)
    if not len(test_idx) or not len(train_idx):
      raise DataError(f'{cfg.get("path") or cfg.get("name")}: {len(train_y)} images are too few '
                      f'to hold out config.data.test_fraction = {fraction}; add images or give '
                      'config.data.test_path')
    test = (train_x[test_idx], train_y[test_idx])
    train_x, train_y = train_x[train_idx], train_y[train_idx]
  train_x, train_y = _subset(train_x, train_y, cfg.get('max_train_examples'), seed)
  test_x, test_y = _subset(*test, cfg.get('max_test_examples'), seed + 1)
  if skipped:
    print(f'Skipped {len(skipped)} unreadable image(s) (config.data.on_bad_image = skip), e.g. '
          f'{skipped[0]}')
  return ImageData({'images': train_x, 'label': train_y}, {'images': test_x, 'label': test_y},
                   list(names), pre, skipped)
