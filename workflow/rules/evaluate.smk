rule evaluate_dense:
    """Dense two-tower baseline: cosine ranking over the evaluated split with the same features."""
    input:
        f"{DATA}/features",
    output:
        metrics=f"{DATA}/eval/dense.json",
        rankings=f"{DATA}/eval/dense.rankings.tsv",
    log:
        f"logs/{DATASET}/evaluate_dense.log",
    params:
        cfg=cfg_json("evaluate", drop=("rerank", "generative")),
        outdir=lambda wildcards, output: os.path.dirname(output.metrics),
    threads: TIMED_THREADS
    resources:
        timing=1,
        mem_mb=4000,
        runtime=30,
    shell:
        "avg evaluate --params-json {params.cfg:q} --features {input} --out {params.outdir} --method dense 2>&1 | tee {log}"


def checkpoint_scheme(method):
    """Checkpoint names are <scheme>[-pq][-gen] (avg.methods); the identifier table is the scheme's."""
    return parse_method(method)[0]


rule evaluate_generative:
    """Constrained beam search over the evaluated split's identifiers, mapped back to images."""
    input:
        features=f"{DATA}/features",
        checkpoint=f"{DATA}/checkpoints/{{method}}",
        identifiers=lambda wildcards: f"{DATA}/identifiers/{checkpoint_scheme(wildcards.method)}.tsv",
    output:
        metrics=f"{DATA}/eval/{{method}}.json",
        rankings=f"{DATA}/eval/{{method}}.rankings.tsv",
    wildcard_constraints:
        method="[a-z0-9]+(-pq)?(-gen)?",
    log:
        f"logs/{DATASET}/evaluate_{{method}}.log",
    params:
        cfg=cfg_json("evaluate", drop=("rerank", "dense")),
        outdir=lambda wildcards, output: os.path.dirname(output.metrics),
    threads: TIMED_THREADS
    resources:
        timing=1,
        mem_mb=4000,
        runtime=60,
        gpu=GPU("evaluate"),
    shell:
        "avg evaluate --params-json {params.cfg:q} --features {input.features} --out {params.outdir} "
        "--method {wildcards.method} --checkpoint {input.checkpoint} --identifiers {input.identifiers} 2>&1 | tee {log}"


ruleorder: evaluate_dense > evaluate_generative


rule evaluate_rerank:
    """A generative method's top candidates reranked by the feature inner product (retrieve, then rerank)."""
    input:
        features=f"{DATA}/features",
        source=f"{DATA}/eval/{{method}}.json",
        rankings=f"{DATA}/eval/{{method}}.rankings.tsv",
    output:
        metrics=f"{DATA}/eval/{{method}}-rr.json",
        rankings=f"{DATA}/eval/{{method}}-rr.rankings.tsv",
    wildcard_constraints:
        method="[a-z0-9]+(-pq)?(-gen)?",
    log:
        f"logs/{DATASET}/evaluate_{{method}}-rr.log",
    params:
        cfg=cfg_json("evaluate", drop=("dense", "generative")),
        outdir=lambda wildcards, output: os.path.dirname(output.metrics),
    threads: TIMED_THREADS
    resources:
        timing=1,
        mem_mb=4000,
        runtime=30,
    shell:
        "avg evaluate --params-json {params.cfg:q} --features {input.features} --out {params.outdir} "
        "--method {wildcards.method}-rr --rerank {input.source} 2>&1 | tee {log}"
