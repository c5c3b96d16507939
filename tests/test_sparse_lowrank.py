"""The low-rank indexer (variant lowrank, lowrank.py): its closed-form fit is the best rank-r bilinear
form for the moments it is given, at full rank it selects what the oracle selects, and it behaves as
every sparse variant must (padding, the KV cache, save and load, one-line errors)."""

import pytest
import torch

import attnlab
from attnlab.modules.base import PluginError, load_weights
from attnlab.modules.sparse import SparseConfig
from attnlab.modules.sparse.lowrank import LowRankIndexer, _sqrt
from attnlab.modules.sparse.pages import Pages
from attnlab.modules.sparse.patterns import Pattern
from attnlab.modules.sparse.selection import select

from .conftest import logits_of
from .test_sparse import gap, ids


def _moments(d: int, seed: int):
    """Two anisotropic second-moment matrices (1, d, d) whose main directions differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        scales = torch.logspace(1, -2, d, dtype=torch.float64)
        out.append((basis * scales) @ basis.T)
    return out[0][None], out[1][None]


def _error(cq, ck, w):
    """E[(q (I - W) k)^2] for independent q, k with these moments."""
    e = torch.eye(w.shape[-1], dtype=torch.float64) - w
    return (_sqrt(cq) @ e @ _sqrt(ck)).pow(2).sum().item()


def _fitted(cq, ck, rank):
    ix = LowRankIndexer(cq.shape[-1], 1, rank).double()
    ix.fit(cq, ck)
    return (ix.wq @ ix.wk.transpose(-1, -2))[0].detach()


def test_at_full_rank_the_fit_reproduces_every_logit():
    cq, ck = _moments(8, 0)
    assert torch.allclose(_fitted(cq, ck, 8), torch.eye(8, dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_the_fit_beats_the_keys_and_the_queries_own_principal_directions_at_equal_rank(rank):
    cq, ck = _moments(8, 1)
    fit = _error(cq, ck, _fitted(cq, ck, rank))
    for c in (ck, cq):            # Loki's basis (the keys' PCA), and the queries' PCA
        top = torch.linalg.eigh(c[0])[1][:, -rank:]
        assert fit < _error(cq, ck, top @ top.T) * 0.99


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_the_fit_attains_the_eckart_young_bound_the_dropped_singular_values_squared(rank):
    cq, ck = _moments(8, 2)
    s = torch.linalg.svdvals(_sqrt(cq) @ _sqrt(ck))[0]
    assert _error(cq, ck, _fitted(cq, ck, rank)) == pytest.approx(s[rank:].pow(2).sum().item(), rel=1e-6)


def _random_qk(seed=0, t=64, d=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, t, d, generator=g) * 1.5, torch.randn(1, 2, t, d, generator=g) * 1.5


def _full_rank(q, k):
    ix = LowRankIndexer(16, 2, 16)
    qg = q.reshape(1, 2, -1, 16)[0]
    ix.fit(qg.transpose(-1, -2).double() @ qg.double(), k[0].transpose(-1, -2).double() @ k[0].double())
    return ix


def test_at_full_rank_the_indexer_selects_per_row_what_the_query_head_oracle_selects():
    q, k = _random_qk()
    p = Pattern(64, 64, 4, "cpu")
    common = dict(top_k=3, block_size=4, granularity="row")
    mine = select(SparseConfig(variant="lowrank", rank=16, **common), q, k, p, None, 0.25, indexer=_full_rank(q, k))
    oracle = select(SparseConfig(variant="quest", oracle=True, **common), q, k, p, None, 0.25)
    assert torch.equal(mine.idx.sort(-1).values, oracle.idx.sort(-1).values)


def test_at_full_rank_a_query_block_scores_the_true_attention_its_mean_query_gives_the_blocks_before_it():
    q, k = _random_qk()
    p = Pattern(64, 64, 4, "cpu")
    got = _full_rank(q, k).scores(q, k, p, None, 0.25, block=True)[0, :, 0]          # (Hkv, nq, nfull)
    qbar = q[0].view(4, 16, 4, 16).mean(2)                                            # (Hq, nq, D)
    for i in (3, 9, 15):                      # query block i sees keys 0 .. 4i-1 as a whole
        w = (qbar[:, i, None] @ k[0].repeat_interleave(2, 0)[:, :4 * i].transpose(-1, -2) * 0.25).softmax(-1)
        want = w.view(2, 2, i, 4).sum((1, 3))                                          # (Hkv, i blocks)
        assert torch.allclose(got[:, i, :i].exp(), want, atol=1e-5)


def _calibrated(bb, **options):
    plugin = attnlab.attach(bb.model, "sparse", variant="lowrank", block_size=4, top_k=1, rank=4, **options)
    plugin.calibrate([ids(40, batch=1, seed=s)[0] for s in range(3)])
    return plugin


def test_an_unfitted_indexer_is_one_line_naming_calibrate(tiny_llama):
    plugin = attnlab.attach(tiny_llama.model, "sparse", variant="lowrank", block_size=4, top_k=1, rank=4)
    with pytest.raises(PluginError, match=r"not fitted: call plugin.calibrate\(sequences\)"):
        logits_of(tiny_llama.model, ids())
    plugin.detach()


def test_a_rank_above_the_head_dimension_is_refused_naming_the_limit(tiny_llama):
    d = tiny_llama.model.config.hidden_size // tiny_llama.model.config.num_attention_heads
    with pytest.raises(PluginError, match=f"rank {d + 1} is above the head dimension {d}: use rank <= {d}"):
        attnlab.attach(tiny_llama.model, "sparse", variant="lowrank", rank=d + 1)
    assert tiny_llama.model.config._attn_implementation == "sdpa"      # the failed attach left nothing behind


def test_calibration_changes_the_selection_and_really_skips_pairs(tiny_llama):
    base = logits_of(tiny_llama.model, ids())
    plugin = _calibrated(tiny_llama)
    assert gap(logits_of(tiny_llama.model, ids()), base) > 1e-3
    assert plugin.sparsity() > 0.2
    plugin.detach()


def test_gather_and_masked_kernels_agree_and_padding_does_not_leak(tiny):
    plugin = _calibrated(tiny, kernel="gather")
    lengths, pad = [37, 22, 9], tiny.tokenizer.pad_token_id
    seqs = [ids(n, batch=1, seed=n)[0] for n in lengths]
    x, mask = torch.full((3, 37), pad), torch.zeros(3, 37, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)], mask[i, :len(s)] = s, 1
    with torch.no_grad():
        batched = tiny.model(input_ids=x, attention_mask=mask).logits
        for i, s in enumerate(seqs):
            assert gap(batched[i, :len(s)], tiny.model(input_ids=s[None]).logits[0]) <= 1e-5
    state = plugin.state_dict()
    plugin.detach()
    masked = attnlab.attach(tiny.model, "sparse", variant="lowrank", block_size=4, top_k=1, rank=4, kernel="masked")
    masked.load_state_dict(state)
    with torch.no_grad():
        assert gap(tiny.model(input_ids=x, attention_mask=mask).logits, batched) <= 1e-5
    masked.detach()


def test_kv_cache_generation_matches_no_cache(tiny):
    plugin = _calibrated(tiny, granularity="row")
    prompt = ids(26, batch=1, seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(tiny.model.generate(prompt, **kw), tiny.model.generate(prompt, use_cache=False, **kw))
    plugin.detach()


def test_the_fitted_indexer_saves_and_loads_with_the_plugin(tiny_llama, tmp_path):
    plugin = _calibrated(tiny_llama)
    before = logits_of(tiny_llama.model, ids())
    plugin.save_pretrained(tmp_path / "lowrank")
    plugin.detach()
    again = attnlab.attach(tiny_llama.model, "sparse", variant="lowrank", block_size=4, top_k=1, rank=4)
    again.load_state_dict(load_weights(tmp_path / "lowrank"))
    assert torch.equal(logits_of(tiny_llama.model, ids()), before)
    again.detach()


def test_calibrate_is_refused_for_another_variant(tiny_llama):
    plugin = attnlab.attach(tiny_llama.model, "sparse", variant="quest", block_size=4, top_k=1)
    with pytest.raises(PluginError, match="calibrate fits the lowrank indexer: attach sparse with variant 'lowrank'"):
        plugin.calibrate([ids(40, batch=1)[0]])
    plugin.detach()


SHAPE = r"give a list of 1-D tensors of token ids.*one sequence: \[ids\]"


@pytest.mark.parametrize("sequences, message", [
    ([torch.tensor([], dtype=torch.long)], SHAPE),       # an empty sequence
    (ids(40, batch=1)[0], SHAPE),                         # one sequence, not a list of them: 40 one-token passes
    ([ids(40, batch=2)], SHAPE),                          # a batch as one sequence: its rows run together
    ([torch.rand(40)], SHAPE),                            # not token ids
    ([[5, 6, 7]], SHAPE),                                 # not a tensor
    ([torch.full((40,), 300)], r"outside the model's vocabulary 0..258: tokenize with the backbone's tokenizer"),
    ([torch.full((40,), -1)], "outside the model's vocabulary"),
    ([ids(600, batch=1)[0]], "sequence 0 has 600 tokens, past the 512 positions the model reads: cut it to at "
                             "most 512"),
], ids=["empty", "bare-1-d", "2-d", "float", "list", "past-vocab", "negative", "past-positions"])
def test_calibrate_refuses_anything_but_a_list_of_1d_token_tensors_and_fits_nothing(tiny_llama, sequences, message):
    plugin = attnlab.attach(tiny_llama.model, "sparse", variant="lowrank", block_size=4, top_k=1, rank=4)
    with pytest.raises(PluginError, match=message):
        plugin.calibrate(sequences)
    assert not any(layer.indexer.fitted for layer in plugin.layers())
    plugin.detach()


def test_calibrate_refuses_fewer_tokens_than_the_head_dimension_where_unseen_key_directions_would_blow_up(tiny_llama):
    d = tiny_llama.model.config.hidden_size // tiny_llama.model.config.num_attention_heads
    plugin = attnlab.attach(tiny_llama.model, "sparse", variant="lowrank", block_size=4, top_k=1, rank=4)
    with pytest.raises(PluginError, match=f"calibrate: 3 tokens are fewer than the head dimension {d}.*at least {d}"):
        plugin.calibrate([ids(2, batch=1)[0], ids(1, batch=1)[0]])
    assert not any(layer.indexer.fitted for layer in plugin.layers())
    plugin.calibrate([ids(d, batch=1)[0]])
    assert all(layer.indexer.fitted for layer in plugin.layers())
    plugin.detach()


def test_a_boolean_rank_is_refused_not_read_as_rank_1():
    with pytest.raises(PluginError, match="sparse option rank must be an integer >= 1, got True"):
        SparseConfig(variant="lowrank", rank=True)


def test_saving_an_unfitted_indexer_is_refused_naming_calibrate_and_writes_nothing(tiny_llama, tmp_path):
    plugin = attnlab.attach(tiny_llama.model, "sparse", variant="lowrank", block_size=4, top_k=1, rank=4)
    with pytest.raises(PluginError, match=r"not fitted, so there is nothing to save: call plugin.calibrate"):
        plugin.save_pretrained(tmp_path / "lowrank")
    assert not (tmp_path / "lowrank").exists()
    plugin.detach()


@pytest.mark.parametrize("saved, loading, message", [
    ("lowrank", {"variant": "lowrank", "rank": 8}, "fitted at rank 4; attach sparse with rank=4 to load it"),
    ("lowrank", {"variant": "learned"}, "are a lowrank indexer; attach sparse with variant='lowrank'"),
    ("lowrank", {"variant": "quest"}, "are a lowrank indexer; attach sparse with variant='lowrank'"),
    ("learned", {"variant": "lowrank", "rank": 4}, "are a learned gate; attach sparse with variant='learned'"),
    ("quest", {"variant": "lowrank", "rank": 4}, r"hold no lowrank indexer .* or fit it with plugin.calibrate"),
])
def test_weights_of_another_variant_or_rank_are_refused_naming_the_option(tiny_llama, saved, loading, message):
    if saved == "lowrank":
        plugin = _calibrated(tiny_llama)
    else:
        plugin = attnlab.attach(tiny_llama.model, "sparse", variant=saved, block_size=4, top_k=1)
    state = plugin.state_dict()
    plugin.detach()
    other = attnlab.attach(tiny_llama.model, "sparse", block_size=4, top_k=1, **loading)
    with pytest.raises(PluginError, match=message):
        other.load_state_dict(state)
    other.detach()


# --- attnlab run: the distill block fits the indexer, the held-out sweep reads it ------------------

LOWRANK = {"name": "lowrank", "method": "sparse", "variant": "lowrank", "block_size": 8, "top_k": 1, "rank": 4,
           "distill": {"sequences": 3, "heldout": 2}}


def _run_config(method):
    from .test_sparse_distill import CFG
    return {**CFG, "name": "lowrank_run", "methods": [method]}


def test_the_distill_block_fits_saves_and_reports_the_indexer_against_quest_and_the_oracle(tmp_path):
    from attnlab.experiment import run_experiment
    logs = []
    res = run_experiment(_run_config(LOWRANK), out_root=tmp_path, log=logs.append)
    cell = res["cells"][0]
    assert any("fitting the rank-4 lowrank indexer from 3 training sequences" in line for line in logs)
    assert cell["train"]["steps"] == 0 and cell["train"]["tokens"] == 3 * 64
    read = {p["selector"] for p in cell["sparse_quality"]["points"].values()}
    assert {"lowrank", "quest", "oracle", "window"} <= read and not any(s.startswith("learned") for s in read)
    report = (tmp_path / "lowrank_run" / "report.md").read_text()
    assert "## Fitted lowrank indexer `lowrank` (seed 0)" in report and "| lowrank | quest |" in report
    bb = attnlab.load_backbone("tiny-llama")
    plugin = attnlab.load_plugin(bb.model, tmp_path / "lowrank_run" / "lowrank" / "seed0" / "plugin")
    assert all(layer.indexer.fitted for layer in plugin.layers())
    plugin.detach()


@pytest.mark.parametrize("method, message", [
    ({k: v for k, v in LOWRANK.items() if k != "distill"}, "variant lowrank is fitted, not trained: add distill:"),
    ({**LOWRANK, "distill": {"steps": 100}}, r"\['steps'\] train the learned gate; the lowrank indexer is fitted"),
    ({**LOWRANK, "train_modules": ["model.layers.0.mlp"]}, "train_modules are trained online, and a distill: block"),
])
def test_a_lowrank_method_without_a_fit_or_with_the_gates_recipe_or_train_modules_is_one_line(method, message):
    from attnlab.experiment import ConfigError, load_config
    with pytest.raises(ConfigError, match=message):
        load_config(_run_config(method))


@pytest.mark.parametrize("distill, message", [
    ({"sequences": 5, "heldout": 2}, "distill.sequences: 5 is above the 4 examples of the training split: use "
                                     "sequences: 4 or fewer, or raise data.n_train"),
    ({"sequences": 3, "heldout": 3}, "distill.heldout: 3 is above the 2 examples of the test split"),
])
def test_a_fit_or_sweep_asking_more_examples_than_the_split_holds_is_one_line_not_a_smaller_run(tmp_path, distill,
                                                                                               message):
    from attnlab.experiment import ConfigError, run_experiment
    logs = []
    with pytest.raises(ConfigError, match=message):
        run_experiment(_run_config({**LOWRANK, "distill": distill}), out_root=tmp_path, log=logs.append)
    assert not any("fitting the rank-4 lowrank indexer" in line for line in logs)


def test_attnlab_profile_times_the_lowrank_variant_with_an_indexer_fitted_on_random_tokens(tiny_llama):
    from attnlab.profile import profile
    rows = profile(tiny_llama.model, ["lowrank:top_k=1,block_size=8"], [64], modes=("inference", "decode"),
                   repeat=1, log=lambda *_: None)
    assert {r["mode"] for r in rows if r["seconds"] > 0} == {"inference", "decode"}
    assert tiny_llama.model.config._attn_implementation == "sdpa"       # the plug-in was detached after


def test_a_decoding_step_projects_only_the_keys_of_newly_completed_blocks(tiny):
    plugin = _calibrated(tiny, granularity="row")
    indexer = plugin.layers()[0].indexer
    projected, own = [], indexer.project
    indexer.project = lambda k: projected.append(k.shape[2]) or own(k)
    prompt = ids(26, batch=1, seed=3)
    with torch.no_grad():
        tiny.model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    # the last step sees 37 keys: 9 complete blocks of 4, each key of them projected once over the whole run
    assert sum(projected) == 36 and max(projected) == 24    # the prefill's 6 blocks, then one block at a time
    plugin.detach()


def test_the_page_store_projects_another_sequence_or_a_refitted_indexer_afresh_and_one_sequence_by_new_blocks():
    q, k = _random_qk()
    indexer, pages, projected = _full_rank(q, k), Pages("lowrank"), []
    own = indexer.project
    indexer.project = lambda keys: projected.append(keys.shape[2]) or own(keys)
    other = torch.randn_like(k)
    with torch.no_grad():
        def step(keys, t):      # a decoding step's call: one query row after t - 1 cached keys
            return pages.lowrank_keys(indexer, keys[:, :, :t], Pattern(1, t, 4, "cpu"))
        step(k, 41)
        assert torch.allclose(step(k, 49), own(k[:, :, :48])) and projected[-1] == 8     # blocks 10 and 11
        assert torch.allclose(step(other, 53), own(other[:, :, :52])) and projected[-1] == 52
        eye = torch.eye(16, dtype=torch.float64).expand(2, 16, 16)
        indexer.fit(eye, eye)                                                           # new weights, same sequence
        assert torch.allclose(step(other, 57), own(other[:, :, :56])) and projected[-1] == 56


def test_row_scores_are_each_blocks_log_mass_across_chunks_and_padding_and_a_row_seeing_nothing_is_minus_infinity(
        monkeypatch):
    from attnlab.modules.sparse import lowrank
    monkeypatch.setattr(lowrank, "CHUNK", 16)                          # 40 rows: three chunks
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    indexer = LowRankIndexer(16, 2, 4)
    indexer.wq.data.normal_(generator=g), indexer.wk.data.normal_(generator=g)
    base = (torch.arange(40)[None] <= torch.arange(40)[:, None]).expand(2, 1, 40, 40).clone()
    base[1, :, :, :6] = base[1, :, :6] = False                          # the second sequence left-padded by 6
    got = indexer.scores(q, k, Pattern(40, 40, 4, "cpu"), base, 0.3, block=False)     # (B, Hkv, G, 40, 10)
    qa = torch.einsum("bhgtd,hdr->bhgtr", q.view(2, 2, 2, 40, 16), indexer.wq)
    s = torch.einsum("bhgtr,bhxr->bhgtx", qa, indexer.project(k)) * 0.3
    want = s.masked_fill(~base[:, :, None], -torch.inf).view(2, 2, 2, 40, 10, 4).logsumexp(-1)
    assert torch.equal(got.isfinite(), want.isfinite()) and got[1, :, :, :6].isneginf().all()
    assert torch.allclose(got[want.isfinite()], want[want.isfinite()], atol=1e-5)
