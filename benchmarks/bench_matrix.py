"""The OBS matrix operation: `realign_matrix` against the reference's per-column loop.

For each shape (rows = outputs, columns = inputs) it times
  - reference: cholesky → cholesky_inverse → cholesky(upper), then per 128-column block the mask, a
    Python loop over columns with a rank-1 update of the rest of the block, and the lazy block update;
  - ours: `realign_matrix` (one Cholesky of the index-reversed H + one triangular inverse, two-level
    lazy updates), without and with `fallback_to_removal` / `removal_error` (one extra matmul);
and checks that both give the same delta (float32 tolerance).

    python benchmarks/bench_matrix.py                 # 512² … 4096², 4096×11008
    python benchmarks/bench_matrix.py --quick         # 512² and 1024² only
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch
from _common import write_results
from reference import reference_matrix

from irr_callback.core import realign_matrix, upper_cholesky_of_inverse

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
    mix = torch.randn(tokens, tokens, generator=g) / tokens ** 0.5  # correlated tokens
    x = mix @ x
    hessian = x.t() @ x * (2.0 / tokens)
    return delta, safety, hessian


def bench_shape(rows: int, cols: int, repeat: int) -> dict:
    delta, safety, hessian = problem(rows, cols)
    t_ref, ref = _best(lambda: reference_matrix(delta, safety, hessian), repeat)
    t_fast, (ours, _) = _best(lambda: realign_matrix(delta, safety, None, hessian, fallback_to_removal=False,
                                                    removal_error=False), repeat)
    t_full, (ours_full, stats) = _best(lambda: realign_matrix(delta, safety, None, hessian, fallback_to_removal=True,
                                                             removal_error=True), repeat)
    # the factorisation alone: reference chain vs ours
    damped = hessian.clone()
    damped.diagonal().add_(0.01 * float(damped.diagonal().mean()))
    t_chol_ref, u_ref = _best(lambda: torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)),
                                                            upper=True), repeat)
    t_chol_ours, u_ours = _best(lambda: upper_cholesky_of_inverse(damped), repeat)
    diff = (ours - ref).abs()
    scale = ref.abs().max().item()
    rel_fro = ((ours - ref).norm() / ref.norm()).item()
    removed_ref, removed_ours = int((ref == 0).sum()), int((ours == 0).sum())
    return {
        "rows": rows, "cols": cols, "params": rows * cols,
        "reference_s": t_ref, "ours_s": t_fast, "ours_with_removal_error_s": t_full,
        "speedup": t_ref / t_fast, "speedup_with_removal_error": t_ref / t_full,
        "factor_reference_s": t_chol_ref, "factor_ours_s": t_chol_ours,
        "factor_rel_diff": ((u_ours - u_ref).norm() / u_ref.norm()).item(),
        "max_abs_diff": diff.max().item(), "max_abs_ref": scale, "rel_fro_diff": rel_fro,
        "removed_reference": removed_ref, "removed_ours": removed_ours,
        "same_with_removal_error": bool(torch.equal(ours, ours_full) or stats.fell_back_to_removal),
        "fell_back_to_removal": stats.fell_back_to_removal,
        "match": bool(rel_fro < 1e-3),
    }


def _best(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only 512x512 and 1024x1024")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per shape (1 for the largest)")
    parser.add_argument("--name", default="bench_matrix", help="results file stem")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    for r, c in shapes:
        res = bench_shape(r, c, args.repeat if r * c <= 4096 * 4096 else 1)
        rows.append(res)
        print(f"{r}x{c}: reference {res['reference_s']:.3f}s  ours {res['ours_s']:.3f}s "
              f"({res['speedup']:.2f}x)  +removal_error {res['ours_with_removal_error_s']:.3f}s "
              f"({res['speedup_with_removal_error']:.2f}x)  factor {res['factor_reference_s']:.3f}s -> "
              f"{res['factor_ours_s']:.3f}s  rel diff {res['rel_fro_diff']:.1e}", flush=True)
    md = ["| shape (out×in) | reference per-column | ours | speedup | ours + removal error | speedup | "
          "factorisation ref → ours | rel. diff (Frobenius) | same result |",
          "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        md.append(f"| {x['rows']}×{x['cols']} | {x['reference_s']:.3f} s | {x['ours_s']:.3f} s | "
                  f"{x['speedup']:.2f}× | {x['ours_with_removal_error_s']:.3f} s | "
                  f"{x['speedup_with_removal_error']:.2f}× | {x['factor_reference_s']:.3f} → "
                  f"{x['factor_ours_s']:.3f} s | {x['rel_fro_diff']:.1e} | {'yes' if x['match'] else 'NO'} |")
    md.append("\n`ours` = `realign_matrix(..., fallback_to_removal=False, removal_error=False)`; "
              "`+ removal error` = the driver's default (`fallback_to_removal=True`), which computes the "
              "plain-removal layer-output error with one extra (rows × in × in) matrix product.")
    write_results(args.name, {"shapes": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
