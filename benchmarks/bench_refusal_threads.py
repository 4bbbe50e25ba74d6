"""Time of the base's answers to the 128 default prompts per torch thread count (issue 23, point 6).

  python benchmarks/bench_refusal_threads.py                # threads 1, 2, 1, 2 in one process
  python benchmarks/bench_refusal_threads.py --threads 1 4

`IRRCallback()` has the base answer 128 default harmful prompts at train begin (batches of 8, greedy,
KV cache on, up to 128 new tokens). Issue 23 saw 106 s in one run and 2 s in the next. On a CPU shared with
other jobs, several torch threads per tiny op wait for each other's descheduled threads; this measures the
same generation (the shipped prompts, the 2-layer chat model of `benchmarks/trl_outputs.py`) alternately with
each thread count, and records the machine's load average. Writes benchmarks/results/bench_refusal_threads.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common  # noqa: F401  (puts the repository root on sys.path)


def main(argv: list[str] | None = None) -> int:
    import torch
    from trl_outputs import model, tokenizer

    from irr_callback.evaluation.generation import generate_responses
    from irr_callback.inputs.safety_prompts import load_default_prompts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 1, 2])
    args = p.parse_args(argv)
    prompts = load_default_prompts(128, seed=0, online=False).prompts
    lm, tok = model().eval(), tokenizer()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        answers = generate_responses(
            lm, tok, prompts, batch_size=8, max_new_tokens=128, progress=False, use_cache=True
        )
        seconds = time.perf_counter() - start
        rows.append(
            {
                "torch_threads": threads,
                "seconds": round(seconds, 2),
                "load_average_1min": round(os.getloadavg()[0], 2),
                "mean_answer_tokens": round(sum(len(tok(a)["input_ids"]) for a in answers) / len(answers), 1),
            }
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        f"| {r['torch_threads']} | {r['seconds']} | {r['load_average_1min']} | {r['mean_answer_tokens']} |"
        for r in rows
    )
    md = (
        "128 answers (batches of 8, greedy, KV cache, max 128 new tokens), one process, runs in this order:\n\n"
        "| torch threads | seconds | load average (1 min) | mean answer tokens |\n|---|---|---|---|\n" + table + "\n"
    )
    _common.write_results("bench_refusal_threads", {"rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
