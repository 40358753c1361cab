rule train_generative:
    """Generative stage of a recipe: cross-entropy from each training query to its image's identifier; best epoch on val."""
    input:
        unpack(lambda wildcards: identifier_files(RECIPES[wildcards.name].scheme)),
        features=f"{DATA}/features",
    output:
        directory(f"{DATA}/checkpoints/{{name}}"),
    wildcard_constraints:
        name=one_of(M.of_kind("generative")),
    log:
        f"logs/{DATASET}/train_generative_{{name}}.log",
    params:
        cfg=train_cfg,
        recipe=recipe_json,
    threads: step_threads("train")
    resources:
        mem_mb=8000,
        runtime=600,
        gpu=GPU("train"),
    shell:
        "avg train --params-json {params.cfg:q} --methods-json {params.recipe:q} --recipe {wildcards.name} "
        "--features {input.features} --identifiers {input.identifiers} --stage generative --out {output} 2>&1 | tee {log}"


rule train_discriminative:
    """Discriminative stage of a recipe: listwise ranking of the gold identifier against constrained beams, plus CE."""
    input:
        unpack(lambda wildcards: identifier_files(RECIPES[wildcards.name].scheme)),
        features=f"{DATA}/features",
        init=lambda wildcards: f"{DATA}/checkpoints/{RECIPES[wildcards.name].source}",
    output:
        directory(f"{DATA}/checkpoints/{{name}}"),
    wildcard_constraints:
        name=one_of(M.of_kind("discriminative")),
    log:
        f"logs/{DATASET}/train_discriminative_{{name}}.log",
    params:
        cfg=train_cfg,
        recipe=recipe_json,
    threads: step_threads("train")
    resources:
        mem_mb=8000,
        runtime=600,
        gpu=GPU("train"),
    shell:
        "avg train --params-json {params.cfg:q} --methods-json {params.recipe:q} --recipe {wildcards.name} "
        "--features {input.features} --identifiers {input.identifiers} --stage discriminative --init-from {input.init} "
        "--out {output} 2>&1 | tee {log}"
