rule features:
    """Image and text embeddings in one space (offline encoder or CLIP) for every image and caption."""
    input:
        f"{DATA}/raw",
    output:
        directory(f"{DATA}/features"),
    log:
        f"logs/{DATASET}/features.log",
    params:
        cfg=cfg_json("features"),
    threads: step_threads("features")
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=GPU("features"),
    shell:
        "avg features --params-json {params.cfg:q} --raw {input} --out {output} 2>&1 | tee {log}"
