rule evaluate_dense:
    """Dense two-tower baseline: cosine ranking over the evaluated split with the same features."""
    input:
        f"{DATA}/features",
    output:
        metrics=f"{DATA}/eval/dense.json",
        rankings=f"{DATA}/eval/dense.rankings.tsv",
    params:
        cfg=cfg_json("evaluate"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "avg evaluate --params-json {params.cfg:q} --features {input} --out {DATA}/eval --method dense"
