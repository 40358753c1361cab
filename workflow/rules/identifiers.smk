rule tokenizer:
    """Train the residual-quantised tokenizer of a learned scheme (rq: visual only; avg: with caption alignment)."""
    input:
        f"{DATA}/features",
    output:
        directory(f"{DATA}/tokenizer/{{scheme}}"),
    wildcard_constraints:
        scheme=one_of(dag.LEARNED),
    log:
        f"logs/{DATASET}/tokenizer_{{scheme}}.log",
    params:
        cfg=cfg_json("tokenizer"),
    threads: step_threads("tokenizer")
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=GPU("tokenizer"),
    shell:
        "avg tokenizer --params-json {params.cfg:q} --features {input} --scheme {wildcards.scheme} --out {output} 2>&1 | tee {log}"


rule identifiers:
    """Give every image a unique identifier under a scheme with code vectors (kmeans, rq, avg)."""
    input:
        unpack(identifier_inputs),
    output:
        table=f"{DATA}/identifiers/{{scheme}}.tsv",
        stats=f"{DATA}/identifiers/{{scheme}}.json",
        codebook=f"{DATA}/identifiers/{{scheme}}.codebook.npy",
    wildcard_constraints:
        scheme=one_of([s for s in dag.SCHEMES if dag.has_codebook(s)]),
    log:
        f"logs/{DATASET}/identifiers_{{scheme}}.log",
    params:
        cfg=lambda wildcards: cfg_json("identifiers", drop=dag.identifiers_unread(wildcards.scheme)),
        tokenizer=lambda wildcards, input: f"--tokenizer {input.tokenizer}" if "tokenizer" in input.keys() else "",
        outdir=lambda wildcards, output: os.path.dirname(output.table),
    threads: step_threads("identifiers")
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "avg identifiers --params-json {params.cfg:q} --features {input.features} --scheme {wildcards.scheme} "
        "{params.tokenizer} --out {params.outdir} 2>&1 | tee {log}"


rule identifiers_atomic:
    """Random unique codes of the same shape: no semantics, the lower bound (no code vectors)."""
    input:
        features=f"{DATA}/features",
    output:
        table=f"{DATA}/identifiers/atomic.tsv",
        stats=f"{DATA}/identifiers/atomic.json",
    log:
        f"logs/{DATASET}/identifiers_atomic.log",
    params:
        cfg=cfg_json("identifiers", drop=dag.identifiers_unread("atomic")),
        outdir=lambda wildcards, output: os.path.dirname(output.table),
    threads: step_threads("identifiers")
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "avg identifiers --params-json {params.cfg:q} --features {input.features} --scheme atomic "
        "--out {params.outdir} 2>&1 | tee {log}"
