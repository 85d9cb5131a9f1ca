rule simulate:
    output:
        task_path("sims/{split}.h5"),
    log:
        log_path("simulate/{task}-{split}.log"),
    benchmark:
        benchmark_path("simulate/{task}-{split}.tsv")
    conda:
        "../../envs/pipeline.yaml"
    params:
        num_simulations=simulation_count,
        seed=simulation_seed,
        chunk_size=config["simulate"]["chunk_size"],
        merge=config["simulate"]["merge"],
    threads: 1
    resources:
        mpi="mpiexec",
        tasks=1,
    shell:
        "{resources.mpi} -n {resources.tasks} pipeline simulate --task {wildcards.task}"
        " --num-simulations {params.num_simulations} --seed {params.seed}"
        " --chunk-size {params.chunk_size} --merge {params.merge} --out {output}"
        " --overwrite --log {log}"


rule observe:
    output:
        task_path("observations.h5"),
    log:
        log_path("observe/{task}.log"),
    benchmark:
        benchmark_path("observe/{task}.tsv")
    conda:
        "../../envs/pipeline.yaml"
    params:
        num_observations=config["observations"]["num_observations"],
        num_reference_samples=config["observations"]["num_reference_samples"],
        seed=config["observations"]["seed"],
    shell:
        "pipeline observe --task {wildcards.task} --num-observations {params.num_observations}"
        " --num-reference-samples {params.num_reference_samples} --seed {params.seed}"
        " --out {output} --log {log}"
