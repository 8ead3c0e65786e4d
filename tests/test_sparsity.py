import torch

from layershare.compression.sparsity import GroupPruner
from layershare.modules.shared_basis import SharedBasis, SharedBasisLinear


def _layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = SharedBasis(torch.randn(16, 8, generator=g))
    return [SharedBasisLinear(basis, torch.randn(8, h, generator=g), "in", None) for h in (20, 30)]


def test_gradual_schedule_is_cubic_monotone_and_ends_exact():
    layers = _layers()
    total = sum(l.V.numel() for l in layers)
    pr = GroupPruner(layers, n_final=100, schedule="gradual", steps=100, every=10, end=0.5)
    targets = [pr.target(t) for t in range(0, 101)]
    assert targets[0] == total and targets[50] == 100 and targets[-1] == 100
    assert all(a >= b for a, b in zip(targets, targets[1:]))
    # cubic: after a quarter of the ramp more than half of the pruning is done
    assert targets[12] - 100 < 0.5 * (total - 100)
    kept = []
    for t in range(0, 101):
        pr.step(t)
        kept.append(int(sum(l.mask.sum() for l in layers)) if layers[0].mask is not None else total)
    assert kept[-1] == 100
    pr.finish()
    assert sum(int(torch.count_nonzero(l.masked_V())) for l in layers) == 100


def test_global_magnitude_and_no_regrowth():
    layers = _layers()
    pr = GroupPruner(layers, n_final=50, schedule="static", steps=0)
    allv = torch.cat([l.V.detach().abs().flatten() for l in layers])
    threshold = allv.topk(50).values.min()
    pr.step(0)
    for l in layers:
        kept = l.V.detach().abs()[l.mask.bool()]
        assert (kept >= threshold).all()
    # entries pruned once stay pruned even if they grow back in V
    before = [l.mask.clone() for l in layers]
    with torch.no_grad():
        for l in layers:
            l.V.add_(100.0)
    pr.prune_to(50)
    for l, m in zip(layers, before):
        assert (l.mask <= m).all()


def test_pack_round_trip_keeps_product():
    layers = _layers()
    GroupPruner(layers, n_final=60, schedule="static", steps=0).finish()
    x = torch.randn(5, 16)
    outs = [l(x) for l in layers]
    for l in layers:
        l.pack()
    for l, o in zip(layers, outs):
        torch.testing.assert_close(l(x), o, atol=1e-5, rtol=1e-5)
    assert sum(l.nnz() for l in layers) == 60


def test_activation_score_of_a_down_entry_is_the_output_change_it_causes():
    """For a down projection (y = U V h) zeroing V[k, j] moves the output by U[:, k] V[k, j] h_j:
    the score times |V[k, j]| must be that change's RMS over the data the statistics came from."""
    from layershare.compression.sparsity import ActivationScore

    g = torch.Generator().manual_seed(0)
    basis = SharedBasis(torch.randn(12, 6, generator=g))
    down = SharedBasisLinear(basis, torch.randn(6, 20, generator=g), "out", None)
    h = torch.randn(500, 20, generator=g) * torch.logspace(-1, 1, 20)  # channels of very different scale
    scale = next(ActivationScore([down], ActivationScore.statistics(["out"], [h.t() @ h / h.shape[0]]), [0])())
    with torch.no_grad():
        y = down(h)
        for k, j in [(0, 0), (3, 7), (5, 19)]:
            V = down.V.detach().clone()
            V[k, j] = 0
            y2 = (h @ V.t()) @ basis.U.t()
            rms = (y - y2).pow(2).sum(dim=1).mean().sqrt()
            torch.testing.assert_close(scale[k, j] * down.V[k, j].abs(), rms, rtol=1e-4, atol=1e-6)


def test_activation_score_keeps_the_entries_that_matter_on_the_data():
    """Two entries of equal magnitude: the one reading a loud input channel is kept."""
    from layershare.compression.sparsity import ActivationScore

    basis = SharedBasis(torch.eye(4))
    V = torch.ones(4, 4)
    down = SharedBasisLinear(basis, V, "out", None)
    G = torch.diag(torch.tensor([100.0, 1.0, 1.0, 0.01]))
    pruner = GroupPruner([down], n_final=4, schedule="static", steps=0, score=ActivationScore([down], ActivationScore.statistics(["out"], [G]), [0]))
    pruner.finish()
    assert down.mask[:, 0].all() and not down.mask[:, 3].any()


def test_top_k_masks_match_a_sort_and_break_ties_by_position():
    from layershare.compression.sparsity import kth_largest, top_k_masks

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5000, generator=g)
    scores[::7] = -1.0  # pruned entries
    shapes = [(10, 200), (20, 150)]
    for k in (1, 37, 2500, int((scores >= 0).sum())):
        masks = top_k_masks(scores, k, shapes)
        flat = torch.cat([m.flatten() for m in masks])
        assert [tuple(m.shape) for m in masks] == shapes and all(m.dtype == torch.bool for m in masks)
        assert int(flat.sum()) == k
        expect = torch.zeros(5000, dtype=torch.bool)
        expect[scores.sort(descending=True, stable=True).indices[:k]] = True
        assert torch.equal(flat, expect)
        assert kth_largest(scores, k) == int(scores.sort(descending=True).values[k - 1].view(torch.int32))
    # ties at the threshold: the first ones in order (across the layers), exactly k in all
    tied = torch.tensor([0.5, 0.2, 0.2, 0.9, 0.2, 0.2, -1.0, 0.2])
    masks = top_k_masks(tied, 4, [(1, 3), (1, 5)])
    assert torch.cat([m.flatten() for m in masks]).tolist() == [True, True, True, True, False, False, False, False]
    # more than the scored entries: pruned ones fill the rest (never asked by the pruner, but exact)
    assert int(torch.cat([m.flatten() for m in top_k_masks(tied, 8, [(1, 8)])]).sum()) == 8
    assert not any(m.any() for m in top_k_masks(tied, 0, [(1, 8)]))


def test_kth_largest_bracketed_by_a_sample_is_exact_and_falls_back_when_the_sample_misleads(monkeypatch):
    from layershare.compression import sparsity

    monkeypatch.setattr(sparsity, "SAMPLE", 1024)  # the bracketed path from 4097 entries on
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(20000, generator=g).pow(3)
    scores[torch.rand(20000, generator=g) < 0.3] = -1.0
    scores[100:400] = 0.25  # a run of ties
    expect = scores.sort(descending=True).values.view(torch.int32)
    calls = []
    kthvalue = torch.Tensor.kthvalue
    monkeypatch.setattr(torch.Tensor, "kthvalue", lambda self, *a: calls.append(self.numel()) or kthvalue(self, *a))
    scored = int((scores >= 0).sum())
    for k in (1, 2, 500, 7000, scored - 50, scored):  # (no pruned entry inside a bracket)
        assert sparsity.kth_largest(scores, k) == int(expect[k - 1]), k
    assert len(calls) == 6 and max(calls) < 20000 // 4  # the exact selection saw a bracket, not the vector
    for k in (scored + 1, 19999, 20000):  # more than the scored entries: the pruned ones' -1
        assert sparsity.kth_largest(scores, k) == int(expect[k - 1]), k
    # a strided sample unlike the whole: it sees only the ~5% largest entries, so the bracket misses
    odd = torch.rand(20000, generator=g) * 0.5
    odd[:: 20000 // 1024] = 1.0
    calls.clear()
    for k in (2000, 5000):
        assert sparsity.kth_largest(odd, k) == int(odd.sort(descending=True).values[k - 1].view(torch.int32))
    assert not calls  # answered by the binary search


def test_tuning_keeps_pruned_entries_at_zero_and_the_forward_masked():
    """The training forward reads V itself: V must be zero outside its mask after every step."""
    from layershare.compression.train import optimize

    layers = _layers()
    pr = GroupPruner(layers, n_final=120, schedule="gradual", steps=30, every=5, end=0.6)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    target = [torch.randn(64, l.V.shape[1], generator=torch.Generator().manual_seed(2)) for l in layers]
    seen = []

    def after_step():
        pr.apply_masks()  # what reconstruct runs after every step
        if layers[0].mask is not None:
            seen.append(all(float(l.V.detach()[~l.mask].abs().max()) == 0.0 for l in layers))

    optimize([layers[0].basis.U] + [l.V for l in layers], 30, 1e-2,
             lambda t: sum(((l(x) - y) ** 2).mean() for l, y in zip(layers, target)),
             before_step=lambda t: pr.step(t), after_step=after_step)
    assert seen and all(seen)
    with torch.no_grad():  # the forward equals the explicitly masked product
        for l in layers:
            assert torch.allclose(l(x), x @ l.basis.U @ (l.V * l.mask), atol=1e-6)


def test_apply_masks_zeroes_outside_the_current_mask_exactly():
    """apply_masks multiplies by a 0/1 tensor it keeps per mask: kept entries unchanged bit for
    bit, the rest zero, and a replaced mask (a later update) is followed, not the held one."""
    layers = _layers()
    pr = GroupPruner(layers, n_final=100, schedule="static", steps=0)
    pr.prune_to(150)
    first = [l.mask for l in layers]
    with torch.no_grad():
        for l in layers:
            l.V.add_(1.5)  # an optimiser step moves every entry
    before = [l.V.detach().clone() for l in layers]
    pr.apply_masks()
    for l, b, m in zip(layers, before, first):
        assert torch.equal(l.V.detach()[m], b[m]) and not l.V.detach()[~m].any()
    pr.prune_to(100)  # new masks, fewer entries
    assert all(l.mask is not m for l, m in zip(layers, first))
    with torch.no_grad():
        for l in layers:
            l.V.add_(1.5)
    pr.apply_masks()
    assert sum(int(torch.count_nonzero(l.V.detach())) for l in layers) == 100
    for l in layers:
        assert not l.V.detach()[~l.mask].any()
