"""Compression plugins in the dense model: exactness at ratio 1, the causal rule, the KV cache, files."""

import pytest
import torch
from tiny_models import make_hf_model, save_hf_model

from sparseflash.model.checkpoint import checkpoint_hash
from sparseflash.model.generate import (
    Sampling,
    continuation_logits,
    decode_one,
    generate,
    new_generation_cache,
)
from sparseflash.model.loader import open_dense
from sparseflash.model.plugin import (
    CompressionPlugin,
    PluginError,
    PluginSpec,
    load_plugin,
    read_plugin_file,
    save_plugin,
    select_plugin,
)


@pytest.fixture(scope="module", params=["nemotron", "mistral-silu", "llama-relu"])
def dense(request, tmp_path_factory):
    """(dense model, source hash) of a tiny random checkpoint (mistral-silu has a sliding window of 12)."""
    folder = save_hf_model(make_hf_model(request.param), tmp_path_factory.mktemp(request.param))
    return open_dense(folder), checkpoint_hash(folder)


def random_plugin(ratio: int, hidden: int, layer: int = 0, tail: int = 4, source: str = "", seed: int = 0,
                  rope: str = "last") -> CompressionPlugin:
    """A plugin with every parameter perturbed (so that it is not the mean)."""
    torch.manual_seed(seed)
    plugin = CompressionPlugin(PluginSpec(ratio, layer, hidden, tail, rank=8, rope=rope, source_hash=source))
    with torch.no_grad():
        for p in plugin.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return plugin.eval().requires_grad_(False)


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 4096, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_identity_plugin_at_ratio_1_reproduces_uncompressed_logits_exactly(dense):
    model, _ = dense
    tf = model.transformer()
    identity = CompressionPlugin(PluginSpec(1, 0, model.config.hidden_size, tail=3)).eval()
    ids = _ids(40, batch=2)
    plain_cache, packed_cache = tf.new_cache(48, 2), new_generation_cache(tf, 40, 48, 2, identity)
    plain = [tf(ids, cache=plain_cache)]
    packed = [tf(ids, cache=packed_cache, plugin=identity)]
    assert packed_cache.compressed  # the compressed path ran (slots and masks from key positions)
    for i, token in enumerate(_ids(8, batch=2, seed=1).T):  # decode steps past the window of 12
        plain.append(tf(token[:, None], cache=plain_cache, start=40 + i))
        packed.append(tf(token[:, None], cache=packed_cache, start=40 + i))
    assert torch.equal(torch.cat(plain, 1), torch.cat(packed, 1))


def test_one_call_over_prompt_and_continuation_equals_prefill_then_cached_continuation(dense):
    """Training runs prompt + continuation in one call; generation prefills, then uses the KV cache."""
    model, _ = dense
    tf = model.transformer()
    plugin = random_plugin(3, model.config.hidden_size, tail=5)
    ids = _ids(50, batch=2)
    cached, cache = continuation_logits(tf, ids, 38, plugin)
    one = tf.differentiable_forward(ids[:, :-1], plugin=plugin, groups=plugin.groups(38))
    assert plugin.groups(38) == 11 and one.shape[1] == 49 - 11 * 2
    assert (one[:, -12:] - cached).abs().max().item() <= 1e-4
    assert [cache.shift[i] for i in range(2)] == [0, 22]


@pytest.mark.parametrize("rope", ["last", "mean"])
def test_a_compressed_vector_sees_only_its_group_and_earlier_tokens(dense, rope):
    model, _ = dense
    tf = model.transformer()
    plugin = random_plugin(4, model.config.hidden_size, tail=4, rope=rope)
    ids = _ids(36)
    changed = ids.clone()
    changed[0, 13] = (changed[0, 13] + 1) % 4096  # a token of group 3 (positions 12..15)
    a, b = tf(ids, plugin=plugin), tf(changed, plugin=plugin)  # rows: 8 groups, then the 4-token tail
    assert torch.equal(a[:, :3], b[:, :3])
    assert (a[:, 3:] - b[:, 3:]).abs().amax(-1).min().item() > 0


def test_compressed_kv_cache_holds_fewer_slots_and_decodes_to_the_context_limit(dense):
    model, _ = dense
    tf = model.transformer()
    plugin = random_plugin(4, model.config.hidden_size, tail=4)
    limit = model.config.max_position_embeddings
    prompt = _ids(100)[0].tolist()
    out = generate(tf, prompt, limit - 100, Sampling(greedy=True), stop_at_eos=False, plugin=plugin)
    assert len(out.tokens) == limit - 100
    assert out.compression == {"ratio": 4, "layer": 0, "prompt_positions": 100, "compressed_positions": 100 - 24 * 3}
    cache = new_generation_cache(tf, 100, limit, plugin=plugin)
    plain = tf.new_cache(limit)
    assert cache.capacity == [limit, limit - 72] and cache.nbytes < plain.nbytes
    tf(torch.tensor([prompt]), cache=cache, last_only=True, plugin=plugin)
    decode_one(tf, cache, 7)
    per_slot = plain.nbytes // (2 * limit)
    assert cache.used_nbytes == (101 + 101 - 72) * per_slot


def test_save_load_round_trip(tmp_path):
    plugin = random_plugin(4, 32, layer=1, tail=6, source="abc123", rope="mean")
    plugin.quality = {"ppl_rise": {"64": 0.01}}
    path = tmp_path / "x4.plugin.safetensors"
    save_plugin(plugin, path)
    back = load_plugin(path, "abc123", num_layers=3, hidden_size=32)
    assert back.spec == plugin.spec and back.quality == plugin.quality
    for (name, a), (_, b) in zip(plugin.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    groups = torch.randn(2, 5, 4, 32)
    assert torch.equal(plugin(groups), back(groups))
    assert not list(tmp_path.glob("*.tmp-*"))


def _corrupt_variants(tmp_path, good):
    from safetensors.torch import save_file

    raw = good.read_bytes()
    tensors = {k: v.clone() for k, v in read_plugin_file(good)[1].items()}
    meta = read_plugin_file(good)[0]
    import json
    from dataclasses import asdict

    def with_meta(name, **change):
        m = {"kind": "sparseflash-plugin", "version": 1, **asdict(meta.spec), **change}
        save_file(tensors, tmp_path / name, metadata={"sparseflash": json.dumps(m)})
        return tmp_path / name

    (tmp_path / "truncated").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage").write_bytes(b"\x00\x13" * 300)
    save_file(tensors, tmp_path / "no-metadata")
    bad_shape = dict(tensors, mix=torch.zeros(3, 32))
    save_file(bad_shape, tmp_path / "bad-shape", metadata={"sparseflash": json.dumps(
        {"kind": "sparseflash-plugin", "version": 1, **asdict(meta.spec)})})
    nan = dict(tensors, mix=torch.full_like(tensors["mix"], float("nan")))
    save_file(nan, tmp_path / "nan", metadata={"sparseflash": json.dumps(
        {"kind": "sparseflash-plugin", "version": 1, **asdict(meta.spec)})})
    return {
        "truncated": (tmp_path / "truncated", "truncated or corrupt"),
        "garbage": (tmp_path / "garbage", "truncated or corrupt"),
        "no-metadata": (tmp_path / "no-metadata", "not a sparseflash plugin"),
        "version": (with_meta("version", version=2), "format version 2"),
        "ratio": (with_meta("ratio", ratio="two"), "'ratio'"),
        "bad-shape": (tmp_path / "bad-shape", "tensor 'mix'"),
        "nan": (tmp_path / "nan", "NaN"),
        "missing": (tmp_path / "nowhere.plugin.safetensors", "not found"),
    }


def test_foreign_or_corrupt_plugin_is_refused_with_one_line(tmp_path):
    good = tmp_path / "good.plugin.safetensors"
    save_plugin(random_plugin(2, 32, source="aaaa"), good)
    with pytest.raises(PluginError, match="trained on checkpoint aaaa, this model is bbbb"):
        load_plugin(good, "bbbb")
    with pytest.raises(PluginError, match="hidden size 32, model hidden size 64"):
        load_plugin(good, "aaaa", hidden_size=64)
    with pytest.raises(PluginError, match="the model has 1 layers"):
        load_plugin(good, "aaaa", num_layers=1)
    for name, (path, message) in _corrupt_variants(tmp_path, good).items():
        with pytest.raises(PluginError, match=message) as e:
            load_plugin(path, "aaaa")
        assert len(str(e.value).splitlines()) == 1 and str(path) in str(e.value), name


def _with_quality(ratio, rises, kl=0.01):
    p = random_plugin(ratio, 16, tail=4)
    p.quality = {"ppl_rise": {str(n): r for n, r in rises.items()}, "kl": {str(n): kl for n in rises}}
    return p


def test_auto_picks_the_largest_ratio_within_the_bound_for_the_prompt_length():
    x2 = _with_quality(2, {64: 0.001, 256: 0.004})
    x4 = _with_quality(4, {64: 0.05, 256: 0.015})
    x8 = _with_quality(8, {64: 0.09, 256: 0.06})
    plugins = [x8, x2, x4]
    assert select_plugin(plugins, 40) is None  # under the 64-token minimum
    assert select_plugin(plugins, 100) is x2  # x4's rise at 64 tokens is 5%
    assert select_plugin(plugins, 300) is x4  # measured at 256: within 2%; x8 is not
    assert select_plugin(plugins, 300, bound=0.10) is x8
    assert select_plugin([x8], 300) is None
    assert select_plugin([_with_quality(2, {128: 0.0})], 100) is None  # nothing measured that short
    short = _with_quality(2, {32: 0.0})
    assert select_plugin([short], 40) is None and select_plugin([short], 40, min_prompt=32) is short


def test_auto_also_bounds_the_change_of_the_model_s_own_continuations():
    """A plugin within the held-out perplexity bound whose KL to the uncompressed run is large is not picked."""
    x2 = _with_quality(2, {64: 0.0}, kl=0.0275)  # exp(KL) - 1 = 2.8%
    x8 = _with_quality(8, {64: -0.015}, kl=0.045)  # held-out perplexity even falls; 4.6% on its own text
    assert select_plugin([x2, x8], 300) is x2
    assert select_plugin([x8], 300) is None and select_plugin([x8], 300, self_bound=0.05) is x8
    unmeasured = random_plugin(4, 16, tail=4)
    unmeasured.quality = {"ppl_rise": {"64": 0.0}}  # trained before the KL was recorded
    assert select_plugin([unmeasured], 300) is None


def test_group_positions_follow_the_rotary_rule_and_the_causal_rule():
    last, mean = (random_plugin(4, 16, tail=3, rope=r) for r in ("last", "mean"))
    assert last.groups(11) == 2 and last.groups(6) == 0
    rope, key_pos = last.positions(2, 11)
    assert rope.tolist() == [3, 7, 8, 9, 10] and key_pos.tolist() == [3, 7, 8, 9, 10]
    rope, key_pos = mean.positions(2, 11)
    assert rope.tolist() == [1.5, 5.5, 8, 9, 10] and key_pos.tolist() == [3, 7, 8, 9, 10]
