"""Harvesting: the model's own hidden states, shards, resume after truncation, bad sites."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_llama

from sparsetorch.dictionaries.harvest import ActivationStore, harvest, read_manifest, shard_name
from sparsetorch.dictionaries.metrics import recon_stats, sae_splice, splice_losses
from sparsetorch.dictionaries.sae import SAEConfig, SparseAutoencoder
from sparsetorch.dictionaries.sites import parse_site, read_site, valid_sites
from sparsetorch.errors import DictionaryError, OutputExistsError


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(layers=3, hidden=32, intermediate=64, vocab=100)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 100, (10, 17), generator=torch.Generator().manual_seed(0))


def test_resid_site_is_the_models_hidden_state(model, windows):
    with torch.no_grad():
        hs = model(windows[:3], output_hidden_states=True).hidden_states
    for layer in (0, 1):  # the last block's HF hidden state has the final norm applied
        got = read_site(model, parse_site(f"resid:{layer}", model), windows[:3])
        assert torch.allclose(got, hs[layer + 1], atol=1e-6)


def test_mlp_and_attn_sites_are_the_submodule_outputs(model, windows):
    seen = {}
    blk = model.model.layers[1]
    h1 = blk.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o))
    h2 = blk.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0]))
    with torch.no_grad():
        model(windows[:2])
    h1.remove()
    h2.remove()
    assert torch.allclose(read_site(model, parse_site("mlp:1", model), windows[:2]), seen["mlp"])
    assert torch.allclose(read_site(model, parse_site("attn:-2", model), windows[:2]), seen["attn"])


def test_bad_site_lists_the_valid_ones(model):
    with pytest.raises(DictionaryError, match=r"valid sites: resid\|mlp\|attn:L with L in 0..2"):
        parse_site("resid:7", model)
    with pytest.raises(DictionaryError, match="KIND:LAYER"):
        parse_site("resid15", model)
    with pytest.raises(DictionaryError, match="unknown"):
        parse_site("mlp_out:1", model)
    assert valid_sites(model)[:3] == ["resid:0", "mlp:0", "attn:0"]


def test_harvest_shards_and_statistic(model, windows, tmp_path):
    man = harvest(model, windows, "resid:1", tmp_path / "h", windows_per_shard=3, batch_size=2,
                  dtype="float32", skip_first=1)
    assert man.done and len(man.shards) == 4 and man.rows == 10 * 16
    store = ActivationStore(tmp_path / "h")
    ref = read_site(model, parse_site("resid:1", model), windows)[:, 1:].reshape(-1, 32)
    got = torch.cat([store.shard(i)["acts"] for i in range(len(store))])
    assert torch.allclose(got, ref, atol=1e-6)
    sh = store.shard(1)
    assert sh["window"][0] == 3 and sh["pos"][0] == 1 and sh["pos"].max() == 16
    assert store.manifest.mean_sq_norm()[0] == pytest.approx(float(ref.double().pow(2).sum(1).mean()), rel=1e-6)
    assert torch.allclose(store.manifest.mean(), ref.double().mean(0), atol=1e-6)
    # batches: every row once per epoch, shuffled
    rows = torch.cat(list(store.batches(16, seed=1)))
    assert rows.shape == (160, 32)
    assert torch.allclose(rows.sum(0), ref.sum(0), atol=1e-3)
    assert not torch.equal(rows, ref)
    assert torch.equal(store.windows(), windows)


def test_truncated_shard_is_refused_and_resume_restarts_there(model, windows, tmp_path):
    out = tmp_path / "h"
    harvest(model, windows, "mlp:0", out, windows_per_shard=2)
    full = [ActivationStore(out).shard(i)["acts"] for i in range(5)]
    p = out / shard_name(2)
    p.write_bytes(p.read_bytes()[:-100])
    store = ActivationStore(out)
    with pytest.raises(DictionaryError, match=r"shard_00002.safetensors .* truncated.*resume"):
        store.shard(2)
    with pytest.raises(DictionaryError, match="truncated"):
        list(store.batches(8))
    # a fresh harvest into the folder is refused, resume rewrites from shard 2
    with pytest.raises(OutputExistsError):
        harvest(model, windows, "mlp:0", out, windows_per_shard=2)
    man = harvest(model, windows, "mlp:0", out, windows_per_shard=2, resume=True)
    assert man.done and len(man.shards) == 5
    again = ActivationStore(out)
    for i in range(5):
        assert torch.equal(again.shard(i)["acts"], full[i])
    # resuming with other settings is refused
    with pytest.raises(DictionaryError, match="other settings"):
        harvest(model, windows, "mlp:1", out, windows_per_shard=2, resume=True)


def test_interrupted_harvest_resumes(model, windows, tmp_path, monkeypatch):
    out = tmp_path / "h"
    import importlib

    hv = importlib.import_module("sparsetorch.dictionaries.harvest")  # the module, not the function

    calls = {"n": 0}
    real = hv._save

    def flaky(path, tensors):
        calls["n"] += 1
        if calls["n"] == 4:  # windows file, shards 0 and 1, then the crash
            raise KeyboardInterrupt
        real(path, tensors)

    monkeypatch.setattr(hv, "_save", flaky)
    with pytest.raises(KeyboardInterrupt):
        harvest(model, windows, "resid:0", out, windows_per_shard=4)
    monkeypatch.setattr(hv, "_save", real)
    man = read_manifest(out)
    assert not man.done and len(man.shards) == 2
    with pytest.raises(DictionaryError, match="unfinished"):
        ActivationStore(out)
    man = harvest(model, windows, "resid:0", out, windows_per_shard=4, resume=True)
    assert man.done and man.rows == 160


def test_larger_budget_extends_a_finished_harvest(model, windows, tmp_path, monkeypatch):
    import importlib

    hv = importlib.import_module("sparsetorch.dictionaries.harvest")
    out = tmp_path / "h"
    small = harvest(model, windows, "resid:1", out, tokens=5 * 16, windows_per_shard=2, dtype="float32")
    assert small.n_windows == 5 and [s["windows"] for s in small.shards][-1] == [4, 5]  # cut short
    kept = [ActivationStore(out).shard(i)["acts"] for i in range(2)]
    written = []
    real = hv._save
    monkeypatch.setattr(hv, "_save", lambda path, t: (written.append(path.name), real(path, t)))
    big = harvest(model, windows, "resid:1", out, tokens=9 * 16, windows_per_shard=2, dtype="float32",
                  resume=True)
    # the two full shards are kept as they were, the short one and the rest are harvested
    assert [n for n in written if n.startswith("shard")] == [shard_name(i) for i in (2, 3, 4)]
    assert big.done and big.n_windows == 9 and big.rows == 9 * 16
    fresh = harvest(model, windows, "resid:1", tmp_path / "f", tokens=9 * 16, windows_per_shard=2,
                    dtype="float32")
    store, ref = ActivationStore(out), ActivationStore(tmp_path / "f")
    assert torch.equal(store.shard(0)["acts"], kept[0]) and torch.equal(store.shard(1)["acts"], kept[1])
    for i in range(5):
        assert torch.allclose(store.shard(i)["acts"], ref.shard(i)["acts"], atol=1e-6)
    assert store.manifest.mean_sq_norm() == pytest.approx(fresh.mean_sq_norm(), rel=1e-9)
    assert torch.equal(store.windows(), windows[:9])
    # a smaller budget, or other windows, are refused
    with pytest.raises(DictionaryError, match="other settings"):
        harvest(model, windows, "resid:1", out, tokens=3 * 16, windows_per_shard=2, dtype="float32", resume=True)
    other = windows.flip(0)
    with pytest.raises(DictionaryError, match="token windows are not the ones"):
        harvest(model, other, "resid:1", out, tokens=9 * 16, windows_per_shard=2, dtype="float32", resume=True)


def test_token_budget_and_bad_arguments(model, windows, tmp_path):
    man = harvest(model, windows, "resid:0", tmp_path / "a", tokens=40)  # 3 windows of 16 rows
    assert man.n_windows == 3 and man.rows == 48
    with pytest.raises(DictionaryError, match="only 10 windows"):
        harvest(model, windows, "resid:0", tmp_path / "b", tokens=10_000)
    with pytest.raises(DictionaryError, match="skip_first"):
        harvest(model, windows, "resid:0", tmp_path / "c", skip_first=17)
    with pytest.raises(DictionaryError, match="dtype"):
        harvest(model, windows, "resid:0", tmp_path / "d", dtype="int8")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "mine.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        harvest(model, windows, "resid:0", tmp_path / "e")
    assert (tmp_path / "e" / "mine.txt").read_text() == "x"
    bad = tmp_path / "a" / "manifest.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(DictionaryError, match="not a valid"):
        ActivationStore(tmp_path / "a")


def test_paired_harvest_on_identical_tokens(model, windows, tmp_path):
    other = make_tiny_llama(layers=3, hidden=32, intermediate=64, vocab=100, seed=1)
    man = harvest([model, other], windows, "resid:1", tmp_path / "p", model_names=["a", "b"])
    assert man.paired and man.models == ["a", "b"]
    acts = ActivationStore(tmp_path / "p").shard(0)["acts"]
    assert acts.shape[1:] == (2, 32)
    site = parse_site("resid:1", model)
    ids = windows[:2]
    ref_a = read_site(model, site, ids)[:, 1:].reshape(-1, 32)
    ref_b = read_site(other, site, ids)[:, 1:].reshape(-1, 32)
    assert torch.allclose(acts[:32, 0], ref_a.half().float()) and torch.allclose(acts[:32, 1], ref_b.half().float())
    assert len(man.scale()) == 2


def test_fvu_against_hand_computation_and_splice(model, windows):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d=32, width=64, k=8, scale=1.7)).eval()
    x = torch.randn(40, 32) * 3 + 1
    st = recon_stats(sae, [x[:15], x[15:]])
    with torch.no_grad():
        xh = sae(x)
    fvu = float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert st.fvu() == pytest.approx(fvu, rel=1e-6)
    assert st.l0() == pytest.approx(8.0)
    fired = torch.zeros(64, dtype=torch.bool)
    fired[sae.encode(x).latent] = True
    assert st.dead_fraction() == pytest.approx(float((~fired).float().mean()))
    assert st.shrinkage() == pytest.approx(float((xh ** 2).sum() / (x * xh).sum()), rel=1e-6)
    site = parse_site("resid:1", model)
    # splicing the identity gives the clean loss; CE recovered is then exactly 1
    r = splice_losses(model, site, windows[:4], lambda h: h)
    assert r.sae_loss == pytest.approx(r.clean_loss, abs=1e-6) and r.ce_recovered == pytest.approx(1.0)
    r2 = splice_losses(model, site, windows[:4], sae_splice(sae))
    assert r2.clean_loss == pytest.approx(r.clean_loss) and r2.zero_loss == pytest.approx(r.zero_loss)
    assert r2.delta_lm_loss == pytest.approx(r2.sae_loss - r2.clean_loss)


def test_sink_tokens_are_left_out_of_training_batches_metrics_and_splicing(model, windows, tmp_path):
    harvest(model, windows, "resid:1", tmp_path / "h", dtype="float32")
    store = ActivationStore(tmp_path / "h")
    allrows = torch.cat([store.shard(i)["acts"] for i in range(len(store))])
    med = float(allrows.norm(dim=1).median())
    got = torch.cat(list(store.batches(8, max_norm=med)))
    assert (got.norm(dim=1) <= med + 1e-4).all() and len(got) >= 72
    assert store.sink_norm(10.0)[0] == pytest.approx(10 * store.manifest.mean_sq_norm()[0] ** 0.5)
    with pytest.raises(DictionaryError, match="> 1"):
        store.sink_norm(0.5)
    # metrics: a row 1000x the others is skipped, and the statistics equal those without it
    sae = SparseAutoencoder(SAEConfig(d=32, width=64, k=4, max_norm=50.0)).eval()
    x = torch.randn(30, 32)
    x_out = torch.cat([x, 1000 * torch.ones(1, 32)])
    a, b = recon_stats(sae, [x_out]), recon_stats(sae, [x])
    assert a.skipped == 1 and a.fvu() == pytest.approx(b.fvu()) and a.n == 30
    # splicing leaves the sink row as it was and reconstructs the others
    h = x_out[None]
    out = sae_splice(sae)(h)
    assert torch.equal(out[0, -1], h[0, -1]) and not torch.equal(out[0, 0], h[0, 0])
