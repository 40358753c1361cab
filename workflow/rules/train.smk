def identifier_files(scheme):
    """The identifier table, its stats and (for every scheme but atomic) its code vectors."""
    files = {"identifiers": f"{DATA}/identifiers/{scheme}.tsv", "stats": f"{DATA}/identifiers/{scheme}.json"}
    if scheme != "atomic":
        files["codebook"] = f"{DATA}/identifiers/{scheme}.codebook.npy"
    return files


def pq_flag(name):
    """<scheme>-pq checkpoints also train on pseudo-queries (params/train.yaml: train.pseudo_queries)."""
    return "--pseudo-queries" if name.endswith("-pq") else ""


def train_cfg(wildcards):
    """Only the -pq checkpoints read train.pseudo_queries: the others must not rerun when it changes."""
    return cfg_json("train", drop=() if wildcards.name.endswith("-pq") else ("pseudo_queries",))


rule train_generative:
    """Generative stage: cross-entropy from each train caption to its image's identifier; best epoch on val."""
    input:
        unpack(lambda wildcards: identifier_files(wildcards.name.removesuffix("-pq"))),
        features=f"{DATA}/features",
    output:
        directory(f"{DATA}/checkpoints/{{name}}-gen"),
    wildcard_constraints:
        name="[a-z0-9]+(-pq)?",
    log:
        f"logs/{DATASET}/train_generative_{{name}}.log",
    params:
        cfg=train_cfg,
        pq=lambda wildcards: pq_flag(wildcards.name),
    threads: step_threads("train")
    resources:
        mem_mb=8000,
        runtime=600,
        gpu=GPU("train"),
    shell:
        "avg train --params-json {params.cfg:q} --features {input.features} "
        "--identifiers {input.identifiers} --stage generative {params.pq} --out {output} 2>&1 | tee {log}"


rule train_discriminative:
    """Discriminative stage: listwise ranking of the gold identifier against constrained beams, plus CE."""
    input:
        unpack(lambda wildcards: identifier_files(wildcards.name.removesuffix("-pq"))),
        features=f"{DATA}/features",
        init=f"{DATA}/checkpoints/{{name}}-gen",
    output:
        directory(f"{DATA}/checkpoints/{{name}}"),
    wildcard_constraints:
        name="[a-z0-9]+(-pq)?",
    log:
        f"logs/{DATASET}/train_discriminative_{{name}}.log",
    params:
        cfg=train_cfg,
        pq=lambda wildcards: pq_flag(wildcards.name),
    threads: step_threads("train")
    resources:
        mem_mb=8000,
        runtime=600,
        gpu=GPU("train"),
    shell:
        "avg train --params-json {params.cfg:q} --features {input.features} "
        "--identifiers {input.identifiers} --stage discriminative {params.pq} --init-from {input.init} --out {output} 2>&1 | tee {log}"
