"""The ``chain`` recipe (``make chain-cpu``): a three-version chain on the Tiny-ImageNet stand-in,
trained four ways, and each way's compatibility matrix; the same chain on digits is the second half
of the quickstart, so the steps and the summary live here for both.

v0 on classes 0-32, v1 on 0-65, v2 on 0-99 (configs/tinyimagenet/*chain*; v2 trained independently
is the reproduction's new model, so a finished ``reproduce`` saves that step). The four ways:
independent training, BCT (influence loss through the previous version's classifier), learned
backward maps (each version trained with a map to the previous one), and FCT forward maps h01, h12
between the independent versions. Each matrix (JSON, heat-map PNG, 2-D projections) goes to
``runs/chain_cpu/matrix_<method>/``. ``--only 'v0,v?-independent,*-backward'`` runs one way's
models and matrix (the old ``--methods backward``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fct.experiments.recipe import CONFIGS, RECIPES, Digest, Recipe
from fct.experiments.steps import Step
from fct.report import format_table

CHAIN_METHODS = ("independent", "bct", "backward", "fct")


@dataclass(frozen=True)
class ChainSuite:
    """Where a chain's configs are. ``backbone`` / ``transformation`` / ``matrix`` are file names
    with ``{v}`` (v0, v1, v2), ``{m}`` (a method) and ``{h}`` (h01, h12) to fill in; ``elsewhere``
    maps a step name (``"v2-independent"``) to another config file (a model another recipe trains)."""

    configs: Path
    v0: str
    backbone: str
    transformation: str
    matrix: str
    elsewhere: tuple[tuple[str, Path], ...] = ()

    def steps(self) -> list[Step]:
        """v0 and the independent versions, the FCT maps between them, and those two matrices first;
        then BCT and its matrix, then the backward maps and theirs: each matrix is scored as soon as
        its models exist, so an interrupted run already has the finished ones."""
        other = dict(self.elsewhere)

        def backbone(v: str, m: str) -> Step:
            name = f"{v}-{m}"
            return Step("backbone", name, other.get(name, self.configs / self.backbone.format(v=v, m=m)))

        def matrix(m: str) -> Step:
            return Step("compat", f"matrix-{m}", self.configs / self.matrix.format(m=m))

        steps = [Step("backbone", "v0", other.get("v0", self.configs / self.v0)),
                 backbone("v1", "independent"), backbone("v2", "independent")]
        steps += [Step("transformation", h, self.configs / self.transformation.format(h=h))
                  for h in ("h01", "h12")]
        steps += [matrix("independent"), matrix("fct")]
        for m in ("bct", "backward"):
            steps += [backbone("v1", m), backbone("v2", m), matrix(m)]
        return steps


def chain_summary(results: dict[str, dict], metric: str = "top1") -> dict:
    """Per method whose matrix step ran: the matrix of ``metric``, AC and AM (the matrix step's JSON
    has every pair's criterion and update gain)."""
    out = {}
    for m in CHAIN_METHODS:
        if f"matrix-{m}" in results:
            r = results[f"matrix-{m}"][metric]
            out[m] = {metric: r["matrix"], "AC": r["AC"], "AM": r["AM"]}
    return out


def chain_table(summary: dict, metric: str = "top1") -> str:
    """One row per method: the diagonal, the three cross-version pairs, AC and AM."""
    rows = [[m, *(c[metric][i][i] for i in range(3)), c[metric][1][0], c[metric][2][1], c[metric][2][0],
             c["AC"], c["AM"]] for m, c in summary.items()]
    return format_table([f"chain ({metric})", "v0/v0", "v1/v1", "v2/v2", "M[1][0]", "M[2][1]", "M[2][0]",
                         "AC", "AM"], rows)


def chain_digest(results: dict[str, dict]) -> Digest:
    chain = chain_summary(results)
    return Digest({"chain": chain}, chain_table(chain) if chain else "")


TINY = CONFIGS / "tinyimagenet"
SUITE = ChainSuite(TINY, v0="backbone_chain_v0.yaml", backbone="backbone_chain_{v}_{m}.yaml",
                   transformation="transformation_chain_fct_{h}.yaml", matrix="matrix_chain_{m}.yaml",
                   elsewhere=(("v2-independent", TINY / "backbone_new.yaml"),))


@RECIPES.register("chain")
def chain() -> Recipe:
    return Recipe(
        about="a three-version chain on the Tiny-ImageNet stand-in, four ways, and its matrices",
        out=Path("runs/chain_cpu"), steps=lambda quick: SUITE.steps(), summarise=chain_digest,
        quick={"backbone": ["epochs=1", "lr_policy_params.warmup_length=0", "dataset_params.batch_size=32"],
               "transformation": ["epochs=1", "lr_policy_params.warmup_length=0", "feature_cache.views=1",
                                  "dataset_params.batch_size=64"],
               "compat": ["projection=false"]},
        tiny_imagenet=True)
