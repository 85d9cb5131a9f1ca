rule sample_test:
    input:
        model=TASK_DIR + "/model/posterior.pt",
        observations=TASK_DIR + "/sims/test.h5",
    output:
        TASK_DIR + "/samples/test.h5",
    log:
        LOGS + "/sample/{task}-test.log",
    benchmark:
        BENCHMARKS + "/sample/{task}-test.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        num_samples=config["sample"]["num_test_samples"],
        seed=config["sample"]["seed"],
        model_dir=lambda wildcards, input: Path(input.model).parent,
    threads: 1
    shell:
        "pipeline sample --model {params.model_dir} --observations {input.observations}"
        " --num-samples {params.num_samples} --seed {params.seed} --out {output}"
        " --threads {threads} --log {log}"


rule sample_observations:
    input:
        model=TASK_DIR + "/model/posterior.pt",
        observations=TASK_DIR + "/observations.h5",
    output:
        TASK_DIR + "/samples/observations.h5",
    log:
        LOGS + "/sample/{task}-observations.log",
    benchmark:
        BENCHMARKS + "/sample/{task}-observations.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        num_samples=config["sample"]["num_observation_samples"],
        seed=config["sample"]["seed"],
        model_dir=lambda wildcards, input: Path(input.model).parent,
    threads: 1
    shell:
        "pipeline sample --model {params.model_dir} --observations {input.observations}"
        " --num-samples {params.num_samples} --seed {params.seed} --out {output}"
        " --threads {threads} --log {log}"
