"""Names of the evaluated methods, shared by both front doors (Snakefile and workflow/dvc_stages.py).

A method is a checkpoint name: ``<scheme>`` (generative + discriminative stages), ``<scheme>-gen``
(generative stage only), and, for the schemes in ``train.pseudo_queries.schemes``, the same two trained
with pseudo-queries: ``<scheme>-pq``, ``<scheme>-pq-gen``. ``dense`` is the two-tower baseline.
"""
from __future__ import annotations

import re

from avg.params import ParamsError

METHOD = re.compile(r"^(?P<scheme>[a-z0-9]+)(?P<pq>-pq)?(?P<gen>-gen)?$")


def pseudo_query_schemes(config: dict) -> list[str]:
    """``train.pseudo_queries.schemes``, each of which must be built (listed in ``identifiers.schemes``)."""
    schemes = list(config["identifiers"]["schemes"])
    pq = list(config["train"]["pseudo_queries"]["schemes"])
    unknown = [s for s in pq if s not in schemes]
    if unknown:
        raise ParamsError(f"params/train.yaml: train.pseudo_queries.schemes names {unknown}, which "
                          f"params/identifiers.yaml identifiers.schemes ({schemes}) does not build: add them there or drop them here")
    return pq


def method_names(schemes: list[str], pq_schemes: list[str]) -> list[str]:
    """dense, then per scheme <s>-gen and <s>, then per pseudo-query scheme <s>-pq-gen and <s>-pq."""
    return (["dense"] + [m for s in schemes for m in (f"{s}-gen", s)]
            + [m for s in pq_schemes for m in (f"{s}-pq-gen", f"{s}-pq")])


def parse(method: str) -> tuple[str, bool, bool]:
    """``(scheme, pseudo_queries, generative_only)`` of a checkpoint name, e.g. avg-pq-gen -> (avg, True, True)."""
    m = METHOD.match(method)
    if m is None:
        raise ValueError(f"{method!r} is not a method name (<scheme>[-pq][-gen])")
    return m["scheme"], bool(m["pq"]), bool(m["gen"])
