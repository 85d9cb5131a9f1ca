rule report:
    input:
        metrics=expand(task_path("validation/metrics.json"), task=config["tasks"]),
        models=expand(task_path("model/posterior.json"), task=config["tasks"]),
        curves=expand(task_path("model/metrics.csv"), task=config["tasks"]),
        budgets=[score for task in config["tasks"] for score in budget_scores(task)],
        rounds=[path for task in config["tasks"] for path in round_files(task)],
        stamp=params_stamp("report"),
    output:
        html=report(
            EXPERIMENT / "report.html",
            caption="../report/report.rst",
            category="Report",
            labels={"page": "pipeline report"},
        ),
        summary=EXPERIMENT / "summary.json",
    log:
        log_path("report.log"),
    benchmark:
        benchmark_path("report.tsv")
    conda:
        "../../envs/pipeline.yaml"
    params:
        experiment_dir=EXPERIMENT,
        config=json.dumps(config, sort_keys=True),
        tasks=config["tasks"],
        specs=[task_spec(name) for name in config["tasks"]],
        budgets=[str(n) for n in BUDGETS],
        rounds=round_counts(),
        # The config's report section is the stage's options (ReportOptions).
        options=json.dumps(config["report"], sort_keys=True),
    shell:
        "pipeline report --experiment-dir {params.experiment_dir:q} --tasks {params.tasks:q}"
        " --task-specs {params.specs:q}"
        " --budgets {params.budgets:q} --rounds {params.rounds:q}"
        " --config-json {params.config:q} --options {params.options:q}"
        " --out {output.html:q} --summary {output.summary:q} --overwrite"
        " --log {log:q}"


# One page over every experiment of the results folder; rebuilt whenever this one's report is.
rule index:
    input:
        EXPERIMENT / "summary.json",
    output:
        Path(config["results"]) / "index.html",
    log:
        log_path("index.log"),
    conda:
        "../../envs/pipeline.yaml"
    params:
        results=lambda wildcards, output: Path(output[0]).parent,
    shell:
        "pipeline index --results {params.results:q} --out {output:q} --overwrite --log {log:q}"
