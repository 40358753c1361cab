rule features:
    """Image and text embeddings in one space (offline encoder, a dual encoder, or embeddings made elsewhere)."""
    input:
        raw=f"{DATA}/raw",
        # a precomputed feature folder or a local model folder: editing it reruns the step
        outside=features_inputs(config["features"]),
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
        "avg features --params-json {params.cfg:q} --raw {input.raw} --out {output} 2>&1 | tee {log}"
