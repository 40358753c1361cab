import json
import os
import re


def cfg_json(step, drop=()):
    """The step's params slice as JSON: each rule gets only its own slice, so a change reruns only what uses it.
    ``drop``: keys of the slice this rule does not read (train.pseudo_queries outside the -pq rules,
    evaluate.rerank outside the -rr rule), so changing them does not rerun it."""
    return json.dumps({k: v for k, v in config[step].items() if k not in drop}, sort_keys=True)


def one_of(names):
    """Wildcard constraint matching exactly these names (no name: matches nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!x)x"


def recipe_chain(name):
    """params/methods.yaml cut down to one recipe and the ones it continues (avg.methods.chain)."""
    return recipes.chain(config, name, M)


def GPU(step):
    """One GPU for a step whose device asks for CUDA (Slurm's gpu resource), none otherwise."""
    device = config[step].get("device") or config[step].get("generative", {}).get("device", "cpu")
    return 1 if str(device).startswith("cuda") else 0


def step_threads(step):
    """Cores a job of ``step`` holds: the thread count its params pin (``<step>.threads``; 0 = every core).
    The step pins torch/BLAS to that count itself (avg/threads.py), so --cores changes scheduling, not results."""
    return config[step].get("threads") or workflow.cores


# Timed rules (every evaluation: latency and QPS are measured there) hold every core and the `timing`
# resource, so no other job runs beside them: their figures are not shared with a training next door.
# workflow/profiles/default/config.yaml (used by `snakemake` automatically) caps `timing` at 1.
TIMED_THREADS = workflow.cores
