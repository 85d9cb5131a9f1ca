# Checkpoints go to model.checkpoints/<digest>/, outside the declared outputs: Snakemake deletes
# the outputs of a failed job, and a retry must find the checkpoints to resume from.
rule train:
    input:
        TASK_DIR + "/sims/train.h5",
    output:
        posterior=TASK_DIR + "/model/posterior.pt",
        spec=TASK_DIR + "/model/posterior.json",
        metrics=TASK_DIR + "/model/metrics.csv",
    log:
        LOGS + "/train/{task}.log",
    benchmark:
        BENCHMARKS + "/train/{task}.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        options=train_options,
        model_dir=lambda wildcards, output: Path(output.posterior).parent,
    threads: 1
    shell:
        "pipeline train --data {input} --out {params.model_dir}"
        " --options {params.options:q} --threads {threads} --log {log}"
