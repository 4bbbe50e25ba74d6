"""The OBS matrix operation: `realign_matrix` against the reference's per-column loop.

For each shape (rows = outputs, columns = inputs) it times
  - reference: cholesky → cholesky_inverse → cholesky(upper), then per 128-column block the mask, a
    Python loop over columns with a rank-1 update of the rest of the block, and the lazy block update;
  - ours: `realign_matrix` (one Cholesky of the index-reversed H, no inverse: a left-looking sweep on
    column-major storage), without and with `fallback_to_removal` / `removal_error` (one extra matmul);
  - the factorisations alone: the reference's chain; ours producing the same U (one Cholesky + a
    recursive triangular inverse); and what our sweep actually needs (the Cholesky alone);
and checks that both give the same delta (float32 tolerance).

    python benchmarks/bench_matrix.py                 # 512² … 4096², 4096×11008
    python benchmarks/bench_matrix.py --quick         # 512² and 1024² only
"""

from __future__ import annotations

import argparse
import os
import time

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch
from _common import write_results
from reference import reference_matrix

from irr_callback.core import realign_matrix, upper_cholesky_of_inverse
from irr_callback.core.obs import reversed_cholesky


SHAPES = [(512, 512), (1024, 1024), (2048, 2048), (4096, 4096), (4096, 11008)]


def problem(rows: int, cols: int, seed: int = 0):
    """A fine-tuning-like delta, a sign-only safety vector and a calibration Hessian with uneven feature
    scales (outlier channels) from 1024 tokens (rank-deficient when cols > 1024, as in practice)."""
    g = torch.Generator().manual_seed(seed)
    delta = 0.01 * torch.randn(rows, cols, generator=g)
    safety = torch.sign(torch.randn(rows, cols, generator=g)).to(torch.int8)
    tokens = 1024
    scales = torch.exp(0.7 * torch.randn(cols, generator=g))
    x = torch.randn(tokens, cols, generator=g) * scales
    mix = torch.randn(tokens, tokens, generator=g) / tokens**0.5  # correlated tokens
    x = mix @ x
    hessian = x.t() @ x * (2.0 / tokens)
    return delta, safety, hessian


def bench_shape(rows: int, cols: int, repeat: int, check64: bool = True) -> dict:
    delta, safety, hessian = problem(rows, cols)
    damped = hessian.clone()
    damped.diagonal().add_(0.01 * float(damped.diagonal().mean()))
    runs = {
        "reference": lambda: reference_matrix(delta, safety, hessian),
        "ours": lambda: realign_matrix(delta, safety, None, hessian, fallback_to_removal=False, removal_error=False),
        "ours_with_removal_error": lambda: realign_matrix(
            delta, safety, None, hessian, fallback_to_removal=True, removal_error=True
        ),
        "factor_reference": lambda: torch.linalg.cholesky(
            torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True
        ),
        "factor_ours": lambda: upper_cholesky_of_inverse(damped),
        "factor_sweep": lambda: reversed_cholesky(damped),
    }
    wall = {k: float("inf") for k in runs}
    cpu = {k: float("inf") for k in runs}
    out = {}
    for _ in range(repeat):  # interleaved, best of `repeat`: the machine may be shared
        for k, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            out[k] = fn()
            wall[k] = min(wall[k], time.perf_counter() - w0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    ref, (ours, _), (ours_full, stats) = out["reference"], out["ours"], out["ours_with_removal_error"]
    u_ref, u_ours = out["factor_reference"], out["factor_ours"]
    rel_fro = ((ours - ref).norm() / ref.norm()).item()
    # float32 tolerance: with a rank-deficient H, rounding differences are amplified (and can flip an
    # adaptive-mask decision), so both float32 results are compared with a float64 run of the reference
    truth = reference_matrix(delta.double(), safety, hessian.double(), dtype=torch.float64) if check64 else None
    err_ref = ((ref.double() - truth).norm() / truth.norm()).item() if check64 else None
    err_ours = ((ours.double() - truth).norm() / truth.norm()).item() if check64 else None
    return {
        "rows": rows,
        "cols": cols,
        "params": rows * cols,
        **{f"{k}_s": v for k, v in wall.items()},
        **{f"{k}_cpu_s": v for k, v in cpu.items()},
        "speedup": wall["reference"] / wall["ours"],
        "speedup_with_removal_error": wall["reference"] / wall["ours_with_removal_error"],
        "speedup_cpu_time": cpu["reference"] / cpu["ours"],
        "factor_rel_diff": ((u_ours - u_ref).norm() / u_ref.norm()).item(),
        "max_abs_diff": (ours - ref).abs().max().item(),
        "max_abs_ref": ref.abs().max().item(),
        "rel_fro_diff": rel_fro,
        "removed_reference": int((ref == 0).sum()),
        "removed_ours": int((ours == 0).sum()),
        "same_with_removal_error": bool(torch.equal(ours, ours_full) or stats.fell_back_to_removal),
        "fell_back_to_removal": stats.fell_back_to_removal,
        "load_average": os.getloadavg(),
        "reference_vs_float64": err_ref,
        "ours_vs_float64": err_ours,
        "match": bool(rel_fro < 1e-3 or (check64 and err_ours <= 2 * err_ref + 1e-4)),
    }


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only 512x512 and 1024x1024")
    parser.add_argument(
        "--repeat", type=int, default=3, help="best of N interleaved runs per shape (1 for the largest)"
    )
    parser.add_argument("--shapes", default=None, help="e.g. 2048x2048,4096x4096 (rows x cols)")
    parser.add_argument("--name", default="bench_matrix", help="results file stem")
    parser.add_argument(
        "--check64-all",
        action="store_true",
        help="also compare with a float64 run above 4096x4096 (adds about a minute)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for r, c in shapes:
        res = bench_shape(
            r, c, args.repeat if r * c <= 4096 * 4096 else 1, check64=args.check64_all or r * c <= 4096 * 4096
        )
        rows.append(res)
        print(
            f"{r}x{c}: reference {res['reference_s']:.3f}s  ours {res['ours_s']:.3f}s "
            f"({res['speedup']:.2f}x)  +removal_error {res['ours_with_removal_error_s']:.3f}s "
            f"({res['speedup_with_removal_error']:.2f}x)  factor {res['factor_reference_s']:.3f}s -> "
            f"{res['factor_ours_s']:.3f}s (sweep needs {res['factor_sweep_s']:.3f}s)  "
            f"cpu-time speedup {res['speedup_cpu_time']:.2f}x  "
            f"rel diff {res['rel_fro_diff']:.1e}  load {res['load_average'][0]:.1f}",
            flush=True,
        )
    md = [
        "| shape (out×in) | reference per-column | ours | speedup | ours + removal error | speedup | "
        "U: ref → ours (Cholesky only, what the sweep uses) | speedup (CPU time) | rel. diff ours vs ref | ref vs fp64 | ours vs fp64 | "
        "same result | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        md.append(
            f"| {x['rows']}×{x['cols']} | {x['reference_s']:.3f} s | {x['ours_s']:.3f} s | "
            f"{x['speedup']:.2f}× | {x['ours_with_removal_error_s']:.3f} s | "
            f"{x['speedup_with_removal_error']:.2f}× | {x['factor_reference_s']:.3f} → "
            f"{x['factor_ours_s']:.3f} s ({x['factor_sweep_s']:.3f} s) | {x['speedup_cpu_time']:.2f}× | "
            f"{x['rel_fro_diff']:.1e} | "
            f"{_fmt(x['reference_vs_float64'])} | {_fmt(x['ours_vs_float64'])} | "
            f"{'yes' if x['match'] else 'NO'} | {x['load_average'][0]:.1f} |"
        )
    md.append(
        "\n`ours` = `realign_matrix(..., fallback_to_removal=False, removal_error=False)`; "
        "`+ removal error` = the driver's default (`fallback_to_removal=True`), which computes the "
        "plain-removal layer-output error with one extra (rows × in × in) matrix product."
    )
    write_results(args.name, {"shapes": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
