rule evaluate_dense:
    """Dense two-tower baseline: cosine ranking over the evaluated split with the same features."""
    input:
        f"{DATA}/features",
    output:
        metrics=f"{DATA}/eval/dense.json",
        rankings=f"{DATA}/eval/dense.rankings.jsonl",
    log:
        f"logs/{DATASET}/evaluate_dense.log",
    params:
        cfg=eval_cfg("dense"),
        outdir=lambda wildcards, output: os.path.dirname(output.metrics),
    threads: TIMED_THREADS
    resources:
        timing=1,
        mem_mb=4000,
        runtime=30,
    shell:
        "avg evaluate --params-json {params.cfg:q} --features {input} --out {params.outdir} --method dense 2>&1 | tee {log}"


rule evaluate_generative:
    """A trained recipe (or an ensemble of several, decoded as one): constrained beam search over the evaluated
    split's identifiers, mapped back to images."""
    input:
        features=f"{DATA}/features",
        checkpoint=lambda wildcards: [f"{DATA}/checkpoints/{c}" for c in M.checkpoints(wildcards.method)],
        identifiers=lambda wildcards: f"{DATA}/identifiers/{RECIPES[wildcards.method].scheme}.tsv",
    output:
        metrics=f"{DATA}/eval/{{method}}.json",
        rankings=f"{DATA}/eval/{{method}}.rankings.jsonl",
    wildcard_constraints:
        method=one_of(M.of_kind("generative", "discriminative", "ensemble")),
    log:
        f"logs/{DATASET}/evaluate_{{method}}.log",
    params:
        cfg=eval_cfg("generative"),
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


rule evaluate_rerank:
    """A rerank recipe: its source's top candidates reordered by the feature inner product."""
    input:
        features=f"{DATA}/features",
        source=lambda wildcards: f"{DATA}/eval/{RECIPES[wildcards.method].source}.json",
        rankings=lambda wildcards: f"{DATA}/eval/{RECIPES[wildcards.method].source}.rankings.jsonl",
    output:
        metrics=f"{DATA}/eval/{{method}}.json",
        rankings=f"{DATA}/eval/{{method}}.rankings.jsonl",
    wildcard_constraints:
        method=one_of(M.of_kind("rerank")),
    log:
        f"logs/{DATASET}/evaluate_{{method}}.log",
    params:
        cfg=eval_cfg("rerank"),
        outdir=lambda wildcards, output: os.path.dirname(output.metrics),
    threads: TIMED_THREADS
    resources:
        timing=1,
        mem_mb=4000,
        runtime=30,
    shell:
        "avg evaluate --params-json {params.cfg:q} --features {input.features} --out {params.outdir} "
        "--method {wildcards.method} --rerank {input.source} 2>&1 | tee {log}"


rule evaluate_fusion:
    """A fusion recipe: its source's beams ranked by log-probability + beta * dense score, beta chosen on val."""
    input:
        features=f"{DATA}/features",
        source=lambda wildcards: f"{DATA}/eval/{RECIPES[wildcards.method].source}.json",
        rankings=lambda wildcards: f"{DATA}/eval/{RECIPES[wildcards.method].source}.rankings.jsonl",
        checkpoint=lambda wildcards: [f"{DATA}/checkpoints/{c}" for c in M.checkpoints(wildcards.method)],
        identifiers=lambda wildcards: f"{DATA}/identifiers/{RECIPES[wildcards.method].scheme}.tsv",
    output:
        metrics=f"{DATA}/eval/{{method}}.json",
        rankings=f"{DATA}/eval/{{method}}.rankings.jsonl",
    wildcard_constraints:
        method=one_of(M.of_kind("fusion")),
    log:
        f"logs/{DATASET}/evaluate_{{method}}.log",
    params:
        cfg=eval_cfg("fusion", "generative"),
        outdir=lambda wildcards, output: os.path.dirname(output.metrics),
    threads: TIMED_THREADS
    resources:
        timing=1,
        mem_mb=4000,
        runtime=60,
        gpu=GPU("evaluate"),
    shell:
        "avg evaluate --params-json {params.cfg:q} --features {input.features} --out {params.outdir} "
        "--method {wildcards.method} --fusion {input.source} --checkpoint {input.checkpoint} "
        "--identifiers {input.identifiers} 2>&1 | tee {log}"
