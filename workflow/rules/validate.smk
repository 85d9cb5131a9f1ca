rule validate:
    input:
        test_samples=task_path("samples/test.h5"),
        observation_samples=task_path("samples/observations.h5"),
        observations=observations_of,
        stamp=params_stamp("validate"),
    output:
        metrics=task_path("validation/metrics.json"),
        estimates=task_path("validation/estimates.csv"),
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
        # The config's validate section is the stage's options (pipeline.options.ValidateOptions).
        options=json.dumps(config["validate"], sort_keys=True),
        out=lambda wildcards, output: Path(output.metrics).parent,
    threads: 1
    shell:
        "pipeline validate --test-samples {input.test_samples:q}"
        " --observation-samples {input.observation_samples:q}"
        " --observations {input.observations:q} --options {params.options:q}"
        " --out {params.out:q} --log {log:q}"
