"""bench.kernels.decode_knockout: each knockout removes exactly its part of OPT's decode forward
(no call into the op at all) and everything is restored afterwards."""
import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from bench.kernels.decode_knockout import PARTS, knocked_out, part_bytes
from hybrid.models import build_model, opt
from hybrid.weights import load_weights


def tiny():
    torch.manual_seed(0)
    hf = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                  vocab_size=61, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    inf = build_model(hf.config, torch.float32, "cpu")
    load_weights(inf, hf)
    return inf


def test_every_part_is_replaced_by_no_op_and_restored():
    inf = tiny()
    before = {n: getattr(opt, n) for n in ("linear", "paged_attention", "linear_add_norm", "mlp_add_norm")}
    logits_before = inf.compute_logits
    lay, x, res = inf.layers[0], torch.randn(3, 32), torch.randn(3, 32)
    with knocked_out(inf, set(PARTS)):
        qkv = opt.linear(x, lay.qkv_w, lay.qkv_b)
        assert qkv.shape == (3, 96) and not qkv.any()
        # other projections still compute
        torch.testing.assert_close(opt.linear(x, lay.fc1_w, lay.fc1_b), x @ lay.fc1_w.T + lay.fc1_b)
        q = torch.randn(3, 4, 8)
        assert opt.paged_attention(q, q, q, None, None, None, 0.1) is q
        assert opt.linear_add_norm(x, lay.o_w, lay.o_b, res, lay.ln2_w, lay.ln2_b, 1e-5) == (x, res)
        assert opt.mlp_add_norm(x, lay.fc1_w, lay.fc1_b, lay.fc2_w, lay.fc2_b, res, lay.ln1_w, lay.ln1_b,
                                1e-5) == (x, res)
        assert inf.compute_logits(x).shape == (3, 61)
    assert {n: getattr(opt, n) for n in before} == before
    assert inf.compute_logits == logits_before
    torch.testing.assert_close(inf.compute_logits(x), x @ inf.embed_tokens.T)


def test_restored_after_an_error_and_unknown_parts_rejected():
    inf = tiny()
    before = opt.mlp_add_norm
    with pytest.raises(RuntimeError), knocked_out(inf, {"mlp"}):
        assert opt.mlp_add_norm is not before
        raise RuntimeError("boom")
    assert opt.mlp_add_norm is before
    with pytest.raises(ValueError, match="lm"), knocked_out(inf, {"lm"}):
        pass


def test_part_bytes():
    inf = tiny()
    assert part_bytes(inf, "qkv", 4, 10) == 2 * 96 * 32 * 4
    assert part_bytes(inf, "attn", 4, 10) == 2 * 4 * 10 * 2 * 32 * 4
    assert part_bytes(inf, "mlp", 4, 10) == 2 * 2 * 64 * 32 * 4
    assert part_bytes(inf, "head", 4, 10) == 61 * 32 * 4


def test_mlp_forced_sets_and_restores_the_variant_and_flow_splits():
    from bench.kernels.decode_knockout import mlp_forced
    from hybrid.ops import linear as L
    from hybrid.ops import mlp as MLP

    shape = MLP.MlpShape(64, 256, True, "relu", "layer")
    MLP.clear_choices()
    L.set_enabled(True)
    try:
        MLP.set_choice(shape, torch.bfloat16, 16, "persistent_pdl")
        with mlp_forced("flow_pdl:4"):
            assert MLP.choice(16, shape, torch.bfloat16) == "flow_pdl" and MLP._flow_splits == 4
            assert MLP.choice(65, shape, torch.bfloat16) == "unfused"  # past the kernel's rows
        assert MLP.choice(16, shape, torch.bfloat16) == "persistent_pdl" and MLP._flow_splits == 0
        with mlp_forced("flow:0:3"):
            assert MLP._flow_splits == 0 and MLP._flow_prefetch == 3
        assert MLP._flow_prefetch == -1
        with pytest.raises(ValueError, match="unknown MLP variant"), mlp_forced("fast"):
            pass
        assert MLP._forced is None
        with pytest.raises(ValueError, match="0..16"):
            MLP.set_flow_splits(17)
    finally:
        MLP.clear_choices()


def test_mlpnorm_drops_only_the_block_end_kernel_and_is_restored():
    from hybrid.ops import linear_norm as LN
    from hybrid.ops import mlp as MLP

    inf = tiny()
    res, part = torch.randn(3, 32), torch.randn(2, 3, 32)
    real = MLP.LN
    with knocked_out(inf, {"mlpnorm"}):
        out, r = MLP.LN.splitk_add_norm(part, None, res, torch.ones(32), torch.zeros(32), 1e-5, torch.float32)
        assert r is res and out.shape == res.shape and not out.any()
        assert MLP.LN.NORMS == LN.NORMS  # everything else is linear_norm's
    assert MLP.LN is real
    assert part_bytes(inf, "mlpnorm", 4, 10) == 0


def test_norm_forced_runs_the_variant_in_every_linear_add_norm_and_restores():
    from bench.kernels.decode_knockout import norm_forced
    from hybrid.ops import linear_norm as LN

    seen = []
    real = LN.run_variant
    LN.run_variant = lambda v, *a: seen.append(v) or real(v, *a)
    try:
        x, w, b = torch.randn(4, 128), torch.randn(64, 128), torch.randn(64)
        res, nw, nb = torch.randn(4, 64), torch.randn(64), torch.randn(64)
        with norm_forced("skinny_norm_pdl"):
            got = LN.linear_add_norm(x, w, b, res, nw, nb, 1e-5)
        assert seen == ["skinny_norm_pdl"] and LN._forced is None
        want = LN.linear_add_norm(x, w, b, res, nw, nb, 1e-5)  # on the CPU the variant falls back
        assert seen[-1] == "unfused" and all(torch.equal(g, t) for g, t in zip(got, want))
        with pytest.raises(ValueError, match="unknown"), norm_forced("fast"):
            pass
        assert LN._forced is None
    finally:
        LN.run_variant = real


def test_onorm_keeps_out_proj_gemm_and_drops_its_norm():
    inf = tiny()
    lay, x, res = inf.layers[0], torch.randn(3, 32), torch.randn(3, 32)
    with knocked_out(inf, {"onorm"}):
        y, r = opt.linear_add_norm(x, lay.o_w, lay.o_b, res, lay.ln2_w, lay.ln2_b, 1e-5)
        torch.testing.assert_close(y, x @ lay.o_w.T + lay.o_b)  # the GEMM still runs
        assert r is res  # no add, no norm
    assert part_bytes(inf, "onorm", 4, 10) == 0


def test_cluster_size_and_one_shape_forcing_are_set_and_restored():
    from bench.kernels.decode_knockout import linear_forced, mlp_forced
    from hybrid.ops import linear as L
    from hybrid.ops import mlp as MLP

    with mlp_forced("cluster_pdl:16"):
        assert MLP._forced == "cluster_pdl" and MLP._cluster_size == 16 and MLP._flow_splits == 0
    assert MLP._forced is None and MLP._cluster_size == 0
    with linear_forced("splitk2@96"):
        assert L._forced == ("splitk2", 64, 96)
    assert L._forced is None
