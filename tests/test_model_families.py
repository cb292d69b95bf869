"""Every supported family loads from a transformers-saved folder and matches transformers exactly."""

import pytest
import torch
from tiny_models import FAMILIES, TINY_RELU2, make_hf_model, save_hf_model, to_old_config_layout

from sparseflash.model.checkpoint import load_checkpoint
from sparseflash.model.generate import Sampling, generate
from sparseflash.model.tokenizer import TextTokenizer
from sparseflash.model.transformer import Transformer


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    folder = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, folder


def test_logits_match_transformers(family):
    name, hf, folder = family
    ckpt = load_checkpoint(folder)
    model = Transformer(ckpt.config, ckpt.weights)
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    diff = (model(ids) - ref).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"


def test_greedy_generation_matches_transformers(family):
    name, hf, folder = family
    ckpt = load_checkpoint(folder)
    model = Transformer(ckpt.config, ckpt.weights)
    prompt = torch.randint(0, 4096, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = generate(model, prompt, 32, Sampling(greedy=True), stop_at_eos=False).tokens
    assert ours == _hf_greedy(hf, prompt, 32), name


def test_kv_cache_decode_equals_full_forward(family):
    _, _, folder = family
    ckpt = load_checkpoint(folder)
    model = Transformer(ckpt.config, ckpt.weights)
    from sparseflash.model.transformer import KVCache

    ids = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    cache = KVCache(ckpt.config, 20)
    step = [model(ids[:, :5], cache=cache, start=0)]
    step += [model(ids[:, i : i + 1], cache=cache, start=i) for i in range(5, 20)]
    assert (torch.cat(step, dim=1) - full).abs().max().item() <= 1e-4


def test_old_config_layout_and_shards_load_identically(tmp_path):
    hf = make_hf_model("nemotron")
    new = load_checkpoint(save_hf_model(hf, tmp_path / "new"))
    old_folder = save_hf_model(hf, tmp_path / "old", shard_size="100KB")
    assert (old_folder / "model.safetensors.index.json").exists()
    to_old_config_layout(old_folder)
    old = load_checkpoint(old_folder)
    assert old.config == new.config
    ids = torch.arange(30)[None]
    assert torch.equal(Transformer(old.config, old.weights)(ids), Transformer(new.config, new.weights)(ids))


def test_yarn_old_layout_matches(tmp_path):
    hf = make_hf_model("arcee-yarn")
    folder = save_hf_model(hf, tmp_path / "m")
    to_old_config_layout(folder)
    ckpt = load_checkpoint(folder)
    assert ckpt.config.rope_scaling["rope_type"] == "yarn"
    ids = torch.arange(100)[None] % 4096
    with torch.no_grad():
        ref = hf(ids).logits
    assert (Transformer(ckpt.config, ckpt.weights)(ids) - ref).abs().max().item() <= 1e-4


def test_tiny_relu2_greedy_continuation_matches_transformers():
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(TINY_RELU2, dtype=torch.float32).eval()
    ckpt = load_checkpoint(TINY_RELU2)
    tok = TextTokenizer.from_file(ckpt.tokenizer_path)
    prompt = tok.encode("The :mod:`os` module provides a portable way of")
    ours = generate(Transformer(ckpt.config, ckpt.weights), prompt, 32, Sampling(greedy=True), stop_at_eos=False)
    assert ours.tokens == _hf_greedy(hf, prompt, 32)
    assert len(tok.decode(ours.tokens)) > 0
