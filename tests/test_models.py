"""Model contracts: causality, padding invariance, identity at init, depth as a hyperparameter."""

import pytest
import torch

from lightning_rec.errors import ConfigError
from lightning_rec.models import NextItNet, SASRec, build_encoder

ARCHS = [
    ("nextitnet", dict(num_blocks=4, dropout=0.0)),
    ("sasrec", dict(num_blocks=2, num_heads=2, max_len=30, dropout=0.0, norm_first=True)),
    ("sasrec", dict(num_blocks=2, num_heads=1, max_len=30, dropout=0.0, norm_first=False)),
    ("sasrec", dict(num_blocks=2, num_heads=2, max_len=30, dropout=0.0, norm_first=True, attention_m=4)),  # attentive
    ("sasrec", dict(num_blocks=2, num_heads=2, max_len=30, dropout=0.0, layout="pmixer", positions="left")),
    ("sasrec", dict(num_blocks=2, num_heads=2, max_len=30, dropout=0.0, layout="pmixer", attention_m=2)),
]


def randomise_alphas(m):
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "alpha" in name:
                p.fill_(0.7)


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_causal_output_at_t_ignores_later_inputs(arch, kw):
    m = build_encoder(arch, 50, d_model=16, **kw).eval()
    randomise_alphas(m)
    x = torch.randint(1, 51, (4, 20))
    h = m(x)
    for t in (0, 5, 12, 18):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(1, 51, y[:, t + 1 :].shape)
        h2 = m(y)
        torch.testing.assert_close(h[:, : t + 1], h2[:, : t + 1], atol=1e-5, rtol=1e-5)
        if t + 1 < 20:
            assert not torch.allclose(h[:, t + 1 :], h2[:, t + 1 :])


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_gradient_of_position_t_is_zero_for_later_inputs(arch, kw):
    m = build_encoder(arch, 50, d_model=16, **kw).eval()
    randomise_alphas(m)
    x = torch.randint(1, 51, (1, 12))
    e = m.embed(x).detach().requires_grad_(True)
    m.embed = lambda items, e=e: e  # feed the embedding tensor directly
    (m(x)[0, 6] * torch.randn(16)).sum().backward()  # a random read-out: a LayerNorm output sums to a constant
    assert e.grad[0, 7:].abs().max() == 0
    assert e.grad[0, :7].abs().sum() > 0


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_left_padding_does_not_change_outputs(arch, kw):
    m = build_encoder(arch, 50, d_model=16, **kw).eval()
    randomise_alphas(m)
    x = torch.randint(1, 51, (3, 10))
    padded = torch.cat([torch.zeros(3, 7, dtype=torch.long), x], 1)
    torch.testing.assert_close(m(x), m(padded)[:, 7:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_zero_alphas_make_every_block_the_identity(arch, kw):
    m = build_encoder(arch, 50, d_model=16, residual_alpha=True, **kw).eval()
    x = torch.randint(1, 51, (2, 9))
    e = m.embed(x)
    out = m(x)
    if arch == "sasrec" and kw.get("layout") == "pmixer":
        # q = LN(x) is the residual, then LN again; the final LN closes
        out_expected = e
        for b in m.blocks:
            out_expected = b.ln_ffn(b.ln_att(out_expected))
        out_expected = m.final_ln(out_expected)
    elif arch == "sasrec" and kw["norm_first"]:
        out_expected = m.final_ln(e)
    elif arch == "sasrec":
        # post-LN blocks normalise the (unchanged) residual stream
        out_expected = e
        for b in m.blocks:
            out_expected = b.ln_ffn(b.ln_att(out_expected))
    else:
        out_expected = e
    torch.testing.assert_close(out, out_expected, atol=1e-5, rtol=1e-5)


def test_alpha_switch_off_gives_original_models():
    n = NextItNet(20, d_model=8, num_blocks=2, residual_alpha=False)
    s = SASRec(20, d_model=8, num_blocks=2, residual_alpha=False, max_len=10)
    assert not [k for k, _ in n.named_parameters() if "alpha" in k]
    assert not [k for k, _ in s.named_parameters() if "alpha" in k]
    x = torch.randint(1, 21, (2, 6))
    assert not torch.allclose(n.eval()(x), n.embed(x))


def test_interface_and_dilation_pattern():
    n = NextItNet(20, d_model=8, num_blocks=6, dilations=[1, 4])
    assert isinstance(n.blocks, torch.nn.ModuleList) and len(n.blocks) == 6
    assert [(b.conv1.dilation[0], b.conv2.dilation[0]) for b in n.blocks] == [(1, 2), (4, 8)] * 3
    s = SASRec(20, d_model=8, num_blocks=5, max_len=10)
    assert len(s.blocks) == 5 and s(torch.randint(1, 21, (2, 10))).shape == (2, 10, 8)
    with pytest.raises(ConfigError):
        build_encoder("gru4rec", 10)


@pytest.mark.parametrize("layout", ["pre", "post", "pmixer"])
def test_sasrec_last_only_inference_equals_full_forward(layout):
    m = SASRec(30, d_model=16, num_blocks=3, num_heads=2, max_len=12, dropout=0.0, layout=layout, positions="left").eval()
    randomise_alphas(m)
    x = torch.randint(1, 31, (5, 12))
    x[:2, :4] = 0  # left padding
    torch.testing.assert_close(m(x, last_only=True)[:, -1], m(x)[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["pre", "pmixer"])
def test_attentive_encoder_expands_each_attention_weight_and_averages(layout):
    """attention_m=m, the seed's form, by hand: each head's attention weight vector a [b, 1, r] becomes
    [b*r, 1] x w [1, m] -> [b, m, r], averaged over m, then weighs the values."""
    from lightning_rec.models.sasrec import SASRecBlock

    torch.manual_seed(0)
    d, h, m, T, B = 8, 2, 4, 6, 3
    blk = SASRecBlock(d, h, 8, 0.0, True, False, attention_m=m, layout=layout).eval()
    assert blk.qkv.out_features == 3 * d and blk.expand.shape == (1, m)
    torch.testing.assert_close(blk.expand.detach(), torch.ones(1, m))  # at initialisation: plain attention
    with torch.no_grad():
        blk.expand.copy_(torch.tensor([[0.3, 1.7, -0.4, 2.2]]))  # mean 0.95
    x, query = torch.randn(B, T, d), torch.randn(B, T, d)
    causal = torch.zeros(T, T).masked_fill_(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))[None, None]
    for q_in in (None, query):
        got = blk.attend(x, causal, query=q_in)
        W, b = blk.qkv.weight, blk.qkv.bias
        Q = (x if q_in is None else q_in) @ W[:d].T + b[:d]
        K, V = x @ W[d:2 * d].T + b[d:2 * d], x @ W[2 * d:].T + b[2 * d:]
        dh, heads = d // h, []
        for i in range(h):
            s = slice(i * dh, (i + 1) * dh)
            a = torch.softmax(Q[..., s] @ K[..., s].transpose(1, 2) / dh**0.5 + causal[0], -1)  # (B, T, r)
            rows = a.reshape(B * T, 1, T)  # [b, 1, r]: one weight vector per query
            expanded = (rows.reshape(-1, 1) @ blk.expand).reshape(B * T, T, m).transpose(1, 2)  # [b, m, r]
            heads.append(expanded.mean(1).reshape(B, T, T) @ V[..., s])
        want = blk.out(torch.cat(heads, -1))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert SASRecBlock(d, h, 8, 0.0, True, False).expand is None  # m = 1: plain SASRec, no extra parameter


def test_pmixer_block_against_a_hand_computation():
    """layout=pmixer: q = LN1(x); x = q + a1 * attn(q, x, x); x = LN2(x); x = x + a2 * ffn(x)."""
    from lightning_rec.models.sasrec import SASRecBlock

    torch.manual_seed(0)
    d, h, T = 8, 2, 5
    blk = SASRecBlock(d, h, 8, 0.0, True, True, layout="pmixer").eval()
    with torch.no_grad():
        blk.alpha_att.fill_(0.6)
        blk.alpha_ffn.fill_(0.3)
    x = torch.randn(2, T, d)
    causal = torch.zeros(T, T).masked_fill_(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))[None, None]
    q = blk.ln_att(x)
    W, b = blk.qkv.weight, blk.qkv.bias
    Q, K, V = q @ W[:d].T + b[:d], x @ W[d:2 * d].T + b[d:2 * d], x @ W[2 * d:].T + b[2 * d:]
    dh = d // h
    heads = [torch.softmax(Q[..., i * dh:(i + 1) * dh] @ K[..., i * dh:(i + 1) * dh].transpose(1, 2) / dh**0.5 + causal[0], -1)
             @ V[..., i * dh:(i + 1) * dh] for i in range(h)]
    y = q + 0.6 * blk.out(torch.cat(heads, -1))
    y = blk.ln_ffn(y)
    want = y + 0.3 * blk.ffn(y)
    torch.testing.assert_close(blk(x, causal), want, atol=1e-5, rtol=1e-5)


def test_left_positions_count_from_the_oldest_item():
    torch.manual_seed(0)
    m = SASRec(30, d_model=8, num_blocks=0, max_len=10, dropout=0.0, positions="left").eval()
    r = SASRec(30, d_model=8, num_blocks=0, max_len=10, dropout=0.0, positions="right").eval()
    r.load_state_dict(m.state_dict())
    x = torch.tensor([[0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
    items = m.item_embedding(x) * 8**0.5
    pe = m.position_embedding.weight
    want_left = torch.stack([torch.cat([pe[:1].expand(3, 8), pe[:3]]), pe[:6]])  # padding rows read position 0
    torch.testing.assert_close(m.embed(x), items + want_left)
    torch.testing.assert_close(r.embed(x), items + pe[4:10][None])  # right: the newest item is at max_len - 1
    with pytest.raises(ConfigError, match="model.positions"):
        SASRec(30, positions="middle")
    with pytest.raises(ConfigError, match="model.layout"):
        SASRec(30, layout="sandwich")


@pytest.mark.parametrize("attn_out_dropout", [True, False])
def test_attention_output_dropout_switch(attn_out_dropout):
    """attn_out_dropout=False drops attention weights only (SASRec): no single output coordinate is zeroed."""
    from lightning_rec.models.sasrec import SASRecBlock

    torch.manual_seed(0)
    blk = SASRecBlock(16, 2, 16, 0.5, True, False, layout="pmixer", attn_out_dropout=attn_out_dropout).train()
    T = 12
    mask = torch.zeros(1, 1, T, T).masked_fill_(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = blk.attend(torch.randn(64, T, 16), mask)  # (B, T, d): the branch before the residual
    zero = y == 0
    partial = zero & ~zero.all(-1, keepdim=True)  # zeros in rows that are not entirely zero
    frac = partial.float().mean().item()
    if attn_out_dropout:
        assert 0.35 < frac < 0.65  # about half the coordinates, as Dropout(0.5) on the output does
    else:
        assert frac == 0.0


def test_init_std_reinitialises_every_weight():
    torch.manual_seed(0)
    for arch, kw in [("sasrec", dict(num_blocks=2, d_model=64, max_len=50)), ("nextitnet", dict(num_blocks=2, d_model=64))]:
        m = build_encoder(arch, 3000, init_std=0.02, **kw)
        for name, p in m.named_parameters():
            if "alpha" in name:
                assert float(p.abs().max()) == 0.0, name  # zero-initialised residual weights stay 0
            elif name.endswith("bias"):
                assert float(p.abs().max()) == 0.0, name
            elif p.dim() >= 2:
                w = (p[1:] if name.startswith("item_embedding") else p).detach()
                assert abs(float(w.std()) - 0.02) < 0.003, (name, float(w.std()))
            else:  # LayerNorm weights
                assert torch.equal(p, torch.ones_like(p)), name
        assert float(m.item_embedding.weight[0].abs().max()) == 0.0  # padding row
    default = build_encoder("sasrec", 3000, d_model=64, max_len=50)
    assert abs(float(default.item_embedding.weight[1:].std()) - 64**-0.5) < 0.01
    for bad in (-1.0, 0, "0.02", True):
        with pytest.raises(ConfigError, match="model.init_std"):
            build_encoder("sasrec", 10, init_std=bad)


def test_init_std_covers_the_untied_output_table():
    from lightning_rec import SeqRecModule

    torch.manual_seed(0)
    m = SeqRecModule(num_items=3000, d_model=64, tied_embeddings=False, init_std=0.02)
    w = m.output.weight.detach()
    assert abs(float(w[1:].std()) - 0.02) < 0.003 and float(w[0].abs().max()) == 0.0
    default = SeqRecModule(num_items=3000, d_model=64, tied_embeddings=False)
    assert abs(float(default.output.weight.detach().std()) - 64**-0.5) < 0.01
