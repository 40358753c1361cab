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
        cfg=cfg_json("evaluate"),
        outdir=lambda wildcards, output: os.path.dirname(output.metrics),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "avg evaluate --params-json {params.cfg:q} --features {input} --out {params.outdir} --method dense 2>&1 | tee {log}"
