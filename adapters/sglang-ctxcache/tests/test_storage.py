"""The backend against SGLang's own interface (``HiCacheStorage``, ``PoolTransfer``, the
dynamic backend factory — imported from the sglang package) with real page bytes: pages
round-trip through memory, disk and Redis tiers, survive a restart, are shared between two
SGLang workers through Redis, and stay apart per model / TP rank.

SGLang's host KV pool cannot be imported without its GPU/vision stack, so ``HostPool`` below
reproduces its three page methods for the ``layer_first`` MHA layout (buffer
``[2, layers, tokens, heads, dim]``, a page = ``page_size`` consecutive token slots, flattened)
— the only part of the pool a storage backend touches."""

import os
import uuid

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage, HiCacheStorageConfig, PoolHitPolicy, PoolName, PoolTransfer,
)
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from sglang_ctxcache import CtxCacheHiCacheStorage

REDIS = os.environ.get("CTXCACHE_TEST_REDIS", "redis://127.0.0.1:6379/0")
# Qwen2.5-0.5B's KV shape: 24 layers, 2 KV heads of 64, bf16; SGLang's default page of 64
LAYERS, HEADS, DIM, PAGE = 24, 2, 64, 64


def config(model="Qwen/Qwen2.5-0.5B", tp_rank=0, tp_size=1, **extra) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
        attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
        is_page_first_layout=False, model_name=model, extra_config=extra)


class HostPool:
    """SGLang's MHA host pool page methods, layer_first layout (see the module docstring)."""

    page_size = PAGE

    def __init__(self, pages: int):
        self.kv_buffer = torch.zeros(2, LAYERS, pages * PAGE, HEADS, DIM, dtype=torch.bfloat16)

    def get_data_page(self, index, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[:, :, index:index + PAGE]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(2 * LAYERS * PAGE * HEADS * DIM, dtype=torch.bfloat16)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self.kv_buffer[:, :, index:index + PAGE] = data_page.reshape(2, LAYERS, PAGE, HEADS,
                                                                     DIM)


def host_pool(pages: int) -> HostPool:
    return HostPool(pages)


def page_keys(n: int) -> list[str]:
    return [uuid.uuid4().hex + uuid.uuid4().hex for _ in range(n)]  # SGLang: sha256 hex


@pytest.fixture
def backend(tmp_path):
    b = CtxCacheHiCacheStorage(config(data_dir=str(tmp_path), disk_bytes=1 << 30,
                                      cpu_bytes=8 << 20))
    yield b
    b.clear()


def test_is_a_hicache_storage_loaded_by_module_path(tmp_path):
    b = StorageBackendFactory.create_backend(
        "dynamic", config(backend_name="ctxcache", module_path="sglang_ctxcache.storage",
                          class_name="CtxCacheHiCacheStorage", data_dir=str(tmp_path)), None)
    assert isinstance(b, HiCacheStorage) and isinstance(b, CtxCacheHiCacheStorage)
    assert [t["name"] for t in b.get_stats()["tiers"]] == ["cpu", "disk"]


def test_zero_copy_pages_round_trip_and_survive_restart(backend, tmp_path):
    src = host_pool(4)
    src.kv_buffer.normal_()
    backend.register_mem_pool_host(src)
    keys = page_keys(3)
    idx = torch.arange(0, 3 * PAGE)
    assert backend.batch_set_v1(keys, idx) == [True, True, True]
    assert backend.batch_exists(keys + page_keys(1)) == 3
    # a fresh process: new backend over the same disk tier, empty host pool
    again = CtxCacheHiCacheStorage(config(data_dir=str(tmp_path), disk_bytes=1 << 30))
    dst = host_pool(4)
    again.register_mem_pool_host(dst)
    into = torch.arange(PAGE, 4 * PAGE)  # other host slots than they were written from
    assert again.batch_get_v1(keys, into) == [True, True, True]
    assert torch.equal(dst.kv_buffer[:, :, PAGE:], src.kv_buffer[:, :, :3 * PAGE])
    assert again.batch_get_v1(page_keys(1), torch.arange(PAGE)) == [False]
    assert again.batch_get_v1(keys, torch.arange(5)) == [False] * 3  # wrong slot count


def test_tensor_api_and_isolation(backend):
    page = torch.randn(2 * LAYERS * PAGE * HEADS * DIM).to(torch.bfloat16)
    (key,) = page_keys(1)
    assert backend.set(key, page) and backend.exists(key)
    assert backend.set(key, page)  # idempotent
    assert torch.equal(backend.get(key), page)
    target = torch.empty_like(page)
    assert backend.get(key, target) is target and torch.equal(target, page)
    assert backend.get(key, torch.empty(7, dtype=torch.bfloat16)) is None  # wrong size
    assert backend.batch_get([key, page_keys(1)[0]])[1] is None
    other_rank = CtxCacheHiCacheStorage(config(tp_rank=1, tp_size=2),
                                        store=backend.store)
    other_model = CtxCacheHiCacheStorage(config(model="other/model"), store=backend.store)
    assert not other_rank.exists(key) and not other_model.exists(key)


def test_v2_pools_and_hit_policies(backend):
    kv, extra = host_pool(4), host_pool(4)
    kv.kv_buffer.normal_()
    extra.kv_buffer.normal_()
    backend.register_mem_host_pool_v2(kv, PoolName.KV)
    backend.register_mem_host_pool_v2(extra, PoolName.SWA)
    keys = page_keys(4)
    idx = torch.arange(0, 4 * PAGE)
    res = backend.batch_set_v2([PoolTransfer(PoolName.KV, host_indices=idx, keys=keys),
                                PoolTransfer(PoolName.SWA, host_indices=idx[-PAGE:],
                                             keys=keys[-1:])])
    assert res == {"kv": [True] * 4, "swa": [True]}
    trailing = backend.batch_exists_v2(keys, [PoolTransfer(
        PoolName.SWA, keys=keys[-1:], hit_policy=PoolHitPolicy.TRAILING_PAGES)])
    assert trailing.kv_hit_pages == 4
    every = backend.batch_exists_v2(keys, [PoolTransfer(
        PoolName.SWA, keys=keys, hit_policy=PoolHitPolicy.ALL_PAGES)])
    assert every.kv_hit_pages == 0  # SWA pages 0..2 were never written
    out_kv, out_swa = host_pool(4), host_pool(4)
    backend.register_mem_host_pool_v2(out_kv, PoolName.KV)
    backend.register_mem_host_pool_v2(out_swa, PoolName.SWA)
    got = backend.batch_get_v2([PoolTransfer(PoolName.KV, host_indices=idx, keys=keys),
                                PoolTransfer(PoolName.SWA, host_indices=idx[:PAGE],
                                             keys=keys[-1:])])
    assert got == {"kv": [True] * 4, "swa": [True]}
    assert torch.equal(out_kv.kv_buffer, kv.kv_buffer)
    assert torch.equal(out_swa.kv_buffer[:, :, :PAGE], extra.kv_buffer[:, :, -PAGE:])


def test_two_workers_share_pages_through_redis(tmp_path):
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url(REDIS).ping()
    except Exception:
        pytest.skip("no Redis server")
    ns = "sglang-test-" + uuid.uuid4().hex[:8]
    a = CtxCacheHiCacheStorage(config(redis_url=REDIS, namespace=ns, disk_bytes=0,
                                      data_dir=str(tmp_path / "a")))
    b = CtxCacheHiCacheStorage(config(redis_url=REDIS, namespace=ns, disk_bytes=0,
                                      data_dir=str(tmp_path / "b")))
    try:
        page = torch.randn(2 * LAYERS * PAGE * HEADS * DIM).to(torch.bfloat16)
        (key,) = page_keys(1)
        assert a.set(key, page)
        assert b.exists(key) and torch.equal(b.get(key), page)
    finally:
        a.clear()
        b.clear()
