"""Pin a step's CPU threads (torch, OpenMP and BLAS) to the count its params slice names.

Thread counts change results in the last bits (reduction order) and change timings a lot on shared
cores, so they are a parameter of each step (``<step>.threads``), not whatever ``--cores`` a front door
was given: Snakemake and DVC then produce the same bytes, and two Snakemake jobs on two cores do not
oversubscribe them. ``threadpoolctl`` reaches the BLAS and OpenMP pools numpy, torch and faiss have
already loaded, which environment variables set after import cannot.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_limits = None   # keeps the threadpoolctl context alive for the life of the process


def pin(threads: int | None) -> None:
    """Use ``threads`` CPU threads from now on in this process (``0``/``None``: leave the libraries' defaults)."""
    global _limits
    if not threads:
        return
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(int(threads))
    _limits = threadpool_limits(limits=int(threads))
    logger.debug("pinned to %d CPU thread(s)", threads)
