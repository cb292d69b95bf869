"""Lazy checkpoint access: equals eager loading tensor by tensor, runs the dense reference exactly,
and refuses incomplete or inconsistent checkpoints with one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import EVAL_CORPUS, make_hf_model, save_hf_model

from sparseflash.errors import CheckpointError
from sparseflash.model.checkpoint import load_checkpoint
from sparseflash.model.layerwise import perplexity_layerwise
from sparseflash.model.loader import open_dense
from sparseflash.model.perplexity import perplexity
from sparseflash.model.source import LazyLayers, open_source
from sparseflash.model.text import corpus_ids
from sparseflash.tools.cli import main

FAMILIES = ("nemotron", "llama-silu", "arcee-yarn")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    return request.param, hf, save_hf_model(hf, tmp_path_factory.mktemp(request.param), shard_size="200KB")


def test_lazy_tensors_equal_eager_ones(family):
    _, _, folder = family
    assert (folder / "model.safetensors.index.json").exists()  # sharded, with an index
    eager = load_checkpoint(folder).weights.named()
    with open_source(folder) as source:
        assert len(source.tensors) == len(eager) - (1 if source.tied else 0)  # a tied head is the embedding
        for name, want in eager.items():
            got = source.tensor(source.head_name if name == "lm_head" else name)
            assert got.dtype == torch.float32 and torch.equal(got, want), name
        for i in range(source.config.num_layers):  # a layer read alone holds what the whole model holds
            layer = source.layer(i)
            for field, t in layer.named().items():
                assert torch.equal(t, eager[f"layers.{i}.{field}"]), (i, field)


def test_dense_forward_over_the_lazy_checkpoint_equals_transformers(family):
    name, hf, folder = family
    model = open_dense(folder, lazy=True)
    assert isinstance(model.weights.layers, LazyLayers)
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    diff = (model.transformer()(ids) - ref).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
    assert len(model.weights.layers._kept) == 1  # one layer held at a time


def test_layerwise_perplexity_equals_the_batched_forward(family):
    _, _, folder = family
    ids = torch.randint(0, 4096, (700,), generator=torch.Generator().manual_seed(2)).tolist()
    want = perplexity(open_dense(folder).transformer(), ids, ctx=64, batch=4)
    with open_source(folder) as source:
        got = perplexity_layerwise(source, ids, ctx=64, batch=4)
    assert (got.tokens, got.windows) == (want.tokens, want.windows)
    assert got.nll == pytest.approx(want.nll, rel=1e-6)


def test_bf16_checkpoint_is_read_in_its_stored_dtype_and_widened_exactly(tmp_path):
    hf = make_hf_model("llama-relu").to(torch.bfloat16)
    folder = save_hf_model(hf, tmp_path / "bf16")
    with open_source(folder) as source:
        assert {t["type"] for t in source.tensor_list()} == {"BF16"}
        stored = source.tensor("layers.1.w_up", dtype=None)
        assert stored.dtype == torch.bfloat16
        assert torch.equal(source.layer(1).w_up, stored.float())
        assert source.layer_bytes(torch.float32) == 2 * source.stored_layer_bytes()


def test_bundled_model_eval_ppl_cli_runs_layer_by_layer(capsys):
    assert main(["eval-ppl", "--text", str(EVAL_CORPUS), "--tokens", "1024", "--ctx", "128", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model = open_dense(None)
    want = perplexity(model.transformer(), corpus_ids(EVAL_CORPUS, model.tokenizer, 2048), ctx=128, max_tokens=1024)
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-5)


# --- checkpoint validation -----------------------------------------------------------------------------


def _one_line_error(capsys, folder, needle):
    capsys.readouterr()
    assert main(["info", "-m", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.fixture
def sharded(tmp_path):
    return save_hf_model(make_hf_model("llama-relu"), tmp_path / "m", shard_size="200KB")


def test_missing_shard_listed_in_the_index(sharded, capsys):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (sharded / victim).unlink()
    _one_line_error(capsys, sharded, f"{victim}: safetensors shard listed in model.safetensors.index.json is missing")


def test_shard_lacking_a_tensor_the_index_places_there(sharded, capsys):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name, shard = next((n, s) for n, s in index["weight_map"].items() if "layers.1.mlp.up_proj" in n)
    tensors = load_file(sharded / shard)
    del tensors[name]
    save_file(tensors, sharded / shard, metadata={"format": "pt"})
    _one_line_error(capsys, sharded, f"lacks tensor '{name}', which model.safetensors.index.json places there")


def _rewrite_single(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def single(tmp_path):
    return save_hf_model(make_hf_model("llama-relu"), tmp_path / "s")


def test_layers_beyond_the_config_are_refused(single, capsys):
    def extra_layer(t):
        for name in [n for n in t if n.startswith("model.layers.1.")]:
            t[name.replace("layers.1.", "layers.2.")] = t[name].clone()

    _rewrite_single(single, extra_layer)
    _one_line_error(capsys, single, "has 3 layers of tensors but config says 2")


def test_missing_and_misshapen_tensors_are_named(single, capsys):
    _rewrite_single(single, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    _one_line_error(capsys, single, "tensor 'model.layers.1.self_attn.k_proj.weight' is missing")
    _rewrite_single(single, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(3, 64)}))
    _one_line_error(capsys, single, "tensor 'model.layers.1.self_attn.k_proj.weight' has shape (3, 64), expected (32, 64)")


def test_non_finite_weights_are_refused_when_their_layer_is_read(single, capsys):
    def poison(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")

    _rewrite_single(single, poison)
    with open_source(single) as source:  # headers are fine: opening works, layer 0 too
        source.layer(0)
        with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.down_proj.weight' has 1 non-finite"):
            source.layer(1)
    capsys.readouterr()
    assert main(["run", "-m", str(single), "-n", "2", "--greedy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0], err
