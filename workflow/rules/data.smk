# The user's own data entering the DAG: existing simulations (config `data`) in place of the
# simulate rules, real observations (config `observed`) in place of the observe rule.


rule import_simulations:
    input:
        task_files,
        data=lambda wildcards: fingerprinted(
            wildcards.task,
            "data",
            sorted({source_file(config["data"][wildcards.task][key]) for key in ("theta", "x")}),
        ),
        stamp=params_stamp("import_simulations"),
    output:
        task_path("sims/{split}.h5"),
    log:
        log_path("import/{task}-{split}.log"),
    benchmark:
        benchmark_path("import/{task}-{split}.tsv")
    conda:
        "../../envs/pipeline.yaml"
    wildcard_constraints:
        task=one_of(IMPORTED),
        split="train|test",
    params:
        task=lambda wildcards: task_spec(wildcards.task),
        theta=lambda wildcards: config["data"][wildcards.task]["theta"],
        x=lambda wildcards: config["data"][wildcards.task]["x"],
        rows=import_rows,
        compression=config["simulate"]["compression"],
    threads: 1
    shell:
        "pipeline import --task {params.task:q} --theta {params.theta:q} --x {params.x:q}"
        " --rows={params.rows:q} --compression {params.compression:q} --out {output:q} --overwrite"
        " --log {log:q}"


rule import_observations:
    input:
        task_files,
        observed=lambda wildcards: fingerprinted(
            wildcards.task, "observed", [source_file(config["observed"][wildcards.task])]
        ),
        stamp=params_stamp("import_observations"),
    output:
        task_path("observations.h5"),
    log:
        log_path("observe/{task}.log"),
    benchmark:
        benchmark_path("observe/{task}.tsv")
    conda:
        "../../envs/pipeline.yaml"
    wildcard_constraints:
        task=one_of(OBSERVED),
    params:
        task=lambda wildcards: task_spec(wildcards.task),
        source=lambda wildcards: config["observed"][wildcards.task],
    threads: 1
    shell:
        "pipeline observe --task {params.task:q} --from {params.source:q} --out {output:q}"
        " --overwrite --log {log:q}"
