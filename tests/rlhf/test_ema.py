"""EMA of the actor: closed-form check, swap in/out, state round trip, ZeRO-3 partitions."""
import torch
from torch import nn

from rlhf.ema import EMA


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_ema_matches_reference_recursion():
    model = _model()
    ema = EMA(model, decay=0.9)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        ema.update(model)
        for n, p in model.named_parameters():
            ref[n] = 0.9 * ref[n] + 0.1 * p.detach().double()
    assert ema.num_updates == 5
    for n, s in ema.shadow.items():
        torch.testing.assert_close(s.double(), ref[n], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(s, dict(model.named_parameters())[n].float())  # really averaged


def test_swapped_in_restores_exactly_and_state_round_trip():
    model = _model()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-2.0).add_(1.0)
    ema.update(model)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 5)
    with ema.swapped_in(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, ema.shadow[n])
        y_ema = model(x)
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])
    assert not torch.allclose(model(x), y_ema)
    other = EMA(_model(seed=3), decay=0.1)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates == 1
    for n in ema.shadow:
        assert torch.equal(other.shadow[n], ema.shadow[n])


def test_ema_under_zero3_tracks_partitions():
    """Under ZeRO-3 the shadow holds the local partition; swapping it in and gathering gives the
    EMA of the full (gathered) weights."""
    import deepspeed

    from rlhf import deepspeed_utils as dsu
    from rlhf.config import DeepSpeedConfig

    dsu.init_distributed()
    ds = DeepSpeedConfig(zero_stage=3, per_device_train_batch_size=2)
    cfg = dsu.get_train_ds_config(ds)
    model = _model(1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    ema = EMA(engine.module, decay=0.8)
    full = lambda: {n: v.double() for n, v in dsu.gather_state_dict(engine.module, 3).items()}  # noqa: E731
    ref = full()
    for _ in range(3):
        loss = engine(torch.randn(2, 5)).pow(2).sum()
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
        cur = full()
        ref = {n: 0.8 * ref[n] + 0.2 * cur[n] for n in ref}
    live = full()
    with ema.swapped_in(engine.module):
        got = full()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[n], live[n])
    assert all(torch.equal(full()[n], live[n]) for n in live)
