"""Decoding-time formulas: a decoding step takes the longer of reading the weights and the host's
step; CPU inference is priced at the dtype it answers in; llama.cpp's and transformers' CPU decoding
against timings measured on three CPUs (tests/data/estimate) and the last `make bench` decode run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from toolkit.estimate import timing as T
from toolkit.estimate.catalog import lookup


def test_decode_takes_the_longer_of_reading_the_weights_and_the_host_step():
    # 2 GB at 4 TB/s: 0.5 ms a token, under an 11-ms host step
    assert T.decode_tokens_per_s(2e9, 4e12, host_step_s=0.011) == pytest.approx(1 / 0.011)
    # a 4-GB/s CPU: reading the weights (0.5 s) is the longer
    assert T.decode_tokens_per_s(2e9, 4e9, host_step_s=0.011) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        T.decode_tokens_per_s(2e9, 4e12, host_step_s=-1.0)


def test_cpu_inference_is_timed_at_the_fp32_rate_it_answers_in(monkeypatch):
    """A native-bf16 CPU trains in bf16 but answers in fp32 (capability.choose_dtype): an
    inference estimate prices its prefill at the fp32 rate, a training one at bf16's."""
    from toolkit.cli import main
    from toolkit.core import calibration, capability as C
    from toolkit.estimate import timeplan

    cal = calibration.Calibration(key="test", device="cpu test", matmul_flops={"float32": 200e9, "bfloat16": 800e9},
                                  bandwidth_bytes_per_s=20e9, seconds=1.0, torch="test")
    cap = C.Capability(kind="cpu", name="test", isa="avx512_bf16", native_bf16=True, physical_cores=2)
    monkeypatch.setattr(timeplan, "host_capability", lambda hw=None: cap)
    monkeypatch.setattr(calibration, "load", lambda c: cal)
    assert timeplan.rates_here(purpose="infer").flops == 200e9
    assert timeplan.rates_here().flops == 800e9
    seen = []
    real = timeplan.time_fields
    monkeypatch.setattr(timeplan, "time_fields", lambda m, est, rates, **kw: seen.append(rates) or real(m, est, rates, **kw))
    for task in ("inference", "lora"):
        assert main(["estimate", "--model", "embedded", "--task", task, "--json"]) == 0
    assert [(r.dtype, r.flops) for r in seen] == [("float32", 200e9), ("bfloat16", 800e9)]


def test_llama_cpp_cpu_decode_against_timings_on_three_cpus():
    """llama.cpp's CPU decode step: the weights read at CPU_DECODE_READ_OVER_PROBE x the probe, a time a
    layer, and block-quantized types' dot products (LLAMA_CPP_SECONDS_PER_QUANT_WEIGHT). Against the
    measured medians it was fitted to (two 2-core EPYC guests, two model sizes, five types:
    tests/data/estimate/llama_cpp_decode.csv) within 25%, and against the Zen 5's two timings, which
    the fit did not see, within 15%. The model before the fit (the probe's rate, 0.11 ms a layer) misses
    the same medians by over 30% (the 1B's f16 on the Zen 4)."""
    import csv
    import statistics

    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields

    rows = list(csv.DictReader((Path(__file__).resolve().parents[1] / "data" / "estimate" / "llama_cpp_decode.csv").open()))
    assert len(rows) == 20 and {r["type"] for r in rows} == {"f16", "q8_0", "q4_k_m", "q4_0", "q4_1"}
    worst_before = worst = 0.0
    for r in rows:
        est = estimate(r["model"], "inference", r["type"], seq_len=64, device="cpu")
        assert est.backend == "llama.cpp"
        rates = Rates("cpu", 200e9, float(r["probe_gb_s"]) * 1e9, r["cpu"], "float32")
        modelled = time_fields(lookup(r["model"]), est, rates, targets=())["decode_tokens_per_s"]
        measured = 1e3 / statistics.median([float(r["ms_round1"]), float(r["ms_round2"])])
        assert modelled == pytest.approx(measured, rel=0.25 if r["in_fit"] == "yes" else 0.15), r
        before = 1.0 / (est.components["weights"] / rates.bandwidth_bytes_per_s + 0.00011 * lookup(r["model"]).layers)
        worst_before, worst = max(worst_before, abs(before / measured - 1)), max(worst, abs(modelled / measured - 1))
    assert worst_before > 0.3 > 0.25 > worst
    # The parts, by hand for the 1B's q4_k_m on the Zen 3: 0.80 GB at 1.45 x 23.7 GB/s, 16 layers, 1.24e9 weights.
    m = lookup("meta-llama/Llama-3.2-1B")
    assert m.linear_params() + m.vocab * m.hidden == pytest.approx(1.236e9, rel=1e-3)
    assert T.cpu_decode_step_seconds(m, "llama.cpp", "q4_k_m") == pytest.approx(16 * 0.00016 + 1.236e9 * 7.9e-12, rel=1e-3)
    assert T.cpu_decode_step_seconds(m, "llama.cpp", "F16") == pytest.approx(16 * 0.00016)
    assert T.cpu_decode_read_rate(23.7e9, "llama.cpp") == pytest.approx(34.365e9)
    assert T.cpu_decode_read_rate(23.7e9, "transformers") == 23.7e9


def test_cpu_decoding_adds_per_layer_work_to_the_weights_read():
    """A CPU decoding step is the weights read at the bandwidth plus the per-layer work on the same
    cores (CPU_DECODE_SECONDS_PER_LAYER): at the weight-read rate the transformers constant was fitted
    under (35.4 GB/s, the Zen 5), the model reads that CPU's last `bench decode` greedy rates
    (benchmarks/results.json) within 30% (the fit: within 25%; the host's speed moves between runs),
    where reading alone had the transformers loop 1.3x too fast or more. llama.cpp's constants were
    fitted on two other CPUs (the test above)."""

    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields

    from benchmarks import run

    # The last run on a native-bf16 CPU (the Zen 5's, where the constant was fitted); an AVX2 CPU's is kept apart.
    rows = run.latest(run.load(Path(__file__).resolve().parents[2] / "benchmarks" / "results.json"), "decode",
                      "avx512_bf16")["rows"]
    greedy = {r["comparison"]: r["ours_tok_s"] for r in rows if r["settings"] == "greedy"}
    measured = {"fp32": greedy["ours (transformers) vs model.generate"], "f16": greedy["ours (llama.cpp) vs create_completion"]}
    m = lookup("embedded")
    rates = Rates("cpu", 492.6e9, 35.4e9, "the Zen 5's calibration", "float32")
    for quant, tok_s in measured.items():
        est = estimate(m, "inference", quant, seq_len=91, device="cpu")
        modelled = time_fields(m, est, rates, targets=())["decode_tokens_per_s"]
        assert modelled == pytest.approx(tok_s, rel=0.3), quant
        if quant == "fp32":  # the toolkit's own loop (chat, generate): reading alone was far off
            assert T.decode_tokens_per_s(est.components["weights"], rates.bandwidth_bytes_per_s) > 1.25 * tok_s
    with pytest.raises(ValueError):
        T.decode_tokens_per_s(1e9, 1e9, serial_step_s=-1.0)


def test_the_transformers_backends_host_work_follows_the_calibrations_probe():
    """Where the calibration timed this CPU's decoding host work (`probes.host_layer_seconds`), a
    transformers step's per-layer work is CPU_DECODE_HOST_OVER_PROBE x that, in place of the Zen 5's
    constant; llama.cpp's fitted constants stay (its host work is its own C++); unmeasured, the constant."""
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields

    m = lookup("embedded")
    assert T.cpu_decode_step_seconds(m, "transformers", "fp32", 0.0004) == pytest.approx(30 * 1.80 * 0.0004)
    assert T.cpu_decode_step_seconds(m, "transformers", "fp32") == pytest.approx(30 * 0.00022)
    assert T.cpu_decode_step_seconds(m, "llama.cpp", "F16", 0.0004) == pytest.approx(30 * 0.00016)
    with pytest.raises(ValueError, match="host_layer_s"):
        T.cpu_decode_step_seconds(m, "transformers", "fp32", -1e-4)
    # Through the planner: the Zen 3's calibration (25.2 GB/s read, 0.39 ms a layer probed, 2026-12-06): the
    # embedded model's 30 layers at 1.80 x 0.39 ms beside its weights' read; 21.8-23 tok/s measured there.
    est = estimate(m, "inference", "fp32", seq_len=512, batch=1, device="cpu")
    assert est.backend == "transformers"
    zen3 = Rates("cpu", 181e9, 25.2e9, "test", "float32", host_layer_s=0.00039)
    read = T.decode_bytes_per_token(est.components["weights"], 2 * m.layers * m.kv_dim * 4, 512) / 25.2e9
    def decode(rates):
        return time_fields(m, est, rates, targets=())["decode_tokens_per_s"]

    assert decode(zen3) == pytest.approx(1 / (read + 30 * 1.80 * 0.00039), rel=1e-3)
    assert 20 < decode(zen3) < 26
    assert decode(dataclasses.replace(zen3, host_layer_s=0.0)) > 30  # the Zen 5's constant
