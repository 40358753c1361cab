rule download:
    """Fetch the dataset named in params/data.yaml and normalise it to raw/captions.csv + raw/images/."""
    output:
        directory(f"{DATA}/raw"),
    log:
        f"logs/{DATASET}/download.log",
    params:
        cfg=cfg_json("data"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
    shell:
        "avg download --params-json {params.cfg:q} --out {output} 2>&1 | tee {log}"
