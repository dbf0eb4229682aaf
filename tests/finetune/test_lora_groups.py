"""lora_groups: sibling LoRA layers on one input (q/k/v, gate/up) as one autograd node, with the
numbers of the layers apart; a sibling called any other way runs alone."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.finetune.test_fused_lora import _loss_and_grads, _peft  # noqa: E402


def _nodes(t, name):
    """How many autograd nodes called `name` the graph behind `t` holds."""
    seen, todo, n = set(), [t.grad_fn], 0
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__ == name
        todo += [nf for nf, _ in f.next_functions]
    return n


def test_each_block_runs_its_siblings_as_two_nodes_with_peft_numbers(tiny):
    from toolkit.finetune import lora_groups
    from toolkit.finetune.fused_lora import fused_on_cpu

    model = _peft(tiny)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    layers = model.config.num_hidden_layers
    with fused_on_cpu(model, "cpu"):
        groups = {id(m.__dict__[lora_groups.GROUP]) for m in model.modules() if lora_groups.GROUP in m.__dict__}
        assert len(groups) == 2 * layers
        loss = model(input_ids=ids, labels=ids).loss
        assert _nodes(loss, "LoraGroupMatmulBackward") == 2 * layers
        assert _nodes(loss, "LoraMatmulBackward") == 2 * layers  # o_proj and down_proj, alone
        model.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        # every sibling took its output: nothing is held past the forward
        assert all(m.__dict__[lora_groups.GROUP].pending is None for m in model.modules()
                   if lora_groups.GROUP in m.__dict__)
    assert not any(lora_groups.GROUP in m.__dict__ for m in model.modules())
    torch.testing.assert_close(loss.detach(), loss_ref, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_sibling_called_on_another_or_a_changed_input_runs_alone(tiny):
    from toolkit.finetune.fused_lora import fused_on_cpu

    model = _peft(tiny)
    attn = model.base_model.model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    x1, x2 = (torch.randn(1, 5, model.config.hidden_size, generator=gen) for _ in range(2))
    with torch.no_grad():
        want = {"k1": attn.k_proj(x1), "k2": attn.k_proj(x2), "v1": attn.v_proj(x1 * 2)}
    with fused_on_cpu(model, "cpu"):
        assert _nodes(attn.q_proj(x1.requires_grad_()), "LoraGroupMatmulBackward") == 1
        k2 = attn.k_proj(x2)  # another input: its own node
        assert _nodes(k2, "LoraGroupMatmulBackward") == 0
        attn.q_proj(x1)
        k1 = attn.k_proj(x1)  # the same input: the output the group made
        assert _nodes(k1, "LoraGroupMatmulBackward") == 1
        with torch.no_grad():
            x1.mul_(2)  # changed in place after q's call: v must see the new values
        v1 = attn.v_proj(x1)
        assert _nodes(v1, "LoraGroupMatmulBackward") == 0
    for got, key in ((k1, "k1"), (k2, "k2"), (v1, "v1")):
        torch.testing.assert_close(got.detach(), want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_grad", [True, False], ids=["input gradient", "no input gradient"])
@pytest.mark.parametrize("ps", [(0.0, 0.0), (0.3, 0.0), (0.3, 0.5)], ids=["no dropout", "one dropout", "two dropouts"])
def test_group_gradients_against_autograd_of_the_same_formula(x_grad, ps, monkeypatch):
    """Each sibling's own dropout (as PEFT's separate layers draw): its dropped copy of x into its A."""
    from toolkit.finetune import lora_products
    from toolkit.finetune.lora_groups import _group_matmul

    gen = torch.Generator().manual_seed(5)
    bases = (torch.nn.Linear(6, 5).requires_grad_(False), torch.nn.Linear(6, 3, bias=False).requires_grad_(False))
    scalings, ranks = (0.5, 2.0), (3, 2)
    x = torch.randn(8, 6, generator=gen, requires_grad=x_grad)
    a = [torch.randn(r, 6, generator=gen, requires_grad=True) for r in ranks]
    b = [torch.randn(base.out_features, r, generator=gen, requires_grad=True) for base, r in zip(bases, ranks)]
    g = [torch.randn(8, base.out_features, generator=gen) for base in bases]
    wrt = ([x] if x_grad else []) + a + b

    drops = [torch.rand(8, 6, generator=gen) < p for p in ps]
    drawn = iter([d for d, p in zip(drops, ps) if p])
    monkeypatch.setattr(lora_products, "dropped", lambda shape, p, device: next(drawn))

    outs = _group_matmul().apply(x, bases, scalings, ps, *a, *b)
    got = (*outs, *torch.autograd.grad(outs, wrt, g))
    ref_outs = [base(x) + s * (x.masked_fill(d, 0) / (1 - p) @ ai.t()) @ bi.t()
                for base, s, ai, bi, d, p in zip(bases, scalings, a, b, drops, ps)]
    ref = (*ref_outs, *torch.autograd.grad(ref_outs, wrt, g))
    assert len(got) == len(ref)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v)
