"""Names of the evaluated methods, shared by both front doors (Snakefile and workflow/dvc_stages.py).

A method is a checkpoint name: ``<scheme>`` (generative + discriminative stages), ``<scheme>-gen``
(generative stage only), and, for the schemes in ``train.pseudo_queries.schemes``, the same two trained
with pseudo-queries: ``<scheme>-pq``, ``<scheme>-pq-gen``. ``dense`` is the two-tower baseline.
``<method>-rr`` is a generative method's candidates reranked (``evaluate.rerank.methods``, avg.rerank).
"""
from __future__ import annotations

import re

from avg.params import ParamsError

METHOD = re.compile(r"^(?P<scheme>[a-z0-9]+)(?P<pq>-pq)?(?P<gen>-gen)?(?P<rr>-rr)?$")


def pseudo_query_schemes(config: dict) -> list[str]:
    """``train.pseudo_queries.schemes``, each of which must be built (listed in ``identifiers.schemes``)."""
    schemes = list(config["identifiers"]["schemes"])
    pq = list(config["train"]["pseudo_queries"]["schemes"])
    unknown = [s for s in pq if s not in schemes]
    if unknown:
        raise ParamsError(f"params/train.yaml: train.pseudo_queries.schemes names {unknown}, which "
                          f"params/identifiers.yaml identifiers.schemes ({schemes}) does not build: add them there or drop them here")
    return pq


def rerank_methods(config: dict, generative: list[str]) -> list[str]:
    """``evaluate.rerank.methods``, each of which must be a generative method the DAG evaluates."""
    wanted = list(config["evaluate"]["rerank"]["methods"])
    unknown = [m for m in wanted if m not in generative]
    if unknown:
        raise ParamsError(f"params/evaluate.yaml: evaluate.rerank.methods names {unknown}, which the DAG does not "
                          f"evaluate (generative methods: {', '.join(generative)}); fix the list, or the schemes in "
                          "params/identifiers.yaml / train.pseudo_queries.schemes in params/train.yaml")
    return wanted


def method_names(schemes: list[str], pq_schemes: list[str], reranked: list[str] = ()) -> list[str]:
    """dense, then per scheme <s>-gen and <s>, then per pseudo-query scheme <s>-pq-gen and <s>-pq, then <m>-rr."""
    return (["dense"] + [m for s in schemes for m in (f"{s}-gen", s)]
            + [m for s in pq_schemes for m in (f"{s}-pq-gen", f"{s}-pq")] + [f"{m}-rr" for m in reranked])


def all_methods(config: dict) -> list[str]:
    """Every method the DAG evaluates under ``config`` (validated, as both front doors use it)."""
    schemes, pq = list(config["identifiers"]["schemes"]), pseudo_query_schemes(config)
    return method_names(schemes, pq, rerank_methods(config, method_names(schemes, pq)[1:]))


def parse(method: str) -> tuple[str, bool, bool]:
    """``(scheme, pseudo_queries, generative_only)`` of a method name, e.g. avg-pq-gen -> (avg, True, True)."""
    m = METHOD.match(method)
    if m is None:
        raise ValueError(f"{method!r} is not a method name (<scheme>[-pq][-gen][-rr])")
    return m["scheme"], bool(m["pq"]), bool(m["gen"])


def is_reranked(method: str) -> bool:
    return method.endswith("-rr")
