rule validate:
    input:
        test_samples=TASK_DIR + "/samples/test.h5",
        observation_samples=TASK_DIR + "/samples/observations.h5",
        observations=TASK_DIR + "/observations.h5",
    output:
        metrics=TASK_DIR + "/validation/metrics.json",
        coverage=TASK_DIR + "/validation/coverage.png",
        sbc=TASK_DIR + "/validation/sbc.png",
        corner=TASK_DIR + "/validation/corner.png",
    log:
        LOGS + "/validate/{task}.log",
    benchmark:
        BENCHMARKS + "/validate/{task}.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        seed=config["validate"]["seed"],
        c2st_folds=config["validate"]["c2st_folds"],
        c2st_max_samples=config["validate"]["c2st_max_samples"],
        out=lambda wildcards, output: Path(output.metrics).parent,
    threads: 1
    shell:
        "pipeline validate --test-samples {input.test_samples}"
        " --observation-samples {input.observation_samples}"
        " --observations {input.observations} --seed {params.seed}"
        " --c2st-folds {params.c2st_folds} --c2st-max-samples {params.c2st_max_samples}"
        " --out {params.out} --log {log}"
