"""Image data: a local folder (jpg/png/bmp, grayscale -> RGB, unreadable files stop with their
path or are skipped and counted), the real Fashion-MNIST files of Debian's dataset-fashion-mnist,
tfds image datasets (tfds.testing.mock_data only: never a hub download), and the per-batch
transform (eval resize + centre crop, train crop/flip, normalisation and channel order from the
weights' pretrained_cfg)."""
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxtl.data import images
from jaxtl.errors import DataError


def _cfg(**fields):
  return ml_collections.ConfigDict(fields)


@pytest.fixture
def folder(tmp_path):
  root = tmp_path / 'pets'
  rng = np.random.default_rng(0)
  for name, ext in (('cat', 'jpg'), ('dog', 'png'), ('owl', 'bmp')):
    (root / name).mkdir(parents=True)
    for j in range(5):
      Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(root / name / f'{j}.{ext}')
  Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8), 'L').save(root / 'owl' / 'gray.png')
  (root / 'cat' / 'notes.txt').write_text('not an image')  # Ignored: not an image extension.
  return root


def test_folder_reads_all_formats_and_grayscale(folder):
  data = images.load(_cfg(kind='image_folder', path=str(folder), image_size=16, test_fraction=0.2))
  assert data.class_names == ['cat', 'dog', 'owl']
  assert data.train['images'].shape[1:] == (18, 18, 3)  # Stored at round(16 / 0.875).
  assert len(data.train['label']) + len(data.test['label']) == 16
  assert set(data.test['label']) == {0, 1, 2}  # Stratified hold-out.
  batch = data.prepare({k: v[:4] for k, v in data.train.items()}, train=True, seed=0, step=1)
  assert batch['images'].shape == (4, 16, 16, 3) and batch['images'].dtype == np.float32
  again = data.prepare({k: v[:4] for k, v in data.train.items()}, train=True, seed=0, step=1)
  np.testing.assert_array_equal(batch['images'], again['images'])  # Seeded: resumes exactly.


def test_unreadable_image_stops_with_its_path_or_is_skipped(folder, capsys):
  bad = folder / 'dog' / 'broken.png'
  bad.write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  with pytest.raises(DataError, match=rf'{bad}: unreadable image'):
    images.load(_cfg(kind='image_folder', path=str(folder), image_size=16))
  data = images.load(_cfg(kind='image_folder', path=str(folder), image_size=16,
                          on_bad_image='skip'))
  assert data.skipped == [str(bad)]
  assert 'Skipped 1 unreadable image(s)' in capsys.readouterr().out
  assert len(data.train['label']) + len(data.test['label']) == 16


def test_eval_transform_is_resize_then_centre_crop_and_normalises():
  """Eval at crop_fraction 0.5 keeps the centre half (of a red square on black whose border lies
  just outside it: the antialiasing kernel's reach); mean/std and BGR apply."""
  stored = np.zeros((1, 32, 32, 3), np.uint8)
  stored[:, 6:26, 6:26] = [255, 0, 0]
  pre = images.make_preprocess(_cfg(image_size=8, crop_fraction=0.5),
                               dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
  out = images.ImageData({}, {}, [], pre).prepare({'images': stored}, train=False)['images']
  np.testing.assert_allclose(out[0, ..., 0], 1.0, atol=1e-5)   # All red: (1 - .5) / .5.
  np.testing.assert_allclose(out[0, ..., 1:], -1.0, atol=1e-5)
  bgr = images.make_preprocess(_cfg(image_size=8, crop_fraction=0.5),
                               dict(mean=(0, 0, 0), std=(1, 1, 1), channel_order='BGR'))
  out = images.ImageData({}, {}, [], bgr).prepare({'images': stored}, train=False)['images']
  np.testing.assert_allclose(out[0, ..., 2], 1.0, atol=1e-5)   # Red is last in BGR.
  wide = images.make_preprocess(_cfg(image_size=8, crop_fraction=1.0), dict(mean=(0, 0, 0),
                                                                            std=(1, 1, 1)))
  out = images.ImageData({}, {}, [], wide).prepare({'images': stored}, train=False)['images']
  assert out[0, 0, 0, 0] < 0.1 and out[0, 4, 4, 0] > 0.9  # The whole image: black corners.


def test_fashion_mnist_from_debian_package():
  directory = pathlib.Path(images.FASHION_MNIST_DIR)
  if not directory.is_dir():
    pytest.fail('apt-get install -y dataset-fashion-mnist (see the README)')
  data = images.load(_cfg(kind='fashion_mnist', image_size=32, crop_fraction=1.0,
                          max_train_examples=500, max_test_examples=200))
  assert data.train['images'].shape == (500, 28, 28, 1) and data.test['images'].shape[0] == 200
  assert data.class_names[9] == 'Ankle boot' and set(data.train['label']) == set(range(10))
  batch = data.prepare({k: v[:8] for k, v in data.test.items()}, train=False)
  assert batch['images'].shape == (8, 32, 32, 3)  # Grayscale -> RGB, upsampled.
  pixels = batch['images'] * np.array(data.preprocess.std) + np.array(data.preprocess.mean)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-6)  # Gray in all channels.
  with pytest.raises(DataError, match='dataset-fashion-mnist'):
    images.load(_cfg(kind='fashion_mnist', path='/nonexistent/fashion'))


def test_tfds_image_datasets_with_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    data = images.load(_cfg(kind='image_tfds', name='cifar10', image_size=32, crop_fraction=1.0))
    assert data.train['images'].shape == (12, 32, 32, 3) and len(data.class_names) == 10
    flowers = images.load(_cfg(kind='image_tfds', name='tf_flowers', image_size=24,
                               test_fraction=0.25))
    assert flowers.train['images'].shape[1:] == (27, 27, 3)  # Variable sizes: resized, stored.
    assert len(flowers.test['label']) == 3 and len(flowers.class_names) == 5
