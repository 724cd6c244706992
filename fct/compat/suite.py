"""A three-version chain trained four ways (independent, BCT, learned backward maps, FCT forward
maps between the independent versions) and its compatibility matrices: the steps and the summary,
shared by the quickstart (digits) and ``make chain-cpu`` (the Tiny-ImageNet stand-in)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fct.report import format_table

CHAIN_METHODS = ("independent", "bct", "backward", "fct")


@dataclass(frozen=True)
class ChainSuite:
    """Where a chain's configs are. ``backbone`` / ``transformation`` / ``matrix`` are file names
    with ``{v}`` (v0, v1, v2), ``{m}`` (a method) and ``{h}`` (h01, h12) to fill in; ``overrides``
    maps a backbone step (``"v2 independent"``) to another config file (a model trained elsewhere)."""

    configs: Path
    v0: str
    backbone: str
    transformation: str
    matrix: str
    overrides: tuple[tuple[str, Path], ...] = ()

    def steps(self, methods: Sequence[str] = CHAIN_METHODS) -> list:
        """v0 and the independent versions, the FCT maps between them, and those two matrices first;
        then BCT and its matrix, then the backward maps and theirs: each matrix is evaluated as soon
        as its models exist, so an interrupted run already has the finished ones. ``methods`` keeps
        only those matrices and the models they need (v0 and the independent versions always: they
        are every matrix's references)."""
        from fct.pipeline import Step

        unknown = [m for m in methods if m not in CHAIN_METHODS]
        if unknown or not methods:
            raise ValueError(f"chain methods must be some of {', '.join(CHAIN_METHODS)}; got {list(methods)}")
        other = dict(self.overrides)

        def backbone(v: str, m: str) -> Step:
            path = other.get(f"{v} {m}", self.configs / self.backbone.format(v=v, m=m))
            return Step("backbone", f"chain {v} {m}", path)

        def matrix(m: str) -> Step:
            return Step("compat", f"matrix {m}", self.configs / self.matrix.format(m=m))

        steps = [Step("backbone", "chain v0", other.get("v0", self.configs / self.v0)),
                 backbone("v1", "independent"), backbone("v2", "independent")]
        if "fct" in methods:
            steps += [Step("transformation", f"chain FCT {h}", self.configs / self.transformation.format(h=h))
                      for h in ("h01", "h12")]
        steps += [matrix(m) for m in ("independent", "fct") if m in methods]
        for m in ("bct", "backward"):
            if m in methods:
                steps += [backbone("v1", m), backbone("v2", m), matrix(m)]
        return steps


def chain_summary(results: dict[str, dict], metric: str = "top1") -> dict:
    """Per method: the matrix of ``metric``, AC and AM (the compat step's JSON has every pair's
    criterion and update gain)."""
    out = {}
    for m in CHAIN_METHODS:
        if f"matrix {m}" not in results:  # a run of some methods only
            continue
        r = results[f"matrix {m}"][metric]
        out[m] = {metric: r["matrix"], "AC": r["AC"], "AM": r["AM"]}
    return out


def chain_table(summary: dict, metric: str = "top1") -> str:
    """One row per method: the diagonal, the three cross-version pairs, AC and AM."""
    rows = [[m, *(c[metric][i][i] for i in range(3)), c[metric][1][0], c[metric][2][1], c[metric][2][0],
             c["AC"], c["AM"]] for m, c in summary.items()]
    return format_table([f"chain ({metric})", "v0/v0", "v1/v1", "v2/v2", "M[1][0]", "M[2][1]", "M[2][0]",
                         "AC", "AM"], rows)
