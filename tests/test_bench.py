"""The benchmark package (bench/): bytes formulas, timer, CSV schema, memory, and a tiny run end to end."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases, e2e, harness, micro, models, plot, report, runs  # noqa: E402
from bench.__main__ import main as bench_main  # noqa: E402

SHAPE = (2, 8, 4, 4)            # N = 256 elements, B*C = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny timed calls stay fast and steady when other processes load the CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- bytes that must move ------------------------------------------------------------------------


@pytest.mark.parametrize("name, fwd, bwd", [
    ("channel_scale", (256 + 16) + 256, (256 + 256 + 16) + (256 + 16)),   # x, a -> y; dy, x, a -> dx, da
    ("channel_mean", 256 + 16, 16 + 256),                                  # x -> m; dm -> dx
    ("coord_scale", (256 + 64 + 64) + 256, (256 + 256 + 64 + 64) + (256 + 64 + 64)),   # a_h, a_w: B*C*H
])
def test_bytes_of_ops(name, fwd, bwd):
    case = cases.op_case(name)
    assert case.bytes(SHAPE, torch.float32, "forward") == 4 * fwd
    assert case.bytes(SHAPE, torch.float32, "backward") == 4 * bwd
    assert case.bytes(SHAPE, torch.float32, "forward+backward") == 4 * (fwd + bwd)
    assert case.bytes(SHAPE, torch.bfloat16, "forward") == 2 * fwd


def test_bytes_of_modules():
    n = 256
    simam = cases.module_case("SimAM")
    assert simam.bytes(SHAPE, torch.float32, "forward") == 4 * 2 * n                 # read x, write y
    assert simam.bytes(SHAPE, torch.float32, "backward") == 4 * 3 * n                # read dy, x; write dx
    se = cases.module_case("SqueezeExcite+residual")
    built = se.build((2, 32, 4, 4), "cpu", torch.float32)
    params = (32 * 2 + 2 + 2 * 32 + 32) * 4                                         # fc1, fc2 (C=32, hidden 2)
    assert built.param_bytes == params
    N = 2 * 32 * 16
    assert se.bytes((2, 32, 4, 4), torch.float32, "forward", params) == 4 * 3 * N + params       # x, r -> y
    assert se.bytes((2, 32, 4, 4), torch.float32, "backward", params) == 4 * 4 * N + 2 * params  # dy, x -> dx, dr


def test_every_fast_module_is_a_case():
    import fastattn

    names = cases.module_names()
    assert set(fastattn.FAST_MODULES) <= set(names)
    for name in fastattn.FAST_MODULES:
        built = cases.module_case(name).build((2, 64, 7, 7), "cpu", torch.float32)
        assert built.fast is not None and isinstance(built.fast, type(built.eager))


# ---- timer, buffers, memory ----------------------------------------------------------------------


def test_quantile():
    assert harness.quantile([5, 1, 3, 2, 4], 0.5) == 3
    assert harness.quantile([1, 2, 3, 4, 5], 0.2) == pytest.approx(1.8)


def test_timer_gives_sane_stats_and_rotates():
    seen, cleared = [], []
    timer = harness.Timer("cpu", harness.Budget(0.0, 0.01, 7, 50))
    stats = timer(lambda k: seen.append(k) or sum(range(200)), n_buffers=3, before=cleared.append)
    assert 7 <= stats.reps <= 50
    assert 0 < stats.p20_ms <= stats.median_ms <= stats.p80_ms < 100
    assert set(seen) == {0, 1, 2} and len(cleared) == len(seen)


def test_buffers_exceed_the_cache(monkeypatch):
    monkeypatch.setattr(harness, "llc_bytes", lambda device: 32 * harness.MiB)
    assert harness.n_buffers(8 * harness.MiB, "cpu") == 8
    assert harness.n_buffers(2 ** 30, "cpu") == 1
    assert harness.n_buffers(1, "cpu") == 64


def test_llc_is_read():
    assert harness.llc_bytes("cpu") >= 256 * 1024


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(1000, requires_grad=True)
    assert harness.saved_bytes(lambda: x * x) == 4000            # x saved twice, counted once
    assert harness.saved_bytes(lambda: (x * x).exp()) == 8000    # + the result of exp


# ---- CSV -----------------------------------------------------------------------------------------


def _row(**kw):
    row = dict(kind="op", name="channel_scale", provider="eager", mode="forward", dtype="fp32", layout="nchw",
               shape="2x8x4x4", median_ms=1.5, p20_ms=1.25, p80_ms=2.0, gbps=10.0, pct_roofline=50.0, peak_mb=None,
               **harness.environment("cpu"))
    row.update(kw)
    return row


def test_csv_schema_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "r.csv")
    harness.append_rows(path, [_row()])
    harness.append_rows(path, [_row(provider="fastattn", peak_mb=3.0)])
    with open(path) as f:
        assert f.readline().strip().split(",") == harness.COLUMNS
    rows = harness.read_rows(path)
    assert len(rows) == 2 and list(rows[0]) == harness.COLUMNS
    for r in rows:
        for c in ("median_ms", "p20_ms", "p80_ms", "gbps", "pct_roofline"):
            assert isinstance(r[c], float)
        assert all(isinstance(r[c], str) for c in harness.COLUMNS if c not in harness.FLOAT_COLUMNS)
    assert rows[0]["peak_mb"] is None and rows[1]["peak_mb"] == 3.0
    assert rows[0]["median_ms"] == 1.5 and rows[1]["provider"] == "fastattn"


def test_csv_refuses_another_schema(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("op,ms\nx,1\n")
    with pytest.raises(RuntimeError, match="has columns"):
        harness.append_rows(str(path), [_row()])


def test_device_slug_is_a_file_name():
    slug = harness.device_slug("cpu")
    assert slug.startswith("cpu-") and "/" not in slug and " " not in slug


# ---- runs ----------------------------------------------------------------------------------------


def test_tiny_run_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "r.csv")
    code = bench_main(["--quick", "--op", "channel_scale", "--module", "SqueezeExcite", "--shape", "2x16x8x8",
                       "--dtype", "fp32", "--layout", "nchw", "--provider", "eager,fastattn",
                       "--mode", "forward,forward+backward", "--no-e2e", "--out", out])
    assert code == 0
    rows = harness.read_rows(out)
    assert [r["kind"] for r in rows] == ["copy"] + ["op"] * 4 + ["module"] * 4
    assert {(r["name"], r["provider"], r["mode"]) for r in rows[1:]} == {
        (n, p, m) for n in ("channel_scale", "SqueezeExcite") for p in ("eager", "fastattn-cpu")
        for m in ("forward", "forward+backward")}
    for r in rows[1:]:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["pct_roofline"] > 0 and r["shape"] == "2x16x8x8"
        assert (r["peak_mb"] is None) == (r["mode"] == "forward")
    table = capsys.readouterr().out
    assert "SqueezeExcite" in table and "forward+backward" in table and "x " in table


def test_e2e_runner_and_overhead():
    import fastattn

    rows, attns = [], ["SqueezeExcite", "SimAM"]
    settings = e2e.E2ESettings("cpu", [e2e.ModelConfig("mobilenet", 1, 32)], attns,
                               [micro.Provider("eager"), micro.Provider("fastattn", "auto")], ["fp32"], ["nchw"],
                               ["inference", "train"], harness.Budget(0.0, 0.0, 2, 3, min_warmup=1))
    skips = micro.Skips(stream=open(os.devnull, "w"))
    e2e.E2ERunner(settings, harness.environment("cpu"), rows.append, skips, lambda msg, k=1: None).run()
    want = {("mobilenet", "eager")} | {(f"mobilenet+{a}", "eager") for a in attns}
    want |= {(f"mobilenet+{a}", "fastattn") for a in attns if a in fastattn.FAST_MODULES}
    assert {(r["name"], r["provider"]) for r in rows} == want
    assert all(r["mode"] in ("inference", "train") and r["median_ms"] > 0 for r in rows)
    for a in attns:
        assert (a in fastattn.FAST_MODULES) != any(k[1] == f"mobilenet+{a}" for k in skips.seen)
    ovh = report.overheads(rows)
    assert ("mobilenet+SqueezeExcite", "fastattn", "train", "fp32", "nchw", "1x3x32x32") in ovh
    assert "%)" in report.model_table(rows)


def test_models():
    import fastattn.reference as ref

    net = models.resnet50()
    assert sum(p.numel() for p in net.parameters()) == 25_557_032                  # torchvision's resnet50

    se = models.resnet50(lambda c: ref.SqueezeExcite(c))
    assert sum(isinstance(m, ref.SqueezeExcite) for m in se.modules()) == 16
    assert all(b.fuse_residual for b in se.blocks)
    assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    assert models.mobilenet(lambda c: ref.ECA(c))(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def _results():
    rows = []
    for provider, ms in (("eager", 4.0), ("compile", 2.0), ("fastattn", 1.0)):
        rows.append(_row(kind="module", name="SqueezeExcite", provider=provider, median_ms=ms, pct_roofline=10 / ms))
    for name, provider, ms in (("resnet50", "eager", 10.0), ("resnet50+SqueezeExcite", "eager", 12.0),
                               ("resnet50+SqueezeExcite", "fastattn", 11.0)):
        rows.append(_row(kind="model", name=name, provider=provider, mode="train", shape="2x3x64x64", median_ms=ms,
                         gbps=None, pct_roofline=None))
    return rows


def test_tables_and_plot_data():
    rows = _results()
    assert "1 ms 4.00x/2.00x 10%" in report.micro_table(rows)
    assert "4.00x/2.00x 10%" in report.micro_summary(rows)
    ovh = report.overheads(rows)
    assert ovh[("resnet50+SqueezeExcite", "fastattn", "train", "fp32", "nchw", "2x3x64x64")] == pytest.approx(0.1)
    assert ovh[("resnet50+SqueezeExcite", "eager", "train", "fp32", "nchw", "2x3x64x64")] == pytest.approx(0.2)
    assert plot.speedups(rows)[("SqueezeExcite", "compile", "forward", "fp32", "nchw", "2x8x4x4")] == 2.0
    assert report.summary_stats(rows)[("SqueezeExcite", "forward")]["eager"] == pytest.approx(4.0)


def test_median_over_runs_table():
    """bench.runs: each provider's time is the median over the runs; a cell slower than compile
    is listed."""
    rows = []
    for eager, compiled, fast in ((4.0, 1.0, 2.0), (8.0, 3.0, 2.5), (6.0, 1.5, 1.0)):
        for provider, ms in (("eager", eager), ("compile", compiled), ("fastattn-cpu", fast)):
            rows.append(_row(kind="module", name="CBAM", provider=provider, median_ms=ms, pct_roofline=40.0))
    rows.append(_row(kind="module", name="CBAM", provider="eager", shape="2x8x8x8", median_ms=1.0))
    table, slower = runs.median_table(rows, ["2x8x4x4"])
    assert table[2] == "| CBAM | 2x8x4x4 | forward | 6.00 | 1.50 | 2.00 | 3.00x | 0.75x | 40% |"
    assert len(table) == 3 and slower == ["CBAM 2x8x4x4 forward: 3.00x / 0.75x"]


class _StubPlt:
    """Stands in for matplotlib.pyplot: checks the plotting code's indexing without drawing."""

    def __init__(self):
        from unittest import mock

        self.mock = mock
        self.saved = []

    def subplots(self, nrows, ncols, **kw):
        fig = self.mock.MagicMock()
        fig.savefig.side_effect = lambda path, **k: self.saved.append(path)
        return fig, [[self.mock.MagicMock() for _ in range(ncols)] for _ in range(nrows)]

    def close(self, fig):
        pass


def test_plot_functions_with_a_stub(tmp_path):
    rows = _results()
    plt = _StubPlt()
    plot.plot_case(plt, rows, "SqueezeExcite", str(tmp_path / "se.png"))
    assert plot.plot_summary(plt, rows, str(tmp_path / "s.png"))
    assert plot.plot_overhead(plt, rows, str(tmp_path / "o.png"))
    assert len(plt.saved) == 3


def test_fastattn_bench_delegates(monkeypatch):
    import bench
    import fastattn.__main__ as fmain

    got = []
    monkeypatch.setattr(bench, "run_fastattn_bench", lambda argv: got.append(argv) or 0)
    assert fmain.main(["bench", "--quick", "--no-e2e"]) == 0
    assert got == [["--quick", "--no-e2e"]]


def test_gpu_providers_are_skipped_with_reasons_on_cpu():
    rows, skips = [], micro.Skips(stream=open(os.devnull, "w"))
    settings = micro.Settings("cpu", [(2, 16, 4, 4)], ["fp32"], ["nchw"], ["forward"],
                              [micro.Provider("fastattn-triton", "triton"), micro.Provider("fastattn-cuda", "cuda")],
                              harness.Budget(0.0, 0.0, 2, 3))
    runner = micro.Runner(settings, harness.environment("cpu"), 10.0, rows.append, skips, lambda msg, k=1: None)
    runner.run([cases.op_case("channel_scale"), cases.module_case("SqueezeExcite")])
    assert rows == []
    reasons = {(p, n): r for p, n, r in skips.seen}
    assert "CUDA" in reasons[("fastattn-triton", "channel_scale")]
    assert "CUDA" in reasons[("fastattn-cuda", "SqueezeExcite")]
