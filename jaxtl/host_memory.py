"""The host's C heap: handing back what XLA's compiler freed (glibc's malloc_trim)."""
import ctypes


def release_freed_host_memory():
  """Hands the heap that glibc keeps after frees back to the OS (malloc_trim). XLA's compiler
  allocates and frees hundreds of MB of small blocks; glibc would keep them mapped for the life
  of the process, so the step's buffers come on top: returning them after the step compiles
  takes 170-380 MiB off the resident memory of BERT-base's, ViT-B/16's and ResNet-50's full
  fine-tune on the CPU (benchmarks/README.md). Nothing happens where the C library is not glibc."""
  trim = glibc_function('malloc_trim')
  if trim is not None:
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def glibc_function(name):
  """The C library's function `name`, or None where it has none (not glibc: macOS, musl)."""
  return getattr(ctypes.CDLL(None), name, None)
