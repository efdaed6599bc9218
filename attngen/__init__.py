"""attngen: specialised C/OpenMP flash-attention kernels for CPUs, generated from a spec."""
from ._version import __version__
from .api import attention, spec_for_call
from .errors import AttngenError, CacheError, CompileError, SpecError
from .kernel import Kernel, get_kernel
from .kvcache import KVCache, PagedKVCache
from .render import render
from .spec import AttentionSpec

__all__ = ["__version__", "attention", "spec_for_call", "AttngenError", "CacheError",
           "CompileError", "SpecError", "Kernel", "get_kernel", "KVCache", "PagedKVCache",
           "render", "AttentionSpec"]
