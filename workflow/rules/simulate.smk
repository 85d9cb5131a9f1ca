# Simulations of one split (train or test) of a task. Two layouts, chosen by simulate.scatter:
# one job whose chunks are spread over MPI ranks, or one job per chunk and a merge job.


if not config["simulate"]["scatter"]:

    # {resources.mpi} launches the ranks: mpiexec locally, srun in the SLURM profile. Chunks
    # shrink, in whole seed blocks, to give every rank one where there are enough blocks
    # (--fit-chunks; other ranks stay idle); the data do not depend on it.
    rule simulate:
        input:
            task_files,
            stamp=params_stamp("simulate"),
        output:
            task_path("sims/{split}.h5"),
        log:
            log_path("simulate/{task}-{split}.log"),
        benchmark:
            benchmark_path("simulate/{task}-{split}.tsv")
        conda:
            "../../envs/pipeline.yaml"
        wildcard_constraints:
            task=one_of(SIMULATED),
        params:
            task=lambda wildcards: task_spec(wildcards.task),
            options=simulate_options,
        threads: 1
        resources:
            mpi="mpiexec",
            tasks=1,
        shell:
            "{resources.mpi} -n {resources.tasks} pipeline simulate --task {params.task:q}"
            " --options {params.options:q} --fit-chunks --out {output:q} --overwrite"
            " --log {log:q}"

else:

    rule simulate_chunk:
        input:
            task_files,
            stamp=params_stamp("simulate_chunk", by=("split",), skip=("start",)),
        output:
            task_path("sims/{split}.h5.shards/chunk-{start}-{stop}.h5"),
        log:
            log_path("simulate/{task}-{split}-{start}-{stop}.log"),
        benchmark:
            benchmark_path("simulate/{task}-{split}-{start}-{stop}.tsv")
        conda:
            "../../envs/pipeline.yaml"
        wildcard_constraints:
            task=one_of(SIMULATED),
            start=r"\d{12}",
            stop=r"\d{12}",
        params:
            task=lambda wildcards: task_spec(wildcards.task),
            options=simulate_options,
            start=lambda wildcards: int(wildcards.start),
            out=task_path("sims/{split}.h5"),
        threads: 1
        shell:
            "pipeline simulate --task {params.task:q} --options {params.options:q}"
            " --chunk {params.start:q} --out {params.out:q} --log {log:q}"

    rule merge_simulations:
        input:
            lambda wildcards: shard_files(wildcards.task, wildcards.split),
            stamp=params_stamp("merge_simulations"),
        output:
            task_path("sims/{split}.h5"),
        log:
            log_path("simulate/{task}-{split}-merge.log"),
        benchmark:
            benchmark_path("simulate/{task}-{split}-merge.tsv")
        conda:
            "../../envs/pipeline.yaml"
        wildcard_constraints:
            task=one_of(SIMULATED),
        params:
            task=lambda wildcards: task_spec(wildcards.task),
            options=simulate_options,
        threads: 1
        shell:
            "pipeline merge --task {params.task:q} --options {params.options:q}"
            " --out {output:q} --overwrite --log {log:q}"


rule observe:
    input:
        task_files,
        mock_files,
        stamp=params_stamp("observe"),
    output:
        task_path("observations.h5"),
    log:
        log_path("observe/{task}.log"),
    benchmark:
        benchmark_path("observe/{task}.tsv")
    conda:
        "../../envs/pipeline.yaml"
    wildcard_constraints:
        task=one_of(SYNTHETIC),
    params:
        task=lambda wildcards: task_spec(wildcards.task),
        # The config's observations section is the stage's options (ObserveOptions).
        options=json.dumps(config["observations"], sort_keys=True),
        mock=lambda wildcards: mock_arguments(wildcards.task),
    shell:
        "pipeline observe --task {params.task:q} --options {params.options:q} {params.mock:q}"
        " --out {output:q} --overwrite --log {log:q}"
