"""Reproduce the seed papers' central claims at small scale: train, evaluate, print a table, write JSON and a plot.

One sub-command per claim, each in ``benchmarks/claims/<claim>.py`` (its docstring states the claim and the
experiment):

- ``rq``: RQ-VAE, Lee et al. 2022. Residual depth vs plain VQ and a larger codebook, rate vs distortion.
- ``dq``: DQ-VAE, Huang et al. 2023. Entropy and feature routers at several fine ratios vs coarse-only and
  fine-only coding, reconstruction vs the measured tokens per image.
- ``ctf``: CTF, Guo et al. 2025. Coarse labels then fine codes vs a LlamaGen GPT of the same AR size on the
  same codes (codebook 4096), with the cluster-count ablation; FID, KID, precision/recall, class-consistency
  and img/s.

Every configuration is trained by the library's own training scripts and scored by its evaluator, for several
seeds (mean +- std). ``--quick`` runs a claim in about 15 minutes on a 2-core CPU (small models, few steps: the
ranking is what counts); without it, the full mode is sized for a GPU.

    python benchmarks/reproduce_claims.py rq --quick              # ~15 min on a 2-core CPU
    python benchmarks/reproduce_claims.py rq --device cuda        # full: a wider model, 3000 steps per run
    python benchmarks/reproduce_claims.py dq --quick              # 37 min on a 2-core CPU shared with other jobs
    python benchmarks/reproduce_claims.py ctf --quick             # ~20 min on a 2-core CPU (13 trainings)
    python benchmarks/reproduce_claims.py ctf --device cuda       # full: larger tokenizer and priors, 5000 steps

Outputs in ``--output_dir`` (default ``runs/claims/<claim>``): ``results.json`` (every run and the
per-configuration mean/std), ``table.txt``, a PNG plot, and one trained model per run (reused when the same run
is asked again with the same arguments, so an interrupted benchmark continues where it stopped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims import ctf, dq, rq  # noqa: E402

CLAIMS = {"rq": rq, "dq": dq, "ctf": ctf}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reproduce the seed papers' claims at small scale "
                                                 f"(claims: {', '.join(CLAIMS)}).")
    sub = parser.add_subparsers(dest="claim", required=True)
    for module in CLAIMS.values():
        module.add_parser(sub)
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    return CLAIMS[args.claim].main(parser, args)


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
