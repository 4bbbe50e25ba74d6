"""What factoring one LoRA module's realigned delta costs: the top-r triplets of the whitened matrix
(`core.lowrank.rank_constrained`: randomized SVD) against the full SVD the previous code ran.

One square module (default 4096 × 4096, a 7B attention projection) with a LoRA delta of the trained rank, the
recommended objective (no mask, the aligned-target safety term, λ = 0.5): H_d from calibration tokens, H_s
from safety tokens. Timed: `rank_constrained` alone (what factoring adds once H's factor and Δ̃ exist), the
whole step of one group (`rank_constrained_group`: H's factor, Δ̃, then the factoring), and the full SVD of
the whitened matrix (the old cost). The objective gap of the randomized result is compared with the exact one.

    python benchmarks/bench_lowrank_factor.py                    # 4096 x 4096, r = 64 (+ the full SVD once)
    python benchmarks/bench_lowrank_factor.py --size 1024 --no-full
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401
import torch
from _common import write_results

from irr_callback.core import RealignSettings
from irr_callback.core.lowrank import rank_constrained, rank_constrained_group
from irr_callback.core.realign import SafetyTerms, objective_optimum


def problem(size: int, rank: int, tokens: int, safety_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.1, 2.0, size)[:, None]
    x_d = torch.randn(size, tokens, generator=g) * scale
    x_s = torch.randn(size, safety_tokens, generator=g) * scale
    x_a = x_s + 0.1 * torch.randn(size, safety_tokens, generator=g) * scale
    delta = torch.randn(size, rank, generator=g) @ torch.randn(rank, size, generator=g) * 0.01
    base = torch.randn(size, size, generator=g) / size**0.5
    h_d = 2 * x_d @ x_d.T / tokens
    safety = SafetyTerms(2 * x_s @ x_s.T / safety_tokens, [base], 2 * x_a @ x_s.T / safety_tokens,
                         2 * x_a @ x_a.T / safety_tokens)  # fmt: skip
    return delta, h_d, safety


def best_of(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--safety-tokens", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-full", action="store_true", help="skip the full SVD (the old cost, ~1 min at 4096)")
    args = parser.parse_args()

    delta, h_d, safety = problem(args.size, args.rank, args.tokens, args.safety_tokens)
    settings = RealignSettings(mode="none", safety_weight=0.5, ridge=0.1)
    factor, optimum = objective_optimum(delta, h_d, safety, settings, ["m"])
    factor_s, found = best_of(lambda: rank_constrained(optimum, factor.root, rank=args.rank), args.repeat)
    step_s, _ = best_of(
        lambda: rank_constrained_group(
            [delta], [delta], h_d, settings=settings, names=["m"], ranks=[args.rank], safety=safety
        ),  # fmt: skip
        args.repeat,
    )
    row = {
        "size": f"{args.size} x {args.size}",
        "rank": args.rank,
        "factor_s": round(factor_s, 3),
        "whole_step_s": round(step_s, 3),
        "relative_gap_randomized": found.relative_gap,
    }
    if not args.no_full:
        whitened = optimum @ factor.root
        full_s, (_, s, _) = best_of(lambda: torch.linalg.svd(whitened, full_matrices=False), 1)
        energy = s.double().square()
        exact = float(energy[args.rank :].sum() / energy.sum())
        row.update(full_svd_s=round(full_s, 2), relative_gap_exact=exact,
                   gap_ratio=found.relative_gap / exact if exact > 0 else 1.0)  # fmt: skip
    lines = [
        "| module | r | factoring (top-r, randomized) | whole step (H factor + Δ̃ + factoring) | full SVD (old) "
        "| relative gap: randomized / exact |",
        "|---|---|---|---|---|---|",
        f"| {row['size']} | {row['rank']} | {row['factor_s']} s | {row['whole_step_s']} s | "
        + (f"{row['full_svd_s']} s | {row['relative_gap_randomized']:.6g} / {row['relative_gap_exact']:.6g} |"
           if "full_svd_s" in row else f"(skipped) | {row['relative_gap_randomized']:.6g} / - |"),
    ]  # fmt: skip
    note = (
        "\n\nTarget: factoring ≤ 5 s per 4096 × 4096 module at r = 64. Best of "
        f"{args.repeat} (the full SVD: 1 run), torch's default threads; the machine is shared by other jobs "
        "(load average in the JSON), so times are upper bounds. Objective: recommended setting (no mask, "
        "aligned-target safety term, λ = 0.5, ridge 0.1, percdamp 0.01); Δ a LoRA delta of rank r."
    )
    write_results(f"bench_lowrank_factor_{args.size}", {"rows": [row], "args": vars(args)}, "\n".join(lines) + note)
    print(row)


if __name__ == "__main__":
    main()
