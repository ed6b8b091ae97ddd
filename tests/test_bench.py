"""The speed benchmark's plumbing on a tiny model: every figure present, positive and finite;
its FLOP counts against torch's own counter; the machine description it records.

Timings and ratios are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scan_core.evaluation import bench, kernels, machine, roofline
from scan_core.model.kv_cache import KVCache
from scan_core.model.network import SLOT_CODE, Transformer
from scan_core.sampling import sampler as sampler_module
from scan_core.sampling.raster import raster_generate
from scan_core.sampling.sampler import ScanSampler, run_all
from scan_core.sampling.settings import SamplerSettings

SMALL = {"num_steps": 4, "num_rounds": 2, "tokens_per_round": 2}
CASES = ("raster", "scan_t0", "scan_t30", "scan_t30_exact", "scan_t30_lookahead")
POSITIVE = (
    "raster_s",
    "scan_t0_s",
    "scan_t30_s",
    "scan_t30_exact_s",
    "scan_t30_lookahead_s",
    "speedup_t0",
    "speedup_t30",
    "speedup_t30_exact",
    "speedup_t30_lookahead",
    "step_s",
    "round_s",
    "round_over_step",
    "round_over_step_lookahead",
    "round_over_step_cpu",
    "step_over_floor",
    "raster_step_over_floor",
    "round_over_floor",
    "step_over_roofline",
    "raster_step_over_roofline",
    "round_over_roofline",
    "step_roofline_s",
    "raster_step_roofline_s",
    "round_roofline_s",
    "step_gflop",
    "raster_step_gflop",
    "round_gflop",
    "floor_s",
    "bandwidth_gbps",
    "peak_gflops",
    "ridge_rows",
    "weight_bytes",
    "peak_memory_mb",
    "parameters",
)


@pytest.fixture(scope="module")
def figures():
    settings = SamplerSettings(**SMALL)
    return bench.run_benchmark(tiny_config(), repeats=1, settings=settings, matmul_size=128)


def test_every_figure_is_present_positive_and_finite(figures):
    for key in POSITIVE:
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    for name in CASES:
        assert figures["forwards"][name] > 0
        assert 0 < figures["network_fraction"][name] <= 1.0 + 1e-6
    assert figures["forwards"]["raster"] == 16  # one forward per code of the 4x4 grid
    assert figures["forwards"]["scan_t0"] == SMALL["num_steps"] + 1  # + the scoring chunk
    assert figures["forwards"]["scan_t30_lookahead"] == SMALL["num_steps"] + 1 + 2 + 1
    assert set(figures["cache_bytes"]) == set(figures["speedup_cpu"]) == set(CASES[1:])
    assert all(math.isfinite(v) and v > 0 for v in figures["speedup_cpu"].values())
    assert figures["device"] == "cpu" and figures["dtype"] == "float32"
    assert figures["machine"]["cpu"]["logical_cpus"] > 0 and figures["machine"]["torch"]
    json.dumps(figures, allow_nan=False)  # the CLI's last line must be strict JSON


def test_the_roofline_floor_is_never_below_the_bandwidth_floor(figures):
    for prefix in ("raster_step", "step", "round"):
        assert 0 <= figures["compute_bound"][prefix] <= 1
        assert math.isfinite(figures["over_roofline_cpu"][prefix])
        assert figures["over_roofline_cpu"][prefix] > 0
        over_bandwidth = figures["over_bandwidth_floor"][prefix]
        assert figures[f"{prefix}_over_roofline"] <= over_bandwidth * (1 + 1e-9), prefix
    assert figures["step_roofline_s"] >= figures["floor_s"]
    assert figures["over_bandwidth_floor"]["step"] == pytest.approx(figures["step_over_floor"])
    # a cached round runs two forwards; round_over_floor counts one
    assert figures["over_bandwidth_floor"]["round"] == pytest.approx(
        figures["round_over_floor"] / 2
    )


def test_report_names_every_case_the_roofline_and_the_machine(figures):
    report = bench.format_report(figures)
    assert all(name in report for name in CASES)
    assert "x roofline" in report and figures["machine"]["cpu"]["model"] in report


@pytest.mark.parametrize(
    "changes, batch",
    [
        ({}, 1),
        ({"context": "exact"}, 1),
        ({"cfg_scale": 1.0}, 2),
        ({"num_rounds": 0}, 1),
        ({"lookahead": True}, 1),
    ],
)
def test_planned_cache_matches_the_samplers_allocation(monkeypatch, changes, batch):
    """The bench reports the size of the one cache a real generation allocates."""
    made = []

    class RecordedCanvas(sampler_module.Canvas):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sampler_module, "Canvas", RecordedCanvas)
    config = tiny_config()
    settings = SamplerSettings(**SMALL, cfg_scale=2.0).replace(**changes)
    run_all(ScanSampler(Transformer(config).eval()).generate([1] * batch, settings))
    planned = bench.planned_cache_bytes(config, settings, batch, torch.float32)
    assert len(made) == 1 and made[0].cache.nbytes() == planned


def test_random_model_is_fully_materialised_and_frozen():
    config = tiny_config()
    model = bench.build_random_model(config)
    assert model.num_parameters() == Transformer(config).num_parameters()
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())
    assert model.dis_output.weight.abs().sum() > 0  # a quality head that discriminates


def test_compile_falls_back_to_eager_with_a_message(monkeypatch):
    # Compilation is lazy, so a backend failure surfaces in the warm-up; simulate one there
    # (and skip importing the compiler stack, which alone takes seconds).
    monkeypatch.setattr(torch, "compile", lambda function, **_: function)
    model = bench.build_random_model(tiny_config())
    runs = []

    def warm_up():
        runs.append("compiled" if "forward" in vars(model) else "eager")
        if runs[-1] == "compiled":
            raise RuntimeError("no C compiler found\nmore detail")

    status = bench.warm_up_model(model, warm_up, compile_model=True)
    assert status.startswith("torch.compile failed") and "no C compiler found" in status
    assert "\n" not in status and runs == ["compiled", "eager"]
    assert "forward" not in vars(model)  # the class's eager forward is back
    assert bench.warm_up_model(model, warm_up, compile_model=False).startswith("eager")


def test_cli_last_line_is_the_json_summary(monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_CONFIG", tiny_config())
    argv = ["--quick", "--num-steps", "4", "--num-rounds", "2", "--tokens-per-round", "2"]
    argv += ["--device", "cpu", "--prepack"]
    assert bench.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    assert {"raster_s", "scan_t0_s", "scan_t30_s", "speedup_t0", "speedup_t30"} <= set(figures)
    assert {"step_over_roofline", "step_over_floor", "machine"} <= set(figures)
    linears = 5 * tiny_config().n_layer + 2  # qkv, wo, w1, w2, w3 per block; two heads
    assert figures["kernels"] == f"oneDNN, {linears} linears pre-packed"


def counted_flops(run) -> int:
    """Matmul FLOPs torch counts for ``run()``, attention included (the math kernel is made of
    matmuls; the fused CPU kernel is not counted by FlopCounterMode)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "batch, length, capacity, mask_width",
    [(1, 5, None, None), (2, 3, 20, 12), (2, 4, 9, None), (4, 1, 16, 7)],
)
def test_network_flops_match_torchs_count(batch, length, capacity, mask_width):
    config = tiny_config()
    model = Transformer(config).eval()
    kinds = torch.full((batch, length), SLOT_CODE)
    values = torch.randint(0, config.vocab_size, (batch, length))
    cells = torch.arange(length).repeat(batch, 1)
    cache = positions = mask = None
    if capacity is not None:
        cache = KVCache.allocate(config, batch, capacity)
        positions = torch.arange(length)
    if mask_width is not None:
        mask = torch.ones(1, length, mask_width, dtype=torch.bool)

    with torch.inference_mode():
        hidden = model(kinds, values, cells, mask, cache, positions)
        counted = counted_flops(lambda: model(kinds, values, cells, mask, cache, positions))
        head = counted_flops(lambda: model.token_logits(hidden[:, :2]))
    keys = roofline.attended_keys(length, mask, capacity)
    assert keys == (mask_width or capacity or length)
    assert counted == roofline.network_flops(config, batch * length, keys)
    assert head == roofline.linear_flops(batch * min(2, length), config.dim * config.vocab_size)


@pytest.mark.parametrize("cfg_scale", [4.0, 1.0])
def test_recorded_step_flops_match_torchs_count_step_by_step(cfg_scale):
    """Every step's recorded FLOPs (forwards and heads, CFG rows included) equal a direct count
    of that step: generation, the scoring chunk, refinement rounds and exact rebuilds."""
    model = bench.build_random_model(tiny_config())
    timer = roofline.NetworkTimer(model, torch.device("cpu"))
    settings = SamplerSettings(**SMALL, cfg_scale=cfg_scale, context="exact")
    stream = ScanSampler(model).generate([1], settings)
    counts, recorded, kinds = [], [], []
    while True:
        step = []
        counts.append(counted_flops(lambda s=step: s.append(next(stream, None))))
        if step[0] is None:
            break
        recorded.append(sum(timer.take()))
        kinds.append(step[0][1].kind)
    assert counts[-1] == 0 and recorded == counts[:-1]
    assert {"generate", "score", "refine"} <= set(kinds)


def test_raster_flops_count_two_rows_per_forward_under_cfg():
    config = tiny_config()
    model = bench.build_random_model(config)
    timer = roofline.NetworkTimer(model, torch.device("cpu"))
    settings = SamplerSettings(**SMALL, cfg_scale=4.0)
    counted = counted_flops(lambda: raster_generate(model, torch.tensor([1]), settings))
    head = roofline.linear_flops(2, config.dim * config.vocab_size)  # cond + null class
    expected = [roofline.network_flops(config, 2, i + 1) + head for i in range(16)]
    assert timer.calls == expected and sum(expected) == counted


def test_roofline_seconds_takes_the_larger_floor_of_each_forward():
    # 100 bytes at 10 B/s: 10 s to stream; 1 FLOP/s: forwards of 5 and 20 FLOPs take 5 and 20 s
    assert roofline.roofline_seconds([5, 20], 100, 10.0, 1.0) == 10 + 20
    config = tiny_config()
    per_row = roofline.network_flops(config, 1, 0)
    rows = roofline.ridge_rows(config, 4 * per_row, 4.0, 1.0)  # 4 bytes per FLOP of a row
    assert rows == pytest.approx(1.0)


X86 = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 hypervisor

processor\t: 1
model name\t: another model
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes sve i8mm bf16
CPU implementer\t: 0x41
"""


def test_cpu_description_reads_model_and_vector_extensions():
    x86 = machine.cpu_description(X86)
    assert x86["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert (x86["family"], x86["model_number"]) == ("6", "143")
    assert x86["vector_extensions"] == [
        "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"
    ]  # fmt: skip
    arm = machine.cpu_description(ARM)
    assert arm["vector_extensions"] == ["asimd", "sve", "bf16", "i8mm"] and arm["family"] is None
    line = machine.describe_machine(machine.machine_description() | {"cpu": x86})
    assert "Platinum 8480+ (family 6 model 143)" in line and "amx_bf16" in line


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roofs_are_positive_and_finite(dtype):
    cpu = torch.device("cpu")
    peak = machine.measure_matmul_peak(cpu, dtype, size=64, repeats=1)
    bandwidth = machine.measure_bandwidth(1 << 20, 64, cpu, dtype, repeats=1)
    assert math.isfinite(peak) and peak > 0 and math.isfinite(bandwidth) and bandwidth > 0


@pytest.mark.skipif(not kernels.onednn_available(), reason="no oneDNN in this torch build")
def test_prepacked_linears_match_f_linear_and_keep_the_state_dict():
    config = tiny_config()
    model = bench.build_random_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slots = (
        torch.full((2, 5), SLOT_CODE),
        torch.randint(0, 64, (2, 5)),
        torch.arange(5).repeat(2, 1),
    )
    with torch.inference_mode():
        expected = model.token_logits(model(*slots))
        assert kernels.prepack_linears(model) == 5 * config.n_layer + 2
        packed = model.token_logits(model(*slots))
    torch.testing.assert_close(packed, expected, rtol=1e-4, atol=1e-5)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    del model.output.forward  # the class's forward is back
    assert "forward" not in vars(model.output) and "forward" in vars(model.layers[0].attention.wo)


def test_cli_both_dtypes_reports_each_and_their_ratio(monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_CONFIG", tiny_config())
    argv = ["--quick", "--num-steps", "4", "--num-rounds", "2", "--tokens-per-round", "2"]
    assert bench.main([*argv, "--device", "cpu", "--dtype", "both"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["float32"]["dtype"] == "float32" and figures["bfloat16"]["dtype"] == "bfloat16"
    for name, ratio in figures["bf16_speedup"].items():
        fp32, bf16 = figures["float32"][f"{name}_s"], figures["bfloat16"][f"{name}_s"]
        assert ratio == pytest.approx(fp32 / bf16)
    assert any(line.startswith("bfloat16 against float32") for line in lines)
