"""Compiles every Triton kernel specialization the fused ops launch for GPUs, ahead of time and without a
GPU, and reports registers and spills (the cubin's resource usage: registers, stack and local
memory, where ptxas puts spilled registers).

    python bench/aot_compile.py [--arch 80 --arch 90] [--filter NAME] [--csv FILE] [--quick]

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))`` runs the
whole pipeline (TTIR, TTGIR, LLVM, PTX, cubin) on a CPU-only machine, so a kernel that would not
compile on a GPU fails here. The specializations are those the launchers in fastrob/triton/*.py pick:
each storage dtype (float32, float16, bfloat16; float64 for the differentiable ops, which Triton also
runs in float64), each constexpr flag they set and the extreme block sizes. Integer arguments are
compiled as i32 and without Triton's divisibility specializations (the ops pass i64 only for tensors
of more than 2^31 elements). Exit status 1 on any compile error.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import triton
import triton.language as tl

STORAGE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
HALF_AND_FLOAT = ("float32", "float16", "bfloat16")


@dataclass
class Spec:
    name: str  # kernel[variant]
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4


def _ct(dtype):
    return tl.float64 if dtype == "float64" else tl.float32


def _sig(kernel, types: dict, constexprs: dict) -> dict:
    """The full signature in the kernel's argument order: ``types`` for runtime arguments (name ->
    Triton type), "constexpr" for the constexprs."""
    names = kernel.arg_names
    missing = [n for n in names if n not in types and n not in constexprs]
    if missing:
        raise KeyError(f"{kernel.fn.__name__}: no type for {missing}")
    return {n: "constexpr" if n in constexprs else types[n] for n in names}


def _spec(name, kernel, types, constexprs, num_warps=4):
    return Spec(name, kernel, _sig(kernel, types, constexprs), constexprs, num_warps)


def _ptr_types(kernel, storage: str, acc: str, acc_args=(), other=None) -> dict:
    """Every *_ptr argument: a pointer to the storage dtype, those in ``acc_args`` to the accumulate
    dtype; ``other`` overrides (e.g. labels)."""
    types = {}
    for n in kernel.arg_names:
        if n.endswith("_ptr"):
            types[n] = "*" + (acc if n[:-4] in acc_args else storage)
    types.update(other or {})
    return types


def _layer_norm_specs(dtype: str, s: str, a: str, quick: bool) -> list[Spec]:
    """layer_norm's kernels at the tiles its launchers pick: rows of up to 1024 contiguous columns
    (the widest and the narrowest tile) and channels-first NCHW tiles; per-row and per-column
    vectors in the accumulate dtype."""
    from fastrob.triton import layer_norm as ln

    acc = ("w", "b", "mean", "invstd", "rowstat", "part", "ggw", "ggb")
    ints = dict(rows="i32", C="i32", inner="i32", eps="fp32", chunk="i32")
    out = []
    row_tiles = {"c1024": ln.row_tile(1024, 1), "c16": ln.row_tile(16, 1), "nchw": ln.row_tile(96, 3136)}
    if quick:
        del row_tiles["c16"]
    for tile, (block_r, block_c) in row_tiles.items():
        for kernel in (
            ln._layer_norm_forward_kernel,
            ln._layer_norm_backward_kernel,
            ln._layer_norm_double_backward_kernel,
        ):
            flags = dict(HAS_W=True, HAS_B=True) if kernel is ln._layer_norm_forward_kernel else dict(HAS_W=True)
            for has_w in (True,) if quick else (True, False):
                flags = {k: has_w for k in flags}
                out.append(
                    _spec(
                        f"{kernel.fn.__name__.strip('_')}[{dtype},{tile},w={int(has_w)}]",
                        kernel,
                        {**_ptr_types(kernel, s, a, acc), **ints},
                        dict(flags, CT=_ct(dtype), BLOCK_R=block_r, BLOCK_C=block_c),
                        ln.row_warps(block_r, block_c, dtype == "float64"),
                    )
                )
    for layout, (block_r, block_c) in {"rows": ln.column_tile(1), "nchw": ln.column_tile(3136)}.items():
        for mode in (0, 1):
            out.append(
                _spec(
                    f"layer_norm_column[{dtype},{layout},mode={mode}]",
                    ln._layer_norm_column_kernel,
                    {**_ptr_types(ln._layer_norm_column_kernel, s, a, acc), **ints},
                    dict(MODE=mode, CT=_ct(dtype), BLOCK_R=block_r, BLOCK_C=block_c),
                    ln.row_warps(block_r, block_c, dtype == "float64"),
                )
            )
    return out


def specs(quick: bool = False) -> list[Spec]:
    from fastrob.ops.bias_act import ACTIVATIONS
    from fastrob.triton import batch_norm as bn
    from fastrob.triton import bias_act as ba
    from fastrob.triton import cross_entropy as ce
    from fastrob.triton import pgd_step as pg
    from fastrob.triton import sqnorm as sq
    from fastrob.triton._common import warps

    out = []
    diff_dtypes = ("float32", "bfloat16") if quick else (*HALF_AND_FLOAT, "float64")
    row_blocks = (4096,) if quick else (16, 4096)
    for dtype in diff_dtypes:
        s, a = STORAGE[dtype], "fp64" if dtype == "float64" else "fp32"
        ints = dict(n_cols="i32", col_blocks="i32", smoothing="fp32")
        for block in row_blocks:
            c = dict(CT=_ct(dtype), BLOCK=block)
            out.append(
                _spec(
                    f"sqnorm_forward[{dtype},{block}]",
                    sq._sqnorm_forward_kernel,
                    {**_ptr_types(sq._sqnorm_forward_kernel, s, a, ("out",)), **ints},
                    c,
                    warps(block),
                )
            )
            out.append(
                _spec(
                    f"sqnorm_double_backward[{dtype},{block}]",
                    sq._sqnorm_double_backward_kernel,
                    {**_ptr_types(sq._sqnorm_double_backward_kernel, s, a, ("go", "d_go")), **ints},
                    c,
                    warps(block),
                )
            )
            for has_gs in (False, True):
                cg = dict(c, HAS_GS=has_gs)
                if not has_gs:
                    out.append(
                        _spec(
                            f"cross_entropy_forward[{dtype},{block}]",
                            ce._cross_entropy_forward_kernel,
                            {
                                **_ptr_types(
                                    ce._cross_entropy_forward_kernel, s, a, ("loss", "lse"), {"y_ptr": "*i64"}
                                ),
                                **ints,
                            },
                            c,
                            warps(block),
                        )
                    )
                out.append(
                    _spec(
                        f"cross_entropy_double_backward[{dtype},{block},gs={int(has_gs)}]",
                        ce._cross_entropy_double_backward_kernel,
                        {
                            **_ptr_types(
                                ce._cross_entropy_double_backward_kernel,
                                s,
                                a,
                                ("lse", "gl", "gs", "d_gl", "d_gs"),
                                {"y_ptr": "*i64"},
                            ),
                            **ints,
                        },
                        cg,
                        warps(block),
                    )
                )
        for block in (16, 1024):
            c = dict(CT=_ct(dtype), BLOCK=block)
            out.append(
                _spec(
                    f"sqnorm_backward[{dtype},{block}]",
                    sq._sqnorm_backward_kernel,
                    {**_ptr_types(sq._sqnorm_backward_kernel, s, a, ("go",)), **ints},
                    c,
                )
            )
            for has_gs in (False, True):
                out.append(
                    _spec(
                        f"cross_entropy_backward[{dtype},{block},gs={int(has_gs)}]",
                        ce._cross_entropy_backward_kernel,
                        {
                            **_ptr_types(
                                ce._cross_entropy_backward_kernel, s, a, ("lse", "gl", "gs"), {"y_ptr": "*i64"}
                            ),
                            **ints,
                        },
                        dict(c, HAS_GS=has_gs),
                    )
                )
        out += _layer_norm_specs(dtype, s, a, quick)
        # bias_act: every activation with a bias in float32 and bfloat16; without bias / other dtypes: relu, gelu
        ba_ints = dict(n="i32", stride_c="i32", channels="i32", beta="fp32", threshold="fp32", d="fp32")
        for kernel in (ba._bias_act_kernel, ba._bias_act_backward_kernel, ba._bias_act_double_backward_kernel):
            acts = range(len(ACTIVATIONS)) if dtype == "float32" or (dtype == "bfloat16" and not quick) else (2,)
            for act in acts:
                for has_bias in (True, False) if act in (0, 2) and not quick else (True,):
                    out.append(
                        _spec(
                            f"{kernel.fn.__name__.strip('_')}[{dtype},act={act},bias={int(has_bias)}]",
                            kernel,
                            {**_ptr_types(kernel, s, a), **ba_ints},
                            dict(ACT=act, HAS_BIAS=has_bias, CT=_ct(dtype), BLOCK=ba.BLOCK),
                        )
                    )
        # batch_norm: per-channel vectors (weight, bias, statistics, partial sums) in the accumulate dtype
        bn_acc = ("w", "b", "mean", "invstd", "part", "coef", "gw", "gb", "ggw", "ggb", "d_w")
        bn_ints = dict(
            C="i32",
            S="i32",
            M="i32",
            sn="i32",
            sc="i32",
            ss="i32",
            chunk="i32",
            splits="i32",
            eps="fp32",
            n="i32",
            stride_c="i32",
        )
        layouts = {"nchw": (1024, 2), "cl": (64, 64), "cl_c2": (2048, 2)}
        if quick:
            del layouts["cl_c2"]
        for layout, (block_m, block_c) in layouts.items():
            for mode in (0, 1, 2):
                out.append(
                    _spec(
                        f"batch_norm_reduce[{dtype},{layout},mode={mode}]",
                        bn._batch_norm_reduce_kernel,
                        {**_ptr_types(bn._batch_norm_reduce_kernel, s, a, bn_acc), **bn_ints},
                        dict(MODE=mode, CT=_ct(dtype), BLOCK_M=block_m, BLOCK_C=block_c),
                        bn.reduce_warps(block_m, block_c),
                    )
                )
        for has_w in (True,) if quick else (False, True):
            c = dict(HAS_W=has_w, CT=_ct(dtype), BLOCK=bn.FINAL_BLOCK)
            out.append(
                _spec(
                    f"batch_norm_forward_finalize[{dtype},w={int(has_w)}]",
                    bn._batch_norm_forward_finalize_kernel,
                    {**_ptr_types(bn._batch_norm_forward_finalize_kernel, s, a, bn_acc), **bn_ints},
                    dict(c, HAS_B=has_w),
                )
            )
            for kernel in (bn._batch_norm_backward_finalize_kernel, bn._batch_norm_double_backward_finalize_kernel):
                out.append(
                    _spec(
                        f"{kernel.fn.__name__.strip('_')}[{dtype},w={int(has_w)}]",
                        kernel,
                        {**_ptr_types(kernel, s, a, bn_acc), **bn_ints},
                        c,
                    )
                )
        for has_a, has_b, two in ((False, False, False), (True, False, False), (True, True, True)):
            out.append(
                _spec(
                    f"batch_norm_apply[{dtype},a={int(has_a)},b={int(has_b)},two={int(two)}]",
                    bn._batch_norm_apply_kernel,
                    {**_ptr_types(bn._batch_norm_apply_kernel, s, a, bn_acc), **bn_ints},
                    dict(HAS_A=has_a, HAS_B=has_b, TWO=two, CT=_ct(dtype), BLOCK=bn.BLOCK),
                )
            )
    # pgd_step: float32 arithmetic; per-sample eps/alpha are float32 tensors
    pg_scalars = dict(
        eps="fp32", alpha="fp32", lower="fp32", upper="fp32", n_total="i32", per_sample="i32", n_chunks="i32"
    )
    for dtype in ("float32", "bfloat16") if quick else HALF_AND_FLOAT:
        s = STORAGE[dtype]
        for flags in ((False, False), (True, True)) if quick else ((False, False), (True, False), (True, True)):
            f = dict(EPS_PER_SAMPLE=flags[0], ALPHA_PER_SAMPLE=flags[1])
            tag = f"{dtype},eps_t={int(flags[0])},alpha_t={int(flags[1])}"
            kt = {**_ptr_types(pg._pgd_step_l2_apply_kernel, s, "fp32", ("eps", "alpha", "partials")), **pg_scalars}
            out.append(_spec(f"pgd_step_linf[{tag}]", pg._pgd_step_linf_kernel, kt, dict(f, BLOCK=pg.LINF_BLOCK)))
            for block in (1024, 4096, pg.MAX_SAMPLE_IN_ONE_PROGRAM)[1 if quick else 0 :]:  # 784, 3072, the largest
                out.append(
                    _spec(
                        f"pgd_step_l2_sample[{tag},{block}]",
                        pg._pgd_step_l2_sample_kernel,
                        kt,
                        dict(f, BLOCK=block),
                        pg._warps(block),
                    )
                )
            for chunks in (8, 64):  # 16385..32768 and ImageNet's 150528 elements (37 chunks)
                out.append(
                    _spec(
                        f"pgd_step_l2_apply[{tag},{chunks}]",
                        pg._pgd_step_l2_apply_kernel,
                        kt,
                        dict(f, BLOCK=pg.L2_CHUNK, CHUNKS=chunks),
                    )
                )
        out.append(
            _spec(
                f"pgd_step_l2_partials[{dtype}]",
                pg._pgd_step_l2_partials_kernel,
                {**_ptr_types(pg._pgd_step_l2_partials_kernel, s, "fp32", ("partials",)), **pg_scalars},
                dict(BLOCK=pg.L2_CHUNK),
            )
        )
    # attention: q (scaled in torch), lse, delta and dq in the accumulate dtype; the mask pointer is q's without a mask
    from fastrob.triton import attention as at

    at_ints = dict(n_q="i32", n_k="i32", d="i32", heads="i32", sm_b="i32", sm_h="i32", sm_i="i32", sm_j="i32")
    at_kernels = (at._attention_forward_kernel, at._attention_backward_dkdv_kernel, at._attention_backward_dq_kernel)
    for dtype in diff_dtypes:
        s, a = STORAGE[dtype], "fp64" if dtype == "float64" else "fp32"
        for block_d in (64,) if quick else (32, 64, 128):
            for has_mask, causal in ((False, False), (True, False), (False, True)):
                block_m, block_n, _ = at._blocks(block_d)
                c = dict(HAS_MASK=has_mask, CAUSAL=causal, CT=_ct(dtype), BLOCK_M=block_m, BLOCK_N=block_n)
                for kernel in at_kernels:
                    out.append(
                        _spec(
                            f"{kernel.fn.__name__.strip('_')}[{dtype},d={block_d},mask={int(has_mask)},causal={int(causal)}]",
                            kernel,
                            {**_ptr_types(kernel, s, a, ("q", "lse", "delta", "dq")), **at_ints},
                            dict(c, BLOCK_D=block_d),
                        )
                    )
    return out


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return str(Path(nvidia.__file__).parent / "bin" / "cuobjdump")


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, local-memory bytes per thread: where ptxas puts spilled registers) of
    the compiled kernel, from cuobjdump --dump-resource-usage (ptxas's own -v report, without compiling
    again)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    match = _USAGE.search(text)
    return tuple(map(int, match.groups())) if match else (-1, 0, 0)


def compile_spec(spec: Spec, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})


def compile_one(job: tuple) -> dict:
    """Compiles specialization ``index`` of ``specs(quick)`` for ``arch``: one table row (a process-pool
    job: JIT functions do not pickle, so workers rebuild the list)."""
    quick, index, arch, usage = job
    spec = specs(quick)[index]
    try:
        compiled = compile_spec(spec, arch)
        regs, stack, local = resources(compiled.asm["cubin"]) if usage else (-1, 0, 0)
        status = "ok"
    except Exception as err:  # noqa: BLE001  (report every failing specialization, then fail)
        regs, stack, local, status = -1, 0, 0, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return dict(
        triton=triton.__version__,
        kernel=spec.name,
        arch=f"sm_{arch}",
        num_warps=spec.num_warps,
        registers=regs,
        stack_bytes=stack,
        local_bytes=local,
        status=status,
    )


def main(argv=None) -> int:
    import warnings
    from concurrent.futures import ProcessPoolExecutor

    warnings.filterwarnings("ignore")  # Triton's fp-fusion notice, once per compile
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 80 and 90)")
    parser.add_argument("--filter", help="only specializations whose name contains this")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="float32 and bfloat16, the largest blocks, fewer flag combinations (what CI compiles)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    parser.add_argument("--csv", help="also write the table as CSV rows here")
    parser.add_argument("--no-usage", action="store_true", help="compile only, without the register report")
    args = parser.parse_args(argv)
    archs = args.arch or [80, 90]
    jobs = [
        (args.quick, i, arch, not args.no_usage)
        for i, spec in enumerate(specs(args.quick))
        if not args.filter or args.filter in spec.name
        for arch in archs
    ]
    start = time.perf_counter()
    print(f"triton {triton.__version__}: {len(jobs)} compiles (sm_{', sm_'.join(map(str, archs))})")
    print(f"{'kernel':<58} {'arch':>5} {'warps':>5} {'regs':>5} {'stack':>6} {'local':>6}")
    rows = []
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for row in pool.map(compile_one, jobs):
            rows.append(row)
            flag = "  SPILLS" if row["stack_bytes"] or row["local_bytes"] else ""
            print(
                f"{row['kernel']:<58} {row['arch']:>5} {row['num_warps']:>5} {row['registers']:>5} "
                f"{row['stack_bytes']:>6} {row['local_bytes']:>6}{flag}"
                f"{'' if row['status'] == 'ok' else '  ' + row['status']}",
                flush=True,
            )
    if args.csv and rows:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    failures = sum(1 for r in rows if r["status"] != "ok")
    spilling = sum(1 for r in rows if r["stack_bytes"] or r["local_bytes"])
    print(
        f"triton {triton.__version__}: {len(rows) - failures} of {len(rows)} compiled, {spilling} spill, "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
