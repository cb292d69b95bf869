"""One measured `prepare` run of bench_prepare.py, inside its own memory cgroup.

Imports and warms up what prepare uses (torch, the Numba kernels), records its baseline (cgroup
usage, or RSS without a cgroup) before the checkpoint is opened, caps the cgroup at baseline +
the allowance (cap_share x checkpoint bytes), then runs layout.pipeline.prepare with --memory = its RSS
then + the allowance. A sampler
thread reads RssAnon and the cgroup usage every 0.2 s; the stage is whatever layer pass (or prepare
step) runs at the time. Writes its figures as JSON.

    python bench/prepare_worker.py JOB.json
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "sparseflash" / "models" / "tiny-relu2"


def bench_params(shape):
    """prepare's defaults, with the shape's calibration and held-out token counts."""
    from sparseflash.layout.params import PrepareParams

    d = PrepareParams()
    if not shape.tokens:  # 0: prepare's defaults
        return d
    return replace(d, profile_tokens=shape.tokens, predictor_tokens=shape.tokens, heldout_tokens=shape.heldout,
                   cett_tokens=min(d.cett_tokens, shape.tokens))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Peak RssAnon and cgroup usage per stage; ``stage`` is set by the instrumented code."""

    def __init__(self, usage):
        super().__init__(daemon=True)
        self.usage, self.stage, self.stop = usage, "start", False
        self.partial = None  # a file for the peaks so far (written every 15 s)
        self.peaks: dict[str, dict] = {}
        self.order: list[str] = []
        self._lock = threading.Lock()

    def enter(self, stage: str) -> None:
        with self._lock:
            self.stage = stage
            if stage not in self.peaks:
                self.order.append(stage)
                self.peaks[stage] = {"anon": 0, "cgroup": 0, "seconds": 0.0, "since": time.perf_counter()}
            else:
                self.peaks[stage]["since"] = time.perf_counter()

    def leave(self) -> None:
        with self._lock:
            p = self.peaks.get(self.stage)
            if p is not None and p["since"] is not None:
                p["seconds"] += time.perf_counter() - p["since"]
                p["since"] = None

    def sample(self) -> None:
        anon, cg = _status("RssAnon"), self.usage() or 0
        with self._lock:
            p = self.peaks.get(self.stage)
            if p is not None:
                p["anon"], p["cgroup"] = max(p["anon"], anon), max(p["cgroup"], cg)

    def run(self):
        last = time.perf_counter()
        while not self.stop:
            self.sample()
            time.sleep(0.2)
            if self.partial is not None and time.perf_counter() - last > 15:  # figures so far, if the run is cut short
                last = time.perf_counter()
                with self._lock:
                    peaks = {s: {k: v for k, v in p.items() if k != "since"} for s, p in self.peaks.items()}
                tmp = f"{self.partial}.tmp"
                Path(tmp).write_text(json.dumps({"stage": self.stage, "peaks": peaks, "at": time.time()}, indent=1))
                os.replace(tmp, self.partial)


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    import torch
    from bench_prepare import Shape
    from memcap import V1, V2, MemoryCgroups

    from sparseflash.layout import calibration, stats
    from sparseflash.layout.coactivation import coactivation_stats
    from sparseflash.layout.pipeline import prepare
    from sparseflash.model.text import corpus_ids  # noqa: F401 (imported before the baseline)

    torch.set_num_threads(job["threads"])
    g = torch.Generator().manual_seed(0)  # warm-up: compile (or load) the Numba kernels before the baseline
    stats.CettCurve(torch.relu(torch.randn(64, 40, generator=g)), torch.randn(16, 40, generator=g), 20)
    coactivation_stats(np.packbits(np.eye(16, 40, dtype=bool), axis=1, bitorder="little"), 40, 4)

    spec = job.get("cgroup")
    cg = group = None
    if spec:
        cg = MemoryCgroups(Path(spec["parent"]), V1 if spec["version"] == 1 else V2)
        group = Path(spec["group"])
    usage = (lambda: cg.usage(group)) if cg else (lambda: _status("VmRSS"))  # noqa: E731
    baseline = usage()
    cap = baseline + job["allowance_bytes"]
    memory = _status("VmRSS") + job["allowance_bytes"]  # prepare's --memory: its own RSS baseline + the allowance
    if cg:
        cg.set_limit(group, cap)
    shape = Shape(**job["shape"])
    params = bench_params(shape)
    sampler = Sampler(usage)
    sampler.partial = f"{job['result']}.partial"
    sampler.start()

    original_init = calibration.LayerPass.__init__

    def init(self, source, streams, batch=8, desc="layer pass", *a, **k):  # each layer pass is a stage
        sampler.leave()
        sampler.enter("PPL-p% search" if desc.startswith("PPL at bound") else desc)
        original_init(self, source, streams, batch, desc, *a, **k)

    calibration.LayerPass.__init__ = init

    def log(msg: str) -> None:
        print(f"  [worker] {msg}", file=sys.stderr, flush=True)
        if msg.startswith("[prepare 3/3]"):  # the layout is written without a layer pass
            sampler.leave()
            sampler.enter("layout")

    result = {"baseline_bytes": baseline, "cap_bytes": cap, "memory_arg_bytes": memory, "params": params.__dict__}
    t0, c0 = time.perf_counter(), time.process_time()
    sampler.enter("hash + plan")
    try:
        prepare(job["checkpoint"], BUNDLED / "calibration.txt.zst", BUNDLED / "heldout.txt.zst", job["out"], params,
                quiet=False, log=log, memory=memory)
    except Exception as e:  # recorded, then the run ends with a failure code
        result["error"] = f"{type(e).__name__}: {e}"
    sampler.leave()
    sampler.stop = True
    sampler.sample()
    result["total_seconds"] = time.perf_counter() - t0
    result["cpu_seconds"] = time.process_time() - c0
    out = Path(job["out"])
    plan_file = out / "memory_plan.json"
    result["plan"] = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    tokens = _tokens(params, shape)
    result["stages"] = [{"stage": s, "seconds": p["seconds"], "anon_peak_bytes": p["anon"],
                         "cgroup_peak_bytes": p["cgroup"] if cg else None, "tokens": tokens.get(s, 0)}
                        for s, p in sampler.peaks.items()]
    result["ru_maxrss_bytes"] = _status("VmHWM")
    prof = out / "profile" / "profile.json"
    if prof.exists():
        result["profile_seconds"] = json.loads(prof.read_text()).get("timing")
    preds = out / "predictors" / "predictors.json"
    if preds.exists():  # the predictors stage's training time, apart from its passes over the layers
        result["predictor_train_seconds"] = json.loads(preds.read_text()).get("train_seconds")
    tmp = f"{job['result']}.tmp"
    Path(tmp).write_text(json.dumps(result, indent=1))
    os.replace(tmp, job["result"])
    sys.exit(1 if "error" in result else 0)


def _tokens(p, shape) -> dict:
    """Tokens each stage moves through the model (counted once per pass over the layers)."""
    from sparseflash.layout.params import ProfileParams

    held = p.heldout_tokens // ProfileParams.ctx * ProfileParams.ctx
    ppl_steps = ProfileParams.ppl_steps
    return {"threshold sample": min(p.cett_tokens, p.profile_tokens) + held,
            "PPL-p% search": ppl_steps * held, "calibration": p.profile_tokens,
            "predictors": p.predictor_tokens + 4 * held}


if __name__ == "__main__":
    main(sys.argv[1])
