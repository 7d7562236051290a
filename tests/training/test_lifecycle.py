"""Every method keeps MaskSet.verify passing; resume from a checkpoint reproduces the masks."""

import copy

import pytest
import torch
from _train_helpers import TinyCNN, batches, train

from sparsetorch.training import METHODS, get_method

KW = {
    "random": {}, "static": {},
    "snip": {}, "grasp": {}, "synflow": {"iterations": 3},
    "gmp": {"start": 0, "end": 6, "frequency": 2},
    "imp": {},
    "set": {"update_every": 2}, "rigl": {"update_every": 2},
    "snfs": {"update_every": 2},
    "acdc": {"warmup": 1, "phase": 2, "final": 2},
    "ste": {}, "srste": {}, "nm_progressive": {"dense_steps": 1, "finetune_steps": 2},
    "nm_decay": {"dense_steps": 1, "finetune_steps": 3},
    # learned sparsity (tests/training/test_learned_methods.py has their own scenarios)
    "hypersparse": {"probe_batches": 2, "art_every": 2, "lam": 1e-3}, "group_lasso": {"lam": 1e-2},
    "kgroup": {}, "l0": {}, "ste_gates": {}, "dass": {"search_steps": 2},
    "random_search": {"trials": 2, "proxy_steps": 2, "val_batches": 2},
}
NM = {"ste", "srste", "nm_progressive", "nm_decay"}


def make(method):
    kw = dict(KW[method], total_steps=8)
    if method not in NM:
        kw["sparsity"] = 0.8
    return get_method(method, **kw)


def test_every_registered_method_is_covered():
    assert set(METHODS) == set(KW)


@pytest.mark.parametrize("method", sorted(KW))
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_verify_through_training(method, opt_name):
    torch.manual_seed(0)
    model = TinyCNN()
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3) if opt_name == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    sp = make(method)
    data = batches(8, (1, 8, 8))
    masks = sp.attach(model, opt, data=data)
    train(model, opt, sp, data, lambda changed: masks.verify(model))
    sp.detach()
    masks.verify(model)


@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "gmp", "srste", "acdc", "nm_progressive", "nm_decay"])
def test_resume_gives_identical_masks(method):
    torch.manual_seed(0)
    data = batches(8, (1, 8, 8))
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = make(method)
    sp.attach(model, opt, data=data)
    train(model, opt, sp, data[:3])
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
    train(model, opt, sp, data[3:])
    final = {n: m.clone() for n, m in sp.masks.items()}

    torch.manual_seed(123)
    model2 = TinyCNN()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    sp2 = make(method)
    sp2.attach(model2, opt2, data=data)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2.load_state_dict(ckpt["sp"])
    train(model2, opt2, sp2, data[3:])
    for n in final:
        assert torch.equal(final[n], sp2.masks[n]), n
    for (n1, p1), (_n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.allclose(p1, p2, atol=1e-6), n1


def test_bf16_autocast_cpu(mlp):
    import torch.nn.functional as F

    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    sp = get_method("rigl", sparsity=0.8, update_every=1, end=4)
    masks = sp.attach(mlp, opt)
    for x, y in batches(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(mlp(x), y)
        loss.backward()
        opt.step()
        assert sp.step()
        masks.verify(mlp)
