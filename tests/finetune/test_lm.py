"""finetune() on a tiny Llama: every loss keeps masks and 2:4 exactly, resume is bit-identical,
the data rule holds, and bad teachers / data / outputs get typed errors."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import make_tiny_llama

import sparsetorch
from sparsetorch.errors import DataError, OutputExistsError
from sparsetorch.finetune import FinetuneError, WindowSampler, finetune, load_checkpoint
from sparsetorch.finetune import lm as lm_mod


def _pruned(pattern="2:4"):
    dense = make_tiny_llama(vocab=64)
    student = copy.deepcopy(dense)
    masks = sparsetorch.prune(student, "magnitude", 0.5 if pattern == "unstructured" else None, pattern).masks
    return dense, student, masks


def _windows(n=6, seq=16, seed=0):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("loss", ["ce", "kd", "squarehead", "kd+squarehead", "0.5*ce+kd"])
def test_masks_and_pattern_exact_after_training(loss):
    dense, student, masks = _pruned()
    before = {n: m.clone() for n, m in masks.masks.items()}
    w0 = {n: p.detach().clone() for n, p in student.named_parameters()}
    res = finetune(student, masks, _windows(), teacher=dense, loss=loss, steps=4, lr=3e-3, batch_size=2,
                   grad_accum=2, weight_decay=0.1, max_grad_norm=0.5, progress=False)
    params = dict(student.named_parameters())
    for name, m in before.items():
        assert torch.equal(masks.masks[name], m), name  # the masks themselves never change
        w = params[name].detach()
        assert not w[~m].any(), name
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(groups.max()) <= 2, name  # 2:4 by definition
    masks.verify(student)
    moved = [n for n in before if not torch.equal(params[n].detach(), w0[n])]
    assert len(moved) == len(before)  # every pruned layer was trained
    assert res.steps == 4 and res.tokens == 4 * 2 * 2 * 16 and all(torch.isfinite(torch.tensor(res.losses)))


def test_kd_loss_lowers_distance_to_the_teacher():
    dense, student, masks = _pruned()
    ids = _windows(4, 16, seed=3)

    def kd_now():
        with torch.no_grad():
            return float(sparsetorch.finetune.kd_kl(student(ids).logits, dense(ids).logits))

    start = kd_now()
    finetune(student, masks, ids, teacher=dense, loss="kd", steps=15, lr=5e-3, batch_size=4, progress=False)
    assert kd_now() < 0.7 * start


def test_resume_through_finetune_is_bit_identical(tmp_path, monkeypatch):
    dense, student, masks = _pruned()
    kw = dict(teacher=dense, loss="kd+squarehead", steps=5, lr=2e-3, batch_size=2, checkpoint_every=2,
              eval_windows=_windows(2, 16, seed=9), progress=False)
    a = copy.deepcopy(student)
    full = finetune(a, masks, _windows(), checkpoint_dir=tmp_path / "a", **kw)
    b = copy.deepcopy(student)
    real = WindowSampler.__call__

    def stop_at_3(self, i):
        if i == 3:
            raise KeyboardInterrupt
        return real(self, i)

    monkeypatch.setattr(WindowSampler, "__call__", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        finetune(b, masks, _windows(), checkpoint_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(WindowSampler, "__call__", real)
    assert load_checkpoint(tmp_path / "b")[0]["step"] == 2
    c = make_tiny_llama(vocab=64, seed=5)  # unrelated weights: everything comes from the checkpoint
    res = finetune(c, None, _windows(), checkpoint_dir=tmp_path / "b", resume=tmp_path / "b", **kw)
    for (n, p), (_, q) in zip(a.state_dict().items(), c.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    assert res.losses == full.losses and res.evals[-1] == full.evals[-1]
    assert full.evals[0][0] == 0 and full.evals[-1][0] == 5


def test_sampler_is_a_seeded_permutation_per_epoch():
    s = WindowSampler(5, 2, seed=3)
    stream = torch.cat([s(i) for i in range(5)])  # 10 positions = two epochs
    assert sorted(stream[:5].tolist()) == list(range(5)) and sorted(stream[5:].tolist()) == list(range(5))
    assert torch.equal(torch.cat([WindowSampler(5, 2, seed=3)(i) for i in range(5)]), stream)
    assert not torch.equal(torch.cat([WindowSampler(5, 2, seed=4)(i) for i in range(5)]), stream)
    assert torch.equal(WindowSampler(5, 2, seed=3)(4), stream[8:])  # batch i alone, no history needed


def test_teacher_checks():
    dense, student, masks = _pruned()
    data = _windows()
    with pytest.raises(FinetuneError, match="needs a teacher"):
        finetune(student, masks, data, loss="kd", steps=1, progress=False)
    with pytest.raises(FinetuneError, match="the teacher is the student itself"):
        finetune(student, masks, data, teacher=student, steps=1, progress=False)
    with pytest.raises(FinetuneError, match=r"vocabulary \(128 tokens\) differs from the student's \(64\)"):
        finetune(student, masks, data, teacher=make_tiny_llama(vocab=128), steps=1, progress=False)
    with pytest.raises(FinetuneError, match="num_hidden_layers is 3 and the student's 2"):
        finetune(student, masks, data, teacher=make_tiny_llama(vocab=64, layers=3), loss="kd+squarehead",
                 steps=1, progress=False)
    shared = copy.copy(student)  # shallow: the same parameter objects
    with pytest.raises(FinetuneError, match="shares parameters with the student"):
        finetune(student, masks, data, teacher=shared, steps=1, progress=False)
    finetune(student, masks, data, teacher=make_tiny_llama(vocab=64, layers=3), loss="kd", steps=1,
             progress=False)  # logit KD only needs the vocabulary


def test_data_checks():
    dense, student, masks = _pruned()
    for bad, match in ((torch.zeros(0, 16, dtype=torch.long), "is empty"),
                       (torch.zeros(4, 1, dtype=torch.long), "is empty"),
                       (torch.zeros(4, 16), "must be a LongTensor"), ([[1, 2]], "must be a LongTensor")):
        with pytest.raises(DataError, match=match):
            finetune(student, masks, bad, teacher=dense, steps=1, progress=False)
    evalw = _windows(3, 16, seed=7)
    leaky = torch.cat([_windows(), evalw[1:2]])
    with pytest.raises(DataError, match=r"training window 6 is evaluation window 1"):
        finetune(student, masks, leaky, teacher=dense, eval_windows=evalw, steps=1, progress=False)
    with pytest.raises(FinetuneError, match="checkpoint_every needs checkpoint_dir"):
        finetune(student, masks, _windows(), teacher=dense, steps=1, checkpoint_every=1, progress=False)
    with pytest.raises(FinetuneError, match="temperature must be > 0"):
        finetune(student, masks, _windows(), teacher=dense, steps=1, temperature=0, progress=False)


def test_existing_checkpoint_folder_of_other_files_is_refused(tmp_path):
    dense, student, masks = _pruned()
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "keep.bin").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        finetune(student, masks, _windows(), teacher=dense, steps=2, checkpoint_dir=tmp_path,
                 checkpoint_every=1, progress=False)
    assert (tmp_path / "last" / "keep.bin").read_bytes() == b"x"


def test_gradient_checkpointing_gives_the_same_run():
    dense, student, masks = _pruned()
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    kw = dict(teacher=dense, loss="kd", steps=2, lr=1e-3, batch_size=2, progress=False)
    ra = finetune(a, masks, _windows(), **kw)
    rb = finetune(b, masks, _windows(), gradient_checkpointing=True, **kw)
    assert ra.losses == pytest.approx(rb.losses, rel=1e-5)
    flag = "is_activation_checkpointing" if hasattr(b, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not getattr(b, flag)  # switched off again afterwards
    with pytest.raises(FinetuneError, match="gradient_checkpointing needs a Hugging Face model"):
        sparsetorch.finetune.finetune(torch.nn.Linear(2, 2), masks, _windows(), steps=1, loss="ce",
                                      gradient_checkpointing=True, progress=False)


def test_python_docs_sections(tmp_path):
    root = tmp_path / "_sources"
    for sec, name, text in (("tutorial", "a.rst.txt", "alpha"), ("howto", "sub/b.rst.txt", "beta"),
                            ("reference", "c.rst.txt", "EVAL"), ("library", "d.rst.txt", "LIB")):
        p = root / sec / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    text = lm_mod.python_docs_text(root, sections=("tutorial", "howto"))
    assert "alpha" in text and "beta" in text and "EVAL" not in text and "LIB" not in text
    with pytest.raises(DataError, match="may not be used for fine-tuning"):
        lm_mod.python_docs_text(root, sections=("reference",))
    with pytest.raises(DataError, match="not found"):
        lm_mod.python_docs_text(tmp_path / "nowhere")
    with pytest.raises(DataError, match="section 'faq' not found"):
        lm_mod.python_docs_text(root, sections=("faq",))


def test_check_options_resolves_the_default_lr_and_refuses_what_finetune_refuses():
    from sparsetorch.finetune.lm import DEFAULT_LORA_LR, DEFAULT_LR, check_options

    assert check_options()[2].lr == DEFAULT_LR == 1e-4
    spec, settings, config = check_options(loss="kd+squarehead", lora=8)
    assert config.lr == DEFAULT_LORA_LR == 1e-3 and settings.r == 8 and spec.needs_hidden
    assert config.adapter == settings.to_dict()
    assert check_options(lora=8, lr=3e-4)[2].lr == 3e-4
    with pytest.raises(FinetuneError, match="checkpoint_every needs checkpoint_dir"):
        check_options(checkpoint_every=2)
    with pytest.raises(FinetuneError, match="temperature must be > 0"):
        check_options(temperature=True)
    with pytest.raises(FinetuneError, match="lr must be"):
        check_options(lr=-1.0)
