rule report:
    input:
        metrics=expand(TASK_DIR + "/validation/metrics.json", task=config["tasks"]),
        models=expand(TASK_DIR + "/model/posterior.json", task=config["tasks"]),
        curves=expand(TASK_DIR + "/model/metrics.csv", task=config["tasks"]),
    output:
        EXPERIMENT / "report.html",
    log:
        LOGS + "/report.log",
    benchmark:
        BENCHMARKS + "/report.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        config=json.dumps(config, sort_keys=True),
        tasks=" ".join(config["tasks"]),
        c2st_max=config["report"]["c2st_max"],
        coverage_max_deviation=config["report"]["coverage_max_deviation"],
        title=config["report"]["title"],
    shell:
        "pipeline report --experiment-dir {EXPERIMENT} --tasks {params.tasks}"
        " --config-json {params.config:q} --c2st-max {params.c2st_max}"
        " --coverage-max-deviation {params.coverage_max_deviation}"
        " --title {params.title:q} --out {output} --log {log}"
