"""The sections by name, in the order they run (``fct.gpu_check.plan.SECTION_ORDER``)."""

from __future__ import annotations

from fct.errors import UserError
from fct.gpu_check.ddp_check import ddp_syncbn
from fct.gpu_check.env_checks import cuda_tests, environment
from fct.gpu_check.eval_check import exact_eval
from fct.gpu_check.plan import SECTION_ORDER
from fct.gpu_check.results import SectionFn
from fct.gpu_check.train_checks import compile_check, feature_cache, throughput

SECTIONS: dict[str, SectionFn] = {
    "environment": environment,
    "cuda_tests": cuda_tests,
    "ddp_syncbn": ddp_syncbn,
    "throughput": throughput,
    "compile": compile_check,
    "exact_eval": exact_eval,
    "feature_cache": feature_cache,
}
assert tuple(SECTIONS) == SECTION_ORDER


def section(name: str) -> SectionFn:
    if name not in SECTIONS:
        raise UserError(f"unknown section {name!r}; valid: {', '.join(SECTION_ORDER)}")
    return SECTIONS[name]
