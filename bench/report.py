"""The performance table of docs/benchmarks.md and bench/results/speedup.png, generated from bench/results/*.csv.

    python -m bench.report            # rewrite the table between the page's bench-table markers, and the plot
    python -m bench.report --check    # exit 1 if the page's table is not what the CSVs give

Which provider is fastrob's and which is the reference is decided by COMPARISONS below, and
nowhere else. When a CSV holds the same measurement more than once (a re-run), the last row
wins. The speed-up is reference time / fastrob time for time metrics and fastrob rate /
reference rate for throughput metrics, so > 1 always means fastrob is faster.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"

# (op glob, fastrob's providers, the reference provider, the reference's op: None = the same op)
COMPARISONS = [
    ("pgd_step_*", ("torch", "triton", "cuda"), "eager", None),
    ("cross_entropy_*", ("triton", "cuda"), "eager", None),
    ("bias_act_*", ("triton", "cuda"), "eager", None),
    ("sqnorm_*", ("triton", "cuda"), "eager", None),
    ("layer_norm*", ("triton",), "eager", None),
    ("input_gradient_exact", ("input_grad_exact",), "input_grad_reference_eager", None),
    ("input_gradient_fd", ("input_grad_fd",), "input_grad_reference_eager", "input_gradient_exact"),
    ("jacobian_nproj1", ("jacobian1",), "jacobian1_reference_loop", None),
    ("jacobian_nproj4", ("jacobian4_graph", "jacobian4_replicate"), "jacobian4_reference_loop", None),
    ("pgd10", ("fastrob", "fastrob-bf16", "fastrob-bf16-graph"), "torchattacks", None),
    ("pgd10_restarts4", ("fastrob-default", "fastrob-batched"), "fastrob-loop", None),
    ("pgd10_weak", ("fastrob-robust_only",), "fastrob-full", None),
    # bench/autoattack.py: the standard version against torchattacks' parts at the same settings, and
    # the 10-iteration version against torchattacks.AutoAttack (whose parts run 10 iterations)
    ("autoattack_*", ("fastrob-standard",), "torchattacks-matched", None),
    ("autoattack_*", ("fastrob-aa10",), "torchattacks-aa", None),
    # bench/autoattack_fast.py: the fast version against the standard one on the same model and images
    ("autoattack_fast_*", ("fastrob-fast",), "fastrob-standard", None),
    # bench/attention.py: the op against torch's math attention, and the ViT step against the
    # hand-written double backprop under the math backend
    ("attention_*", ("fastrob",), "torch_math", None),
    ("vit_tiny_step_*", ("input_grad_exact",), "input_grad_math_eager", None),
    # bench/any_model.py: the routed ConvNeXt step against the hand-written one (torch's grouped conv)
    ("any_model", ("convnext_atto_input_grad_exact",), "convnext_atto_input_grad_eager", None),
]
# Not compared: jsigr (no reference implementation of the same objective), the Jacobian
# batchings written in bench/regularizers.py only (is_grads_batched, input_space_fd), train_step.

TIME_METRICS = ("time_ms", "ms", "seconds")  # lower is better
RATE_METRICS = ("images_per_s",)  # higher is better
MEMORY_METRICS = ("peak_rss_rise_mib", "peak_cuda_mib")
UNITS = {"time_ms": "ms", "ms": "ms", "seconds": "s", "images_per_s": "img/s"}


def load(results_dir: Path) -> dict:
    """{device: {(op, provider, shape, dtype, metric): row}}, the last row of a key winning,
    in the order keys first appear."""
    out: dict = {}
    for path in sorted(Path(results_dir).glob("*.csv")):
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                out.setdefault(r["device"], {})[(r["op"], r["provider"], r["shape"], r["dtype"], r["metric"])] = r
    return out


def _value(rows, op, provider, shape, dtype, metrics):
    for m in metrics:
        r = rows.get((op, provider, shape, dtype, m))
        if r is not None:
            return m, float(r["median"])
    return None, None


def comparisons(rows: dict) -> list[dict]:
    """One dict per (fastrob provider, shape, dtype) measured with its reference on one device."""
    copy = [float(r["median"]) for k, r in rows.items() if k[0] == "copy" and k[4] == "gbps"]
    copy_gbps = copy[-1] if copy else None
    out, seen = [], set()
    for op, provider, shape, dtype, metric in rows:
        if metric not in TIME_METRICS + RATE_METRICS or (op, provider, shape, dtype) in seen:
            continue
        for pattern, fastrob, ref, ref_op in COMPARISONS:
            if not fnmatch.fnmatchcase(op, pattern) or provider not in fastrob:
                continue
            seen.add((op, provider, shape, dtype))
            m, value = _value(rows, op, provider, shape, dtype, TIME_METRICS + RATE_METRICS)
            ref_m, ref_value = _value(rows, ref_op or op, ref, shape, dtype, (m,))
            if ref_value is None or value <= 0 or ref_value <= 0:
                continue
            speedup = ref_value / value if m in TIME_METRICS else value / ref_value
            _, gbps = _value(rows, op, provider, shape, dtype, ("gbps",))
            _, mem = _value(rows, op, provider, shape, dtype, MEMORY_METRICS)
            _, ref_mem = _value(rows, ref_op or op, ref, shape, dtype, MEMORY_METRICS)
            out.append(
                {
                    "op": op,
                    "fastrob": provider,
                    "reference": ref,
                    "shape": shape,
                    "dtype": dtype,
                    "metric": m,
                    "value": value,
                    "ref_value": ref_value,
                    "speedup": speedup,
                    "gbps": gbps,
                    "pct_copy": gbps / copy_gbps if gbps is not None and copy_gbps else None,
                    "mem": mem,
                    "ref_mem": ref_mem,
                }
            )
            break
    return out


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def table(data: dict) -> str:
    """The markdown between the markers."""
    lines = ["<!-- generated by `python -m bench.report` from bench/results/*.csv: do not edit by hand -->", ""]
    if not data:
        return "\n".join(lines + ["No benchmark results yet."])
    for device, rows in data.items():
        comps = comparisons(rows)
        meta = next(iter(rows.values()))
        dates = sorted({r["date"] for r in rows.values()})
        copy = [float(r["median"]) for k, r in rows.items() if k[0] == "copy" and k[4] == "gbps"]
        lines.append(
            f"**{device}**: torch {meta['torch']}"
            + (f", triton {meta['triton']}" if meta["triton"] else "")
            + (f"; copy bandwidth {_num(copy[-1])} GB/s" if copy else "")
            + f"; measured {dates[0]}"
            + (f" to {dates[-1]}" if len(dates) > 1 else "")
        )
        lines.append("")
        if not comps:
            lines += ["No comparisons measured on this device.", ""]
            continue
        lines.append(
            "| benchmark | shape | dtype | fastrob | reference | fastrob | reference | speed-up "
            "| GB/s | % of copy | peak MiB (fastrob / ref) |"
        )
        lines.append("|---|---|---|---|---|--:|--:|--:|--:|--:|--:|")
        for c in comps:
            unit = UNITS[c["metric"]]
            gbps = _num(c["gbps"]) if c["gbps"] is not None else ""
            pct = f"{c['pct_copy']:.0%}" if c["pct_copy"] is not None else ""
            mem = (
                f"{_num(c['mem'])} / {_num(c['ref_mem'])}" if c["mem"] is not None and c["ref_mem"] is not None else ""
            )
            lines.append(
                f"| {c['op']} | {c['shape']} | {c['dtype']} | {c['fastrob']} | {c['reference']} "
                f"| {_num(c['value'])} {unit} | {_num(c['ref_value'])} {unit} | {c['speedup']:.2f}x "
                f"| {gbps} | {pct} | {mem} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def replace_table(page_text: str, body: str) -> str:
    start, end = page_text.find(START), page_text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the page has no {START} ... {END} markers")
    return page_text[: start + len(START)] + "\n" + body + "\n" + page_text[end:]


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(device, c) for device, rows in data.items() for c in comparisons(rows)]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(bars) + 1.6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    devices = list(dict.fromkeys(d for d, _ in bars))
    for i, (device, c) in enumerate(bars):
        ax.barh(
            i,
            c["speedup"],
            color=colours[devices.index(device) % len(colours)],
            label=device if device not in [d for d, _ in bars[:i]] else None,
        )
        ax.text(c["speedup"], i, f" {c['speedup']:.2f}x", va="center", fontsize=7)
    ax.set_yticks(
        range(len(bars)),
        [f"{c['op']} {c['shape']} {c['dtype']}: {c['fastrob']} vs {c['reference']}" for _, c in bars],
        fontsize=7,
    )
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("speed-up over the reference (> 1: fastrob faster)")
    ax.set_ylabel("benchmark")
    ax.set_title("fastrob vs reference, per benchmark")
    if bars:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="folder of the CSVs")
    parser.add_argument(
        "--page", type=Path, default=BENCH_DIR.parent / "docs" / "benchmarks.md", help="the page holding the table"
    )
    parser.add_argument("--plot", type=Path, default=None, help="default: <results>/speedup.png")
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is stale; write nothing")
    args = parser.parse_args(argv)
    data = load(args.results)
    text = args.page.read_text()
    try:
        new = replace_table(text, table(data))
    except ValueError as err:
        print(f"bench.report: {args.page}: {err}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"bench.report: the table in {args.page} is stale: run python -m bench.report", file=sys.stderr)
            return 1
        print(f"{args.page}: table up to date")
        return 0
    if new != text:
        args.page.write_text(new)
    plot_path = args.plot or args.results / "speedup.png"
    plot(data, plot_path)
    print(f"wrote the table in {args.page} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
