"""prepare's memory bound: the plan it prints, what it lowers under --memory, the refusal, and the
layer held as stored and widened on use (exact)."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY_RELU2

from sparseflash.errors import SparseflashError
from sparseflash.layout.memory_plan import MIN_CETT_TOKENS, SPILL_BYTES, fit_plan, plan_prepare
from sparseflash.layout.params import PredictorParams, PrepareParams, TrainParams
from sparseflash.layout.predictor_training import rank_candidates
from sparseflash.model.layerwise import LayerwiseModel, WidenedLayer
from sparseflash.model.source import open_source
from sparseflash.tools.cli import main

PARAMS = PrepareParams(profile_tokens=8192, cett_tokens=4096, heldout_tokens=1024, predictor_tokens=8192)
BASE = 200 << 20


def test_the_plan_adds_up_and_names_its_peak_stage():
    with open_source(TINY_RELU2) as source:
        plan = plan_prepare(source, PARAMS, baseline=BASE)
        c = source.config
    assert plan.peak == BASE + max(plan.total(s) for s in plan.stages)
    assert plan.total(plan.peak_stage) >= sum(plan.stages[plan.peak_stage].values())
    sample = plan.stages["threshold sample"]["sample activations"]
    assert sample >= 2 * 4096 * c.intermediate_size * 4  # the sample's activations and their magnitudes
    assert plan.batch == 8 and plan.lowered == ()
    assert "expected peak memory" in plan.text() and plan.to_dict()["peak"] == plan.peak


def test_a_limit_lowers_the_batch_then_spills_then_the_sample():
    with open_source(TINY_RELU2) as source:
        full = plan_prepare(source, PARAMS, baseline=BASE)
        assert fit_plan(source, PARAMS, full.peak, baseline=BASE) == full  # fits: nothing lowered
        smaller = fit_plan(source, PARAMS, full.peak - 1, baseline=BASE)
        assert smaller.peak < full.peak and smaller.lowered
        assert smaller.batch < 8 or smaller.lowered == ("one predictor training at a time",)
        big = PrepareParams(profile_tokens=65536, cett_tokens=65536, heldout_tokens=1024, predictor_tokens=8192)
        floor = plan_prepare(source, big, baseline=BASE, spill_bytes=8 << 20, batch=1, cett_tokens=MIN_CETT_TOKENS,
                             train_jobs=1)
        last = fit_plan(source, big, floor.peak, baseline=BASE)
        assert last.peak <= floor.peak and last.batch == 1 and last.spill_bytes is not None
        assert MIN_CETT_TOKENS <= last.cett_tokens < 65536 and any("threshold sample" in s for s in last.lowered)
        with pytest.raises(SparseflashError, match=r"prepare needs about .* more than --memory"):
            fit_plan(source, big, floor.peak - 1, baseline=BASE)


def test_two_trainings_side_by_side_are_planned_twice_and_lowered_to_one_first():
    SMALL = PrepareParams(profile_tokens=1024, cett_tokens=1024, heldout_tokens=256, predictor_tokens=8192)
    with open_source(TINY_RELU2) as source:
        c = source.config
        d, n = c.hidden_size, c.intermediate_size
        # the largest rank the rank choice tries, twice: a layer's rank spread by active share is at most that
        rank = 2 * rank_candidates(d, n, c.ffn_param_count(), PredictorParams())[-1]
        training = 14 * TrainParams.batch * n * 4 + 4 * rank * (d + n + 1) * 4  # one training's working set
        one = plan_prepare(source, SMALL, baseline=BASE, batch=1, train_jobs=1)
        two = plan_prepare(source, SMALL, baseline=BASE, batch=1, train_jobs=2)
        phase = "batch, training or scoring"
        assert one.stages["predictors"][phase] == training  # at one window a batch, training is the largest phase
        assert two.stages["predictors"][phase] == 2 * training
        assert two.train_jobs == 2 and one.train_jobs == 1 and two.to_dict()["train_jobs"] == 2
        assert two.peak_stage == "predictors"
        # a limit the two-job plan at one window a batch misses by a byte: the training is lowered to one,
        # with the largest batch that then fits (no larger one does, nor two trainings at it); nothing is spilled
        limit = two.peak - 1
        lowered = fit_plan(source, SMALL, limit, baseline=BASE)
        assert lowered.train_jobs == 1 and lowered.spill_bytes is None and lowered.peak <= limit
        assert "one predictor training at a time" in lowered.lowered
        assert plan_prepare(source, SMALL, baseline=BASE, batch=lowered.batch, train_jobs=2).peak > limit
        for b in (8, 4, 2, 1):
            if b > lowered.batch:
                assert plan_prepare(source, SMALL, baseline=BASE, batch=b, train_jobs=1).peak > limit


def test_prepare_refuses_a_memory_limit_it_cannot_meet_before_reading_weights(tmp_path, capsys):
    texts = TINY_RELU2 / "calibration.txt.zst"
    code = main(["prepare", "-m", str(TINY_RELU2), "--corpus", str(texts), "--memory", "64MB", "-o", str(tmp_path / "p"),
                 "--tokens", "2048"])
    assert code == 2
    err = capsys.readouterr().err
    assert "prepare needs about" in err and "--memory 61.04 MiB" in err and "Traceback" not in err
    assert not (tmp_path / "p" / "profile").exists()


def test_a_widened_bf16_layer_computes_what_the_float32_layer_computes(tmp_path):
    folder = tmp_path / "bf16"
    folder.mkdir()
    for f in TINY_RELU2.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, folder / f.name)
        elif f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    with open_source(folder) as source:
        model = LayerwiseModel(source, batch=2)
        cos, sin = model._rope(32)
        h = torch.randn(2, 32, source.config.hidden_size, generator=torch.Generator().manual_seed(0))
        stored = source.layer(1, dtype=None)
        assert stored.w_up.dtype == torch.bfloat16
        widened = model.block(1, WidenedLayer(stored), h, cos, sin)
        eager = model.block(1, source.layer(1), h, cos, sin)
    assert np.array_equal(widened.numpy(), eager.numpy())


def test_many_small_held_out_streams_go_to_files_when_memory_is_short():
    """Held-out streams under SPILL_BYTES stay in memory at the first spill step; a limit that only
    spilling every stream meets gets every stream spilled (spill_bytes 0) before the threshold sample
    is cut, and a plan that says so."""
    small = PrepareParams(profile_tokens=1024, cett_tokens=1024, heldout_tokens=512, predictor_tokens=2048)
    with open_source(TINY_RELU2) as source:
        some = plan_prepare(source, small, baseline=BASE, spill_bytes=SPILL_BYTES, batch=1, train_jobs=1)
        every = plan_prepare(source, small, baseline=BASE, spill_bytes=0, batch=1, train_jobs=1)
        assert every.stages["predictors"]["hidden states"] == 0 < some.stages["predictors"]["hidden states"]
        assert every.peak < some.peak  # the calibration stream (1,024 tokens, under SPILL_BYTES) is the peak's
        fitted = fit_plan(source, small, every.peak, baseline=BASE)
        assert fitted.spill_bytes == 0 and fitted.cett_tokens == 1024
        assert "every stream's hidden states in temporary files" in fitted.text()
