"""hybrid.ops.l2_prefetch on CPU: the models' prefetch_order() is exactly the order in which a
forward runs its GEMMs (so each prefetch targets the weight read next), the plan's argument checks,
and that prefetching is off by default and a no-op without a plan."""
import pytest
import torch

from hybrid.config import SamplingParams
from hybrid.ops import l2_prefetch as P
from hybrid.ops import linear as L
from hybrid.ops import linear_norm as LN


@pytest.fixture(autouse=True)
def _clean():
    P.set_plan(None)
    L.clear_choices()
    LN.clear_choices()
    yield
    P.set_plan(None)
    L.clear_choices()
    LN.clear_choices()


@pytest.mark.parametrize("family", ["opt", "opt-350m-style", "llama"])
@pytest.mark.parametrize("fused", [False, True])
def test_prefetch_order_is_the_forward_gemm_order(family, fused, monkeypatch):
    from tests.hybrid.test_engine_cpu import batch, engine, tiny

    model = tiny(family)
    eng = engine()
    eng.load_weights(model)
    if fused:  # the fused linear+norm path announces its GEMM itself
        for shape in eng.model.linear_norm_shapes():
            for m in eng.runner.buckets:
                LN.set_choice(shape, torch.float32, m, "splitk2")
    seen = []
    monkeypatch.setattr(P, "enabled", lambda: True)
    monkeypatch.setattr(P, "before_gemm", lambda w: seen.append(w.data_ptr()))
    ids, mask = batch(model, [3, 2])  # 2 rows: decode steps fall in a tuned bucket
    eng.generate(ids, mask, SamplingParams(max_new_tokens=3))
    order = [w.data_ptr() for w in eng.model.prefetch_order()]
    # every forward (prefill, then each decode step) runs the projections in prefetch_order,
    # then compute_logits reads the last entry (lm_head)
    assert len(seen) % len(order) == 0 and len(seen) >= 2 * len(order)
    for i in range(0, len(seen), len(order)):
        assert seen[i:i + len(order)] == order


def test_plan_checks():
    with pytest.raises(ValueError, match="mode"):
        P.set_plan([torch.zeros(4)], 1 << 20, "sideways")
    with pytest.raises(ValueError, match="CUDA"):
        P.set_plan([torch.zeros(4), torch.zeros(4)], 1 << 20, "side-bulk")
    P.set_plan([torch.zeros(4)], 0)  # cap 0: off, whatever the weights
    assert not P.enabled()
    P.before_gemm(torch.zeros(4))  # no plan: nothing happens
    P.join()


def test_engine_default_is_off():
    from hybrid.config import EngineConfig
    from tests.hybrid.test_engine_cpu import engine, tiny

    assert EngineConfig().l2_prefetch_mb == 0
    eng = engine(l2_prefetch_mb=8.0)  # asked for on a CPU engine: stays off
    eng.load_weights(tiny("opt"))
    assert not P.enabled()


def test_op_wrapper_checks_before_the_op():
    """Bad input raises in Python: an exception thrown inside the op crashed the device process."""
    from hybrid.ops import cuda_backend as cb

    with pytest.raises(ValueError, match="CUDA"):
        cb.l2_prefetch(torch.zeros(8), 0, 0)
