# Checkpoints go to model.checkpoints/<digest>/, outside the declared outputs: Snakemake deletes
# the outputs of a failed job, and a retry must find the checkpoints to resume from.
rule train:
    input:
        data=task_path("sims/train.h5"),
        chosen=search_choice,
        stamp=params_stamp("train"),
    output:
        posterior=task_path("model/posterior.pt"),
        spec=task_path("model/posterior.json"),
        metrics=task_path("model/metrics.csv"),
    log:
        log_path("train/{task}.log"),
    benchmark:
        benchmark_path("train/{task}.tsv")
    conda:
        train_environment
    wildcard_constraints:
        task=one_of(TRAINED),
    params:
        options=train_options,
        chosen=chosen_flag,
        model_dir=lambda wildcards, output: Path(output.posterior).parent,
    threads: 1
    resources:
        # The command that starts the training processes: empty for one process (Lightning may
        # still start --devices of its own); "srun" under SLURM starts the allocation's tasks.
        mpi="",
    shell:
        "{resources.mpi} pipeline train --data {input.data:q} --out {params.model_dir:q}"
        " --options {params.options:q} {params.chosen:q} --threads {threads} --overwrite"
        " --log {log:q}"
