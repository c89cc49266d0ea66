"""Triton kernels for the hot paths of chunk-KV reuse, each beside a plain-torch reference.

Installed as ``ctxcache.kernels``. Importing this package never requires Triton: the torch
references are always available and are the fallback on CPU.
"""
