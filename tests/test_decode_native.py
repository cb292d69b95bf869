"""The native decode path (model/decode_native.py, kernels/attention.py) equals the torch path of the
forward, for every family, for float32 and half matrices, on one thread and split across threads."""

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, make_hf_model, save_hf_model

from sparseflash.kernels import attention
from sparseflash.model import decode_native
from sparseflash.model.checkpoint import load_checkpoint
from sparseflash.model.decode_native import NativeDecode
from sparseflash.model.transformer import KVCache, Transformer
from sparseflash.model.weights import LayerWeights, ModelWeights


def _decode(net: Transformer, ids: torch.Tensor, native: bool) -> torch.Tensor:
    """Logits of a 6-token prompt, then of each later token decoded one at a time."""
    net.native_decode = native
    cache = KVCache(net.config, ids.shape[1])
    out = [net(ids[:, :6], cache=cache, start=0)]
    out += [net(ids[:, i : i + 1], cache=cache, start=i) for i in range(6, ids.shape[1])]
    return torch.cat(out, dim=1)


def _halved(w: ModelWeights, dtype) -> ModelWeights:
    """The same weights with every matrix but the FFN's in ``dtype`` (as a layout may hold them)."""
    conv = lambda t: t if t is None or t.dim() != 2 else t.to(dtype)  # noqa: E731
    layers = [LayerWeights(**{f.name: (getattr(layer, f.name) if f.name.startswith(("w_up", "w_gate", "w_down"))
                                       else conv(getattr(layer, f.name))) for f in dataclasses.fields(layer)})
              for layer in w.layers]
    return ModelWeights(w.embed, layers, w.final_norm_w, w.final_norm_b, conv(w.lm_head))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    ckpt = load_checkpoint(save_hf_model(make_hf_model(request.param), tmp_path_factory.mktemp(request.param)))
    return request.param, ckpt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_decode_equals_torch_path(family, dtype, monkeypatch):
    name, ckpt = family
    net = Transformer(ckpt.config, ckpt.weights if dtype == torch.float32 else _halved(ckpt.weights, dtype))
    ids = torch.randint(0, 4096, (1, 30), generator=torch.Generator().manual_seed(5))
    NativeDecode.warm()  # compiles through attention.attend once per process: not a decode call to count
    calls = []
    real = attention.attend
    monkeypatch.setattr(attention, "attend", lambda *a: calls.append(1) or real(*a))
    native = _decode(net, ids, True)
    assert len(calls) == 24 * ckpt.config.num_layers  # every decoded token, every layer, took the native path
    reference = _decode(net, ids, False)
    # float32: sums in another order; half: torch rounds the input to half before a half matrix, the kernel does
    # not (measured on these models: at most 2.4e-7, 4.9e-4 and 4.4e-3 of the largest logit)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    assert (native - reference).abs().max().item() <= tol * reference.abs().max().item(), name


def test_threaded_projections_equal_one_thread(monkeypatch):
    """Large matrices are split by rows across threads: the same sums, so the same result."""
    rng = np.random.default_rng(0)
    d, heads, kv_heads, hd, slots = 256, 8, 2, 32, 16
    mats = [rng.standard_normal(s).astype(np.float16).view(np.uint16)
            for s in ((heads * hd, d), (kv_heads * hd, d), (kv_heads * hd, d), (d, heads * hd))]
    biases = [rng.standard_normal(m.shape[0]).astype(np.float32) for m in mats]
    proj = tuple(x for pair in zip(mats, biases) for x in pair)
    cos, sin = np.cos(np.arange(16, dtype=np.float32)), np.sin(np.arange(16, dtype=np.float32))

    def run():
        kc = rng.standard_normal((kv_heads, slots, hd)).astype(np.float32)
        vc = kc[::-1].copy()
        h = np.linspace(-1, 1, d, dtype=np.float32)
        attention.attend(h.copy(), h, proj, kc, vc, 9, 2, heads, hd, cos, sin, hd**-0.5,
                         attention.Scratch(d, heads * hd, kv_heads * hd, slots))
        return h, kc[:, 9].copy()

    state = rng.bit_generator.state
    one = run()
    rng.bit_generator.state = state
    monkeypatch.setattr(attention, "thread_count", lambda rows, row_len: 2)
    split = run()
    assert np.array_equal(one[0], split[0]) and np.array_equal(one[1], split[1])


def test_attend_refuses_a_slot_outside_the_cache():
    kc = np.zeros((1, 4, 4), np.float32)
    w = np.zeros((4, 4), np.float32)
    none = np.zeros(0, np.float32)
    with pytest.raises(ValueError, match="outside the KV cache"):
        attention.attend(np.ones(4, np.float32), np.ones(4, np.float32),
                         (w, none, w, none, w, none, w, none), kc, kc.copy(), 4, 0, 1, 4,
                         np.ones(2, np.float32), np.zeros(2, np.float32), 0.5, attention.Scratch(4, 4, 4, 4))


def test_large_float16_layers_go_the_torch_way(tmp_path, monkeypatch):
    """Above F16_MAX_BYTES of float16 projections torch's product is faster: the forward does not take the
    native path there; float32 matrices of the same size still do."""
    ckpt = load_checkpoint(save_hf_model(make_hf_model("nemotron"), tmp_path))
    ids = torch.randint(0, 4096, (1, 9), generator=torch.Generator().manual_seed(1))
    NativeDecode.warm()
    calls = []
    real = attention.attend
    monkeypatch.setattr(attention, "attend", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(decode_native, "F16_MAX_BYTES", 1024)  # smaller than any layer here
    _decode(Transformer(ckpt.config, _halved(ckpt.weights, torch.float16)), ids, True)
    assert not calls
    _decode(Transformer(ckpt.config, ckpt.weights), ids, True)
    assert len(calls) == 3 * ckpt.config.num_layers
