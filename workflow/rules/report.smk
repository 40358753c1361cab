REPORT = f"reports/{DATASET}"


rule report:
    """Comparison tables, figures and pages for people (reports/<dataset>/)."""
    input:
        evals=expand(f"{DATA}/eval/{{method}}.json", method=METHODS),
        rankings=expand(f"{DATA}/eval/{{method}}.rankings.jsonl", method=METHODS),
        identifiers=expand(f"{DATA}/identifiers/{{scheme}}.json", scheme=SCHEMES),
        raw=f"{DATA}/raw",
        bench=dag.REPORT_BENCH,
    output:
        md=f"{REPORT}/comparison.md",
        html=report(f"{REPORT}/comparison.html", caption="../report/comparison.rst", category="Comparison"),
        recall=report(f"{REPORT}/recall_at_k.png", caption="../report/recall_at_k.rst", category="Retrieval"),
        curves=report(f"{REPORT}/training_curves.png", caption="../report/training_curves.rst", category="Training"),
        util=report(f"{REPORT}/codebook_utilisation.png", caption="../report/codebook_utilisation.rst", category="Identifiers"),
        eff=report(f"{REPORT}/efficiency.png", caption="../report/efficiency.rst", category="Efficiency"),
        tradeoff=report(f"{REPORT}/tradeoff.png", caption="../report/tradeoff.rst", category="Retrieval"),
        metrics=f"{REPORT}/metrics.json",
        recall_csv=f"{REPORT}/plots/recall_at_k.csv",
        util_csv=f"{REPORT}/plots/utilisation.csv",
    log:
        f"logs/{DATASET}/report.log",
    params:
        cfg=cfg_json("report"),
        dataset_dir=lambda wildcards, input: os.path.dirname(input.raw),
        outdir=lambda wildcards, output: os.path.dirname(output.md),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "avg report --params-json {params.cfg:q} --dataset-dir {params.dataset_dir} --evals {input.evals} "
        "--identifiers {input.identifiers} --runs runs --bench {input.bench} --out {params.outdir} 2>&1 | tee {log}"
