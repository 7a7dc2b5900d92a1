"""`hf:org/name[@revision]` sources: fetched with huggingface_hub into its cache.

Offline (no network, or HF_HUB_OFFLINE=1) the cache is used; a model that is in neither gives an
error that says the hub is unreachable and where the cache is.
"""
import pathlib

from jaxtl.errors import WeightsError

# Config, weights and tokenizer files; never the TF/Flax/ONNX copies a repo may also hold.
_PATTERNS = ['*.json', '*.safetensors', '*.txt', '*.model']


def download(spec: str) -> pathlib.Path:
  """A local snapshot directory for `org/name[@revision]`."""
  import huggingface_hub
  from huggingface_hub.utils import HfHubHTTPError
  repo_id, _, revision = spec.partition('@')
  revision = revision or None

  def fetch(**kw):
    path = pathlib.Path(huggingface_hub.snapshot_download(
        repo_id, revision=revision, allow_patterns=_PATTERNS, **kw))
    if not any(path.glob('*.safetensors')):  # Older repos ship only pytorch_model.bin.
      path = pathlib.Path(huggingface_hub.snapshot_download(
          repo_id, revision=revision, allow_patterns=_PATTERNS + ['pytorch_model*.bin'], **kw))
    return path

  try:
    return fetch()
  except huggingface_hub.errors.RepositoryNotFoundError:
    raise WeightsError(f'hf:{spec}: no such repository on the Hugging Face Hub') from None
  except (huggingface_hub.errors.LocalEntryNotFoundError, HfHubHTTPError, OSError) as first:
    try:  # Network gone or refused: the cache may still have it.
      return fetch(local_files_only=True)
    except Exception:
      raise WeightsError(
          f'hf:{spec}: the Hugging Face Hub is unreachable and the model is not in the local '
          f'cache ({huggingface_hub.constants.HF_HUB_CACHE}); download it once with a network, '
          f'or pass a local directory ({type(first).__name__}: {first})') from None
