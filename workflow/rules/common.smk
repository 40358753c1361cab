import json
import os
import re

from avg import dag


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


def eval_cfg(*reads):
    """The evaluate slice without the EVAL_ONLY slices this evaluation does not read (avg.dag)."""
    return cfg_json("evaluate", drop=dag.evaluate_unread(*reads))


def identifier_files(scheme):
    """The identifier table, its stats and (for every scheme with code vectors) its codebook."""
    files = {"identifiers": f"{DATA}/identifiers/{scheme}.tsv", "stats": f"{DATA}/identifiers/{scheme}.json"}
    if dag.has_codebook(scheme):
        files["codebook"] = f"{DATA}/identifiers/{scheme}.codebook.npy"
    return files


def identifier_inputs(wildcards):
    inputs = {"features": f"{DATA}/features"}
    if dag.needs_tokenizer(wildcards.scheme):
        inputs["tokenizer"] = f"{DATA}/tokenizer/{wildcards.scheme}"
    return inputs


def train_cfg(wildcards):
    """The train slice as the recipe's stage reads it (avg.methods.train_config: its overrides applied, the
    other stage's slice and unused pseudo_queries left out, so changing those reruns nothing here)."""
    return json.dumps(recipes.train_config(config, RECIPES[wildcards.name]), sort_keys=True)


def recipe_json(wildcards):
    """Just this recipe and the ones it continues: changing another recipe reruns nothing here."""
    return json.dumps(recipe_chain(wildcards.name), sort_keys=True)


# Timed rules (every evaluation: latency and QPS are measured there) hold every core and the `timing`
# resource, so no other job runs beside them: their figures are not shared with a training next door.
# workflow/profiles/default/config.yaml (used by `snakemake` automatically) caps `timing` at 1.
TIMED_THREADS = workflow.cores
