"""hybrid.ops backend dispatch: selection rules, and every op through the dispatcher (auto = the
Triton interpreter here; torch = the reference) agreeing with the reference."""
import pytest
import torch

import hybrid.ops as ops
from hybrid.ops import reference
from hybrid.ops.testing import random_block_tables, random_kv_cache


@pytest.fixture(autouse=True)
def _restore_backend():
    before = ops.get_backend()
    yield
    ops.set_backend(before)
    ops.set_auto_cuda_ops("all")


def test_backend_selection_rules(monkeypatch):
    cpu = torch.device("cpu")
    ops.set_backend("auto")
    assert ops.resolve_backend("paged_decode_attention", cpu) == "triton"  # interpreter is on
    monkeypatch.delenv("TRITON_INTERPRET")
    assert ops.resolve_backend("add_rmsnorm", cpu) == "torch"  # no interpreter: reference
    ops.set_backend("triton")
    with pytest.raises(RuntimeError, match="needs Triton"):
        ops.resolve_backend("add_rmsnorm", cpu)
    ops.set_backend("cuda")
    with pytest.raises(RuntimeError, match="CUDA extension"):
        ops.resolve_backend("write_kv_cache", cpu)
    ops.set_backend("torch")
    assert ops.resolve_backend("paged_decode_attention", cpu) == "torch"
    with pytest.raises(ValueError):
        ops.set_backend("tensorrt")
    with pytest.raises(ValueError):
        ops.set_auto_cuda_ops(["relu"])  # csrc/ has no relu


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_every_op_through_dispatch(backend):
    ops.set_backend(backend)
    torch.manual_seed(0)
    kc, vc = random_kv_cache(64, 16, 2, 64, torch.float32)
    k_new, v_new = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    slots = torch.tensor([5, -1, 40], dtype=torch.int64)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    reference.write_kv_cache(k_new, v_new, ref_kc, ref_vc, slots)
    ops.write_kv_cache(k_new, v_new, kc, vc, slots)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)

    q = torch.randn(2, 8, 64)
    bt = random_block_tables([20, 33], 16, 64, 3)
    sl = torch.tensor([20, 33], dtype=torch.int32)
    torch.testing.assert_close(ops.paged_decode_attention(q, kc, vc, bt, sl, 0.125),
                               reference.paged_decode_attention(q, kc, vc, bt, sl, 0.125))

    qp, kp, vp = torch.randn(9, 4, 64), torch.randn(9, 2, 64), torch.randn(9, 2, 64)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    torch.testing.assert_close(ops.prefill_attention(qp, kp, vp, cu, 5, 0.125),
                               reference.prefill_attention(qp, kp, vp, cu, 5, 0.125))

    x, r, w, b = torch.randn(3, 96), torch.randn(3, 96), torch.randn(96), torch.randn(96)
    for got, want in [(ops.add_layernorm(x, r, w, b, 1e-5), reference.add_layernorm(x, r, w, b, 1e-5)),
                      (ops.add_rmsnorm(x, r, w, 1e-6), reference.add_rmsnorm(x, r, w, 1e-6))]:
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1])

    pos = torch.tensor([3, 0, 7])
    cache = torch.randn(8, 64)
    q1, k1 = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    q2, k2 = q1.clone(), k1.clone()
    ops.rotary_embedding(pos, q1, k1, cache)
    reference.rotary_embedding(pos, q2, k2, cache)
    torch.testing.assert_close(q1, q2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)

    h = torch.randn(3, 2 * 96)
    torch.testing.assert_close(ops.relu(h), torch.relu(h))
    torch.testing.assert_close(ops.silu_and_mul(h), reference.silu_and_mul(h))


def test_pick_decode_backends_without_cuda_keeps_triton():
    winners = ops.pick_decode_backends(4, 2, 64, 16, 2, 32, torch.float32, "cpu")
    assert winners == {"paged_decode_attention": "triton", "write_kv_cache": "triton",
                       "paged_decode_attention_append": "triton"}
    ops.set_backend("auto")
    assert ops.resolve_backend("paged_decode_attention", torch.device("cpu")) == "triton"


def test_auto_cuda_per_batch_rows_table():
    """set_auto_cuda_ops(..., rows=...): each batch takes the smallest bucket >= its rows (the largest
    past the end); ops without a table run on CUDA at every batch; bad tables raise."""
    ops.set_auto_cuda_ops(["paged_decode_attention", "write_kv_cache"],
                          rows={"paged_decode_attention": {16: True, 24: False, 32: True}})
    assert [ops.auto_cuda_for("paged_decode_attention", r) for r in (1, 16, 17, 24, 25, 32, 64)] == \
        [True, True, False, False, True, True, True]
    assert ops.auto_cuda_for("write_kv_cache", 5)  # no table: CUDA everywhere
    assert not ops.auto_cuda_for("paged_decode_attention_append", 5)  # not in the set
    ops.set_auto_cuda_ops("all")  # a plain call drops the per-batch tables
    assert ops.auto_cuda_for("paged_decode_attention", 24)
    with pytest.raises(ValueError):
        ops.set_auto_cuda_ops("all", rows={"relu": {1: True}})
    with pytest.raises(ValueError):
        ops.set_auto_cuda_ops("all", rows={"write_kv_cache": {0: True}})


def test_pick_decode_backends_per_batch_without_cuda():
    from hybrid.ops.autoselect import pick_decode_backends_per_batch

    per = pick_decode_backends_per_batch(4, 2, 64, 16, [8, 2, 4], 32, torch.float32, "cpu")
    assert per == {op: {2: "triton", 4: "triton", 8: "triton"} for op in ops.CUDA_OPS}
    with pytest.raises(ValueError):
        pick_decode_backends_per_batch(4, 2, 64, 16, [0], 32, torch.float32, "cpu")


def test_pick_per_batch_skips_a_bucket_that_runs_out_of_memory(monkeypatch):
    """A bucket whose test cache does not fit is skipped (its rows take the nearest measured
    bucket's pick); if none fits, the pick fails loudly instead of choosing blind."""
    from hybrid.ops import autoselect

    monkeypatch.setattr(ops, "cuda_ext_available", lambda: True)

    def timed(_ops, nh, nkv, hs, bs, batch, ctx, dtype, device):
        if batch == 64:
            raise torch.cuda.OutOfMemoryError("test cache too large")
        won = "triton" if batch == 24 else "cuda"
        return ({op: won for op in ops.CUDA_OPS}, {op: {"triton": 1.0, "cuda": 2.0} for op in ops.CUDA_OPS})

    monkeypatch.setattr(autoselect, "_time_backends", timed)
    per = autoselect.pick_decode_backends_per_batch(32, 32, 64, 16, [16, 24, 32, 64], 416, torch.bfloat16,
                                                    torch.device("cuda"))
    assert per["paged_decode_attention"] == {16: "cuda", 24: "triton", 32: "cuda"}
    assert ops.auto_cuda_for("paged_decode_attention", 24) is False
    assert ops.auto_cuda_for("paged_decode_attention", 64) is True  # past the end: the largest measured
    with pytest.raises(RuntimeError, match="could be measured"):
        autoselect.pick_decode_backends_per_batch(32, 32, 64, 16, [64], 416, torch.bfloat16, torch.device("cuda"))
