"""bench/report.py (the generated performance table of docs/benchmarks.md) and the `fastrob bench` command."""

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.common import COLUMNS  # noqa: E402
from fastrob import cli  # noqa: E402

DEVICE = "Test GPU 9000"


def _row(op, provider, metric, median, shape="8x3x4x4"):
    return {
        "op": op,
        "provider": provider,
        "shape": shape,
        "dtype": "float32",
        "metric": metric,
        "median": median,
        "p20": median,
        "p80": median,
        "device": DEVICE,
        "torch": "2.13.0",
        "triton": "3.9.0",
        "date": "2026-01-02",
    }


def _write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def setup(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _write(
        results / "test-gpu.csv",
        [
            _row("copy", "torch", "gbps", 100.0, shape="1GiB"),
            # time: fastrob 2 ms vs eager 8 ms -> 4x faster; 80 GB/s = 80% of copy
            _row("pgd_step_linf", "eager", "time_ms", 8.0),
            _row("pgd_step_linf", "eager", "gbps", 20.0),
            _row("pgd_step_linf", "triton", "time_ms", 2.0),
            _row("pgd_step_linf", "triton", "gbps", 80.0),
            # throughput: fastrob 300 img/s vs torchattacks 100 img/s -> 3x faster
            _row("pgd10", "torchattacks", "images_per_s", 100.0),
            _row("pgd10", "fastrob", "images_per_s", 300.0),
            # reference under another op, with peak memory
            _row("input_gradient_exact", "input_grad_reference_eager", "ms", 10.0),
            _row("input_gradient_exact", "input_grad_reference_eager", "peak_rss_rise_mib", 40.0),
            _row("input_gradient_fd", "input_grad_fd", "ms", 20.0),
            _row("input_gradient_fd", "input_grad_fd", "peak_rss_rise_mib", 30.0),
        ],
    )
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Benchmarks\n\n## Results\n\ntext\n\n{report.START}\nold table 1.23x\n{report.END}\n\n## Next\n")
    return results, page


def _lines(page, op):
    return [line for line in page.read_text().splitlines() if line.startswith(f"| {op} |")]


def test_ratio_direction_and_bandwidth_column(setup):
    results, page = setup
    assert report.main(["--results", str(results), "--page", str(page)]) == 0
    (step,) = _lines(page, "pgd_step_linf")
    cells = [c.strip() for c in step.strip("|").split("|")]
    assert cells[3:5] == ["triton", "eager"]
    assert cells[7:10] == ["4.00x", "80", "80%"]
    (pgd,) = _lines(page, "pgd10")
    assert "| 3.00x |" in pgd  # a rate: fastrob / reference, not reference / fastrob
    (fd,) = _lines(page, "input_gradient_fd")
    assert "| 0.50x |" in fd and "30 / 40" in fd  # a time: reference / fastrob; memory from the reference's op
    assert "old table" not in page.read_text()
    assert page.read_text().endswith(f"{report.END}\n\n## Next\n")
    assert (results / "speedup.png").stat().st_size > 1000


def test_replacement_is_idempotent_and_check_detects_stale(setup, capsys):
    results, page = setup
    args = ["--results", str(results), "--page", str(page)]
    assert report.main(args + ["--check"]) == 1  # the placeholder is stale
    report.main(args)
    once = page.read_text()
    report.main(args)
    assert page.read_text() == once
    assert once.count(report.START) == 1 and once.count(report.END) == 1
    assert report.main(args + ["--check"]) == 0
    # a new measurement makes the table stale again, and --check writes nothing
    with (results / "test-gpu.csv").open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=COLUMNS).writerow(_row("pgd10", "fastrob", "images_per_s", 500.0))
    assert report.main(args + ["--check"]) == 1
    assert page.read_text() == once
    report.main(args)
    (pgd,) = _lines(page, "pgd10")
    assert "| 5.00x |" in pgd  # the last row of a measurement wins


def test_missing_markers_is_an_error(setup):
    results, page = setup
    page.write_text("# no markers\n")
    assert report.main(["--results", str(results), "--page", str(page), "--check"]) == 2


def test_committed_table_is_current():
    assert report.main(["--check"]) == 0


def test_cli_bench_filter_matching_nothing(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--filter", "nothing-matches"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing-matches" in err and "matches no benchmark" in err


def test_cli_bench_outside_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "fastrob" / "cli.py"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--filter", "pgd_step"])
    assert exc.value.code == 2
    assert "run from a fastrob source checkout" in capsys.readouterr().err
