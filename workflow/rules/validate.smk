rule validate:
    input:
        test_samples=task_path("samples/test.h5"),
        observation_samples=task_path("samples/observations.h5"),
        observations=task_path("observations.h5"),
    output:
        metrics=task_path("validation/metrics.json"),
        coverage=report(
            task_path("validation/coverage.png"),
            caption="../report/coverage.rst",
            category="Calibration",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "coverage"},
        ),
        sbc=report(
            task_path("validation/sbc.png"),
            caption="../report/sbc.rst",
            category="Calibration",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "SBC ranks"},
        ),
        corner=report(
            task_path("validation/corner.png"),
            caption="../report/corner.rst",
            category="Posteriors",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "corner"},
        ),
        predictive=report(
            task_path("validation/predictive.png"),
            caption="../report/predictive.rst",
            category="Posteriors",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "posterior predictive"},
        ),
    log:
        log_path("validate/{task}.log"),
    benchmark:
        benchmark_path("validate/{task}.tsv")
    conda:
        "../../envs/pipeline.yaml"
    params:
        seed=config["validate"]["seed"],
        c2st_folds=config["validate"]["c2st_folds"],
        c2st_max_samples=config["validate"]["c2st_max_samples"],
        local_c2st_null=config["validate"]["local_c2st_null"],
        predictive_draws=config["validate"]["predictive_draws"],
        predictive_replicates=config["validate"]["predictive_replicates"],
        out=lambda wildcards, output: Path(output.metrics).parent,
    threads: 1
    shell:
        "pipeline validate --test-samples {input.test_samples:q}"
        " --observation-samples {input.observation_samples:q}"
        " --observations {input.observations:q} --seed {params.seed:q}"
        " --c2st-folds {params.c2st_folds:q} --c2st-max-samples {params.c2st_max_samples:q}"
        " --local-c2st-null {params.local_c2st_null:q}"
        " --predictive-draws {params.predictive_draws:q}"
        " --predictive-replicates {params.predictive_replicates:q}"
        " --out {params.out:q} --log {log:q}"
