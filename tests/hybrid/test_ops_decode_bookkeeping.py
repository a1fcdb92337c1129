"""Decode-step bookkeeping ops (Triton interpreter) against the torch reference, the reference
against the eager code it replaced, and a launch-count guard on one ModelRunner._decode_step."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes, _get_current_dispatch_mode

from hybrid import ops
from hybrid.config import CacheConfig, EngineConfig, SamplingParams
from hybrid.engine import HybridEngine
from hybrid.ops import reference
from hybrid.runner import DecodeRow, SamplingFlags

triton = pytest.importorskip("triton")
if not ops.triton_usable(torch.device("cpu")):
    pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported", allow_module_level=True)

from hybrid.ops.decode_state import decode_advance  # noqa: E402
from hybrid.ops.decode_metadata import decode_prepare  # noqa: E402
from hybrid.ops.eos_ban import ban_eos  # noqa: E402
from hybrid.ops.greedy import greedy_partials  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_ops_backend():
    before = ops.get_backend()
    yield
    ops.set_backend(before)


def _state(b, seed, max_blocks=6, block_size=4, num_blocks=50):
    """Packed [F, B] int64 rows like the runner's (B > b: the ops see column views of the first b)."""
    g = torch.Generator().manual_seed(seed)
    wide = b + 3
    ints = torch.zeros(6, wide, dtype=torch.int64)
    ints[0] = torch.randint(0, 30, (wide,), generator=g)  # ids
    ints[1] = torch.randint(0, max_blocks * block_size + 9, (wide,), generator=g)  # pos, some past the table
    ints[2] = torch.randint(-1, 4, (wide,), generator=g)  # rem: 0 / -1 inactive
    ints[3] = torch.randint(0, 5, (wide,), generator=g)  # gen
    ints[4] = torch.randint(0, 5, (wide,), generator=g)  # min_new
    ints[5] = torch.randint(0, 2, (wide,), generator=g)  # stop_on_eos
    bt = torch.randint(0, num_blocks, (wide, max_blocks), generator=g, dtype=torch.int32)
    return ints, bt


@pytest.mark.parametrize("b,block_size", [(1, 4), (7, 4), (37, 16)])
def test_decode_prepare_matches_reference(b, block_size):
    ints, bt = _state(b, seed=b, block_size=block_size)
    pos, rem = ints[1, :b], ints[2, :b]
    pos[0], rem[0] = 2 * block_size + 1, 2  # one known row
    want_slots, want_lens = reference.decode_prepare(pos, rem, bt[:b], block_size)
    slots, lens = decode_prepare(pos, rem, bt[:b], block_size)
    assert slots.dtype == torch.int64 and lens.dtype == torch.int32
    assert torch.equal(slots, want_slots) and torch.equal(lens, want_lens)
    assert slots[0] == bt[0, 2] * block_size + 1 and lens[0] == 2 * block_size + 2
    inactive = rem <= 0
    assert inactive.any() or b == 1
    assert (slots[inactive] == -1).all() and (lens[inactive] == 0).all()
    past = (pos // block_size >= bt.shape[1]) & ~inactive
    if past.any():  # block index clamped to the last table entry
        i = int(past.nonzero()[0])
        assert slots[i] == bt[i, -1] * block_size + pos[i] % block_size


def test_reference_decode_prepare_is_the_replaced_eager_code():
    b, bs = 9, 4
    ints, bt = _state(b, seed=3, block_size=bs)
    pos, rem, tables = ints[1, :b], ints[2, :b], bt[:b]
    active = rem > 0
    blk = tables.gather(1, (pos // bs).clamp(max=tables.shape[1] - 1)[:, None])[:, 0].long()
    slots, lens = reference.decode_prepare(pos, rem, tables, bs)
    assert torch.equal(slots, torch.where(active, blk * bs + pos % bs, -1))
    assert torch.equal(lens, torch.where(active, pos + 1, 0).to(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eos", [[3], [3, 90, 3, 0]])
def test_ban_eos_matches_reference_and_eager_loop(dtype, eos):
    b, vocab = 6, 97
    ints, _ = _state(b, seed=len(eos))
    gen, min_new = ints[3, :b], ints[4, :b]
    gen[:2], min_new[:2] = torch.tensor([0, 4]), torch.tensor([3, 4])  # one banned, one just allowed
    eos_ids = torch.tensor(eos, dtype=torch.int64)
    logits = torch.randn(b, vocab).to(dtype)
    loop = logits.clone()  # the eager code this op replaced
    ban = gen < min_new
    assert ban.any() and not ban.all()
    for e in eos:
        loop[:, e].masked_fill_(ban, float("-inf"))
    ref, got = logits.clone(), logits.clone()
    reference.ban_eos(ref, gen, min_new, eos_ids)
    ban_eos(got, gen, min_new, eos_ids)
    assert torch.equal(ref, loop) and torch.equal(got, loop)


def _advance_args(ints, out, step, eos_ids, nxt, b):
    return (nxt, ints[0, :b], ints[1, :b], ints[2, :b], ints[3, :b], ints[5, :b], out[:, :b], step,
            eos_ids)


@pytest.mark.parametrize("b,eos", [(1, [7]), (5, [7, 11]), (33, [7, 11, 0])])
def test_decode_advance_matches_reference_over_steps(b, eos):
    ints, _ = _state(b, seed=10 + b)
    ints[2, :b] = torch.arange(b) % 4 - 1  # rem -1, 0 (inactive), 1, 2
    ints[5, :b] = 1
    ints[5, 1::3] = 0  # some rows ignore EOS
    eos_ids = torch.tensor(eos, dtype=torch.int64)
    pad = 1
    ref = [ints.clone(), torch.full((6, b + 3), -5, dtype=torch.int64), torch.tensor([2])]
    got = [ints.clone(), torch.full((6, b + 3), -5, dtype=torch.int64), torch.tensor([2])]
    g = torch.Generator().manual_seed(b)
    for _ in range(3):
        nxt = torch.randint(0, 15, (b,), generator=g)
        nxt[::2] = 7  # EOS often
        reference.decode_advance(*_advance_args(*ref, eos_ids, nxt, b), pad)
        decode_advance(*_advance_args(*got, eos_ids, nxt, b), pad)
        for r, t in zip(ref, got):
            assert torch.equal(r, t)
    new_ints, out, step = got
    assert int(step) == 5
    assert (out[:2] == -5).all() and (out[:, b:] == -5).all(), "only rows step..step+2, cols < b written"
    assert (new_ints[:, b:] == ints[:, b:]).all(), "columns past b untouched"


def _tricky_logits(b, vocab, dtype, seed):
    """Random logits with exact ties (first occurrence must win), -inf, -0.0 / +0.0 maxima and
    all-negative rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, vocab, generator=g).to(dtype)
    x[0, 5] = x[0, vocab - 2] = x[0].max() + 1  # tie across chunks
    x[1 % b, :] = float("-inf")
    x[1 % b, vocab // 2] = -3.0
    if b > 2:
        x[2] = -x[2].abs() - 1  # every value negative
    if b > 3:
        x[3] = -1.0
        x[3, 7], x[3, 9] = -0.0, 0.0  # -0.0 == +0.0: the first (7) wins, as in torch.argmax
    if b > 4:
        x[4] = float("-inf")  # whole row -inf: index 0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,vocab,splits", [(1, 97, None), (5, 50272 // 16 + 3, None), (6, 3000, 1),
                                            (7, 2500, 3), (3, 40, 7)])
def test_greedy_partials_match_reference_and_argmax(dtype, b, vocab, splits):
    x = _tricky_logits(b, vocab, dtype, seed=b * vocab)
    want = x.float().argmax(-1)
    got = greedy_partials(x, splits)
    ref = reference.greedy_partials(x, got.shape[1])  # default splits differ by backend
    assert splits is None or got.shape[1] == splits
    assert got.dtype == torch.int64 and got.shape == ref.shape
    assert torch.equal(got, ref)
    assert torch.equal(reference.greedy_tokens(got), want)
    assert torch.equal(reference.greedy_tokens(ref), torch.argmax(x, -1))


def test_greedy_partials_strided_rows():
    x = _tricky_logits(4, 300, torch.float32, seed=1)
    wide = torch.full((4, 333), 99.0)
    wide[:, :300] = x  # a row stride past the vocabulary: the padding must not be read
    got = greedy_partials(wide[:, :300], 3)
    assert torch.equal(reference.greedy_tokens(got), x.argmax(-1))


@pytest.mark.parametrize("b", [1, 6, 33])
def test_decode_advance_from_greedy_keys(b):
    ints, _ = _state(b, seed=20 + b)
    ints[2, :b] = torch.arange(b) % 3  # rem 0 (inactive), 1, 2
    ints[5, :b] = 1
    eos_ids = torch.tensor([7, 11], dtype=torch.int64)
    logits = _tricky_logits(b, 50, torch.bfloat16, seed=b)
    logits[::2, 7] = 1e4  # EOS is the argmax in every other row
    keys = greedy_partials(logits, 3)
    tok = [ints.clone(), torch.full((4, b + 3), -5, dtype=torch.int64), torch.tensor([1])]
    key = [ints.clone(), torch.full((4, b + 3), -5, dtype=torch.int64), torch.tensor([1])]
    ref = [ints.clone(), torch.full((4, b + 3), -5, dtype=torch.int64), torch.tensor([1])]
    decode_advance(*_advance_args(*tok, eos_ids, logits.float().argmax(-1), b), 1)
    decode_advance(*_advance_args(*key, eos_ids, keys, b), 1)
    reference.decode_advance(*_advance_args(*ref, eos_ids, keys, b), 1)
    for t, k, r in zip(tok, key, ref):
        assert torch.equal(t, k) and torch.equal(t, r)
    assert (key[1][1, :b][ints[2, :b] > 0] == logits.float().argmax(-1)[ints[2, :b] > 0]).all()


def test_reference_decode_advance_is_the_replaced_eager_code():
    b, pad = 8, 1
    ints, _ = _state(b, seed=5)
    ints[5, :b] = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1])
    eos_ids = torch.tensor([7, 11])
    nxt = torch.tensor([7, 11, 7, 3, 7, 7, 2, 11])
    out, step = torch.zeros(4, b + 3, dtype=torch.int64), torch.tensor([1])
    want_ints, want_out, want_step = ints.clone(), out.clone(), step.clone()
    # the eager bookkeeping ModelRunner._decode_step ran before the fused op
    w = want_ints[:, :b]
    active = w[2] > 0
    tok = torch.where(active, nxt, pad)
    want_out[:, :b].index_copy_(0, want_step, tok[None])
    hit = (w[5] > 0) & (tok[:, None] == eos_ids[None, :]).any(-1)
    w[2].copy_(torch.where(hit, 0, (w[2] - 1).clamp(min=0)))
    w[0].copy_(tok)
    w[1].add_(active.long())
    w[3].add_(1)
    want_step.add_(1)
    reference.decode_advance(*_advance_args(ints, out, step, eos_ids, nxt, b), pad)
    assert torch.equal(ints, want_ints) and torch.equal(out, want_out) and torch.equal(step, want_step)


# ---- one runner decode step: launches outside the model, and equality with the reference ----

_FREE = {"aten::empty.memory_format", "aten::empty_strided", "aten::empty_like"}
"""Allocations: no kernel (and no allocation at all inside a replayed CUDA graph)."""


class _LaunchCounter(TorchDispatchMode):
    """Records each aten op that launches work (views and allocations do not), and each Triton
    kernel (the interpreter's own host copies are not counted: on a GPU they do not exist)."""

    def __init__(self):
        super().__init__()
        self.launches: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if not func.is_view and name not in _FREE and not name.startswith("aten::empty"):
            self.launches.append(name)
        return func(*args, **(kwargs or {}))


class _Uncounted:
    """The model's forward and logits run outside the counter: the guard is for the bookkeeping."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with _disable_current_modes():
            return self.model(*args, **kwargs)

    def compute_logits(self, hidden):
        with _disable_current_modes():
            return self.model.compute_logits(hidden)


@pytest.fixture
def count_triton_launches(monkeypatch):
    """Interpreted Triton launches made while a _LaunchCounter is the active dispatch mode (so not
    the model's own: _Uncounted turns the modes off) are recorded as one launch each."""
    from triton.runtime import interpreter

    inner = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        mode = _get_current_dispatch_mode()
        if isinstance(mode, _LaunchCounter):
            mode.launches.append("triton::" + self.fn.__name__)
        with _disable_current_modes():
            return inner(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", call)


def _runner_and_rows():
    from tests.hybrid.test_engine_cpu import tiny

    model = tiny("opt")
    cfg = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=64), max_num_seqs=8, max_model_len=64,
                       dtype="float32", backend="triton", device="cpu")
    eng = HybridEngine(cfg, eos_token_id=[3, 5])
    eng.load_weights(model)
    eng.generate(torch.tensor([[9, 10, 11]]), None, SamplingParams(max_new_tokens=2))  # allocates the pool
    rows = [
        DecodeRow(last_token=20, position=9, remaining=5, num_generated=0, min_new_tokens=4, temperature=0.0,
                  top_k=0, top_p=1.0, stop_on_eos=True, block_table=[7, 8, 9]),
        DecodeRow(last_token=21, position=3, remaining=1, num_generated=2, min_new_tokens=0, temperature=0.0,
                  top_k=0, top_p=1.0, stop_on_eos=False, block_table=[10]),
        DecodeRow(last_token=22, position=6, remaining=0, num_generated=6, min_new_tokens=0, temperature=0.0,
                  top_k=0, top_p=1.0, stop_on_eos=True, block_table=[11, 12]),  # finished row
    ]
    return eng.runner, rows


def _one_step(runner, rows, flags, b=4):
    runner._fill(rows, b)  # 3 rows + 1 padding row
    runner.model = _Uncounted(runner.model)
    try:
        with _LaunchCounter() as counter:
            runner._decode_step(b, flags)
    finally:
        runner.model = runner.model.model
    state = (runner.ints[:, :b].clone(), runner.out_tokens[:2, :b].clone(), runner.step_idx.clone())
    return counter.launches, state


@torch.inference_mode()
def test_decode_step_bookkeeping_is_a_few_launches(count_triton_launches, monkeypatch):
    runner, rows = _runner_and_rows()
    flags = SamplingFlags(all_greedy=True, filter_top_k_top_p=False, mask_eos=True)
    launches, fused = _one_step(runner, rows, flags)
    assert not any("local_scalar_dense" in n for n in launches), "a host sync in the decode step"
    assert sorted(n for n in launches if n.startswith("triton::")) == [
        "triton::_argmax_partials_kernel", "triton::_ban_eos_kernel", "triton::_decode_advance_kernel",
        "triton::_decode_prepare_kernel"]
    assert not any("argmax" in n for n in launches if not n.startswith("triton::")), launches
    assert len(launches) <= 6, launches
    # the same step with the pure-torch bookkeeping: the same state, and the guard above would catch
    # a return to it (it is about twenty launches)
    for op in ("decode_prepare", "ban_eos", "decode_advance", "greedy_partials"):
        monkeypatch.setitem(ops._impls, (op, "cpu"), getattr(reference, op))
    eager_launches, eager = _one_step(runner, rows, flags)
    assert len(eager_launches) > 12, eager_launches
    for got, want in zip(fused, eager):
        assert torch.equal(got, want)
    ints, out, step = fused
    assert int(step) == 1 and ints[2].tolist() == [4, 0, 0, 0] and ints[1].tolist() == [10, 4, 6, 0]
    assert out[0, 2:].tolist() == [runner.pad_token_id] * 2, "inactive rows emit pad"


def test_engine_eos_and_min_new_tokens_fused_equal_torch_bookkeeping(monkeypatch):
    """Whole generations (EOS stops, the min_new_tokens ban, padding rows, several chunks) with the
    fused ops and with their torch reference: token for token the same."""
    from tests.hybrid.test_engine_cpu import batch, tiny

    model = tiny("llama")
    ids, mask = batch(model, [8, 4, 6], seed=3)
    cfg = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=64), max_num_seqs=8, max_model_len=64,
                       dtype="float32", backend="triton", device="cpu", decode_steps_per_sync=4)
    free = HybridEngine(cfg)
    free.load_weights(model)
    free_run = free.generate(ids, mask, SamplingParams(max_new_tokens=12, ignore_eos=True))[:, ids.shape[1]:]
    row0 = free_run[0].tolist()
    # row 0's first token at step >= 4 not emitted before: with it as EOS the ban never changes
    # row 0's argmax, so row 0 stops there
    k = next(k for k in range(4, len(row0)) if row0[k] not in row0[:k])
    eos = row0[k]
    params = SamplingParams(max_new_tokens=12, min_new_tokens=4)
    outs = []
    for bookkeeping in ("fused", "torch"):
        if bookkeeping == "torch":
            real = ops._impl

            def impl(op, device, real=real):
                return getattr(reference, op) if op in ("decode_prepare", "ban_eos", "decode_advance") \
                    else real(op, device)

            monkeypatch.setattr(ops, "_impl", impl)
        eng = HybridEngine(cfg, eos_token_id=eos)
        eng.load_weights(model)
        outs.append(eng.generate(ids, mask, params)[:, ids.shape[1]:])
        assert eng.stats.num_decode_chunks > 1
    assert torch.equal(outs[0], outs[1])
    ans = outs[0][0].tolist()
    assert ans[:k + 1] == row0[:k + 1] and set(ans[k + 1:]) <= {model.config.pad_token_id}, "row 0 stops"
    assert not (outs[0][:, :4] == eos).any(), "min_new_tokens bans EOS for 4 tokens"
