rule sample_test:
    input:
        model=task_path("model/posterior.pt"),
        observations=task_path("sims/test.h5"),
        region=test_region,
        stamp=params_stamp("sample_test"),
    output:
        task_path("samples/test.h5"),
    log:
        log_path("sample/{task}-test.log"),
    benchmark:
        benchmark_path("sample/{task}-test.tsv")
    conda:
        "../../envs/pipeline.yaml"
    params:
        options=stage_options(
            SampleOptions, "sample", num_samples=config["sample"]["num_test_samples"]
        ),
        model_dir=lambda wildcards, input: Path(input.model).parent,
        region=region_flags,
    threads: 1
    shell:
        "pipeline sample --model {params.model_dir:q} --observations {input.observations:q}"
        " --options {params.options:q} {params.region:q} --out {output:q} --overwrite"
        " --threads {threads} --log {log:q}"


rule sample_observations:
    input:
        model=task_path("model/posterior.pt"),
        observations=observations_of,
        stamp=params_stamp("sample_observations"),
    output:
        task_path("samples/observations.h5"),
    log:
        log_path("sample/{task}-observations.log"),
    benchmark:
        benchmark_path("sample/{task}-observations.tsv")
    conda:
        "../../envs/pipeline.yaml"
    params:
        options=stage_options(
            SampleOptions, "sample", num_samples=config["sample"]["num_observation_samples"]
        ),
        model_dir=lambda wildcards, input: Path(input.model).parent,
    threads: 1
    shell:
        "pipeline sample --model {params.model_dir:q} --observations {input.observations:q}"
        " --options {params.options:q} --out {output:q} --overwrite"
        " --threads {threads} --log {log:q}"
