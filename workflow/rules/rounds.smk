# Sequential inference (rounds.tasks): round r simulates from the region round r-1's posterior
# leaves at the observation inside the earlier rounds' regions, trains on rounds 0..r, and
# truncates again. The number of rounds is in the config, so the DAG is static: adding a round
# adds its jobs and keeps the others.

# Defined only when rounds are configured, like the search rules (snakemake --containerize).


if ROUNDED:

    wildcard_constraints:
        round=r"\d+",


    rule select_observation:
        input:
            observations=task_path("observations.h5"),
            stamp=params_stamp("select_observation"),
        output:
            task_path("rounds/observation.h5"),
        log:
            log_path("rounds/{task}/observation.log"),
        conda:
            "../../envs/pipeline.yaml"
        wildcard_constraints:
            task=one_of(ROUNDED),
        params:
            index=ROUNDS["observation"],
        shell:
            "pipeline select-observation --observations {input.observations:q} --index {params.index:q}"
            " --out {output:q} --overwrite --log {log:q}"


    if config["simulate"]["scatter"]:

        # One job per chunk and a merge, as simulate's scatter layout; each job loads the
        # proposal's posterior. The shards are outputs: deleting one reruns only its chunk.
        rule round_simulate_chunk:
            input:
                task_files,
                proposal=round_proposal,
                stamp=params_stamp("round_simulate_chunk", by=("round",), skip=("start",)),
            output:
                round_path("{round}", "sims.h5.shards/chunk-{start}-{stop}.h5"),
            log:
                log_path("rounds/{task}/round-{round}-simulate-{start}-{stop}.log"),
            benchmark:
                benchmark_path("rounds/{task}/round-{round}-simulate-{start}-{stop}.tsv")
            conda:
                "../../envs/pipeline.yaml"
            wildcard_constraints:
                task=one_of(ROUNDED),
                start=r"\d{12}",
                stop=r"\d{12}",
            params:
                task=lambda wildcards: task_spec(wildcards.task),
                options=round_simulate_options,
                proposal=proposal_flags,
                start=lambda wildcards: int(wildcards.start),
                out=round_path("{round}", "sims.h5"),
            threads: 1
            shell:
                "pipeline simulate --task {params.task:q} --options {params.options:q}"
                " {params.proposal:q} --chunk {params.start:q} --out {params.out:q}"
                " --min-prior-mass {MIN_PRIOR_MASS} --log {log:q}"

        rule merge_round:
            input:
                lambda wildcards: round_shard_files(wildcards.task, int(wildcards.round)),
                proposal=round_proposal,
                stamp=params_stamp("merge_round"),
            output:
                round_path("{round}", "sims.h5"),
            log:
                log_path("rounds/{task}/round-{round}-merge.log"),
            benchmark:
                benchmark_path("rounds/{task}/round-{round}-merge.tsv")
            conda:
                "../../envs/pipeline.yaml"
            wildcard_constraints:
                task=one_of(ROUNDED),
            params:
                task=lambda wildcards: task_spec(wildcards.task),
                options=round_simulate_options,
                proposal=proposal_flags,
            threads: 1
            shell:
                "pipeline merge --task {params.task:q} --options {params.options:q}"
                " {params.proposal:q} --out {output:q} --overwrite --log {log:q}"

    else:

        # MPI ranks as the simulate rule; every rank loads the proposal's posterior.
        rule round_simulate:
            input:
                task_files,
                proposal=round_proposal,
                stamp=params_stamp("round_simulate"),
            output:
                round_path("{round}", "sims.h5"),
            log:
                log_path("rounds/{task}/round-{round}-simulate.log"),
            benchmark:
                benchmark_path("rounds/{task}/round-{round}-simulate.tsv")
            conda:
                "../../envs/pipeline.yaml"
            wildcard_constraints:
                task=one_of(ROUNDED),
            params:
                task=lambda wildcards: task_spec(wildcards.task),
                options=round_simulate_options,
                proposal=proposal_flags,
            threads: 1
            resources:
                mpi="mpiexec",
                tasks=1,
            shell:
                "{resources.mpi} -n {resources.tasks} pipeline simulate --task {params.task:q}"
                " --options {params.options:q} {params.proposal:q} --fit-chunks --out {output:q}"
                " --min-prior-mass {MIN_PRIOR_MASS} --overwrite --log {log:q}"


    rule round_stack:
        input:
            rounds=round_simulations,
            stamp=params_stamp("round_stack"),
        output:
            round_path("{round}", "train.h5"),
        log:
            log_path("rounds/{task}/round-{round}-stack.log"),
        conda:
            "../../envs/pipeline.yaml"
        params:
            task=lambda wildcards: task_spec(wildcards.task),
        shell:
            "pipeline stack-rounds --task {params.task:q} --rounds {input.rounds:q} --out {output:q}"
            " --overwrite --log {log:q}"


    # As the train rule (same options, checkpoints beside the model, resumable); NPE's loss is
    # normalised over the proposal the stacked rounds were drawn from (the last region's).
    rule round_train:
        input:
            data=round_path("{round}", "train.h5"),
            proposal=round_proposal,
            stamp=params_stamp("round_train"),
        output:
            posterior=round_path("{round}", "model/posterior.pt"),
            spec=round_path("{round}", "model/posterior.json"),
            metrics=round_path("{round}", "model/metrics.csv"),
        log:
            log_path("rounds/{task}/round-{round}-train.log"),
        benchmark:
            benchmark_path("rounds/{task}/round-{round}-train.tsv")
        conda:
            train_environment
        params:
            options=train_options,
            model_dir=lambda wildcards, output: Path(output.posterior).parent,
            proposal=train_region_flags,
        threads: 1
        resources:
            mpi="",
        shell:
            "{resources.mpi} pipeline train --data {input.data:q} --out {params.model_dir:q}"
            " --options {params.options:q} {params.proposal:q} --threads {threads}"
            " --overwrite --log {log:q}"


    rule truncate:
        input:
            posterior=round_path("{round}", "model/posterior.pt"),
            spec=round_path("{round}", "model/posterior.json"),
            observation=task_path("rounds/observation.h5"),
            within=round_proposal,
            stamp=params_stamp("truncate"),
        output:
            round_path("{round}", "truncation.json"),
        log:
            log_path("rounds/{task}/round-{round}-truncate.log"),
        benchmark:
            benchmark_path("rounds/{task}/round-{round}-truncate.tsv")
        conda:
            "../../envs/pipeline.yaml"
        params:
            options=truncate_options(),
            model_dir=lambda wildcards, input: Path(input.posterior).parent,
            within=within_flags,
        threads: 1
        shell:
            "pipeline truncate --model {params.model_dir:q} --observations {input.observation:q}"
            " --index 0 {params.within:q} --options {params.options:q} --out {output:q}"
            " --min-prior-mass {MIN_PRIOR_MASS} --threads {threads}"
            " --overwrite --log {log:q}"


    # The last round's posterior is the task's model, where sample and validate look for it.
    rule round_model:
        input:
            posterior=round_path(NUM_ROUNDS - 1, "model/posterior.pt"),
            spec=round_path(NUM_ROUNDS - 1, "model/posterior.json"),
            metrics=round_path(NUM_ROUNDS - 1, "model/metrics.csv"),
        output:
            posterior=task_path("model/posterior.pt"),
            spec=task_path("model/posterior.json"),
            metrics=task_path("model/metrics.csv"),
        log:
            log_path("rounds/{task}/model.log"),
        wildcard_constraints:
            task=one_of(ROUNDED),
        shell:
            "(cp {input.posterior:q} {output.posterior:q} && cp {input.spec:q} {output.spec:q}"
            " && cp {input.metrics:q} {output.metrics:q}) > {log:q} 2>&1"


    # Coverage is checked where the last posterior is valid: on simulations from its region.
    rule round_test_simulate:
        input:
            task_files,
            proposal=round_proposal,
            stamp=params_stamp("round_test_simulate"),
        output:
            task_path("sims/test.h5"),
        log:
            log_path("simulate/{task}-test.log"),
        benchmark:
            benchmark_path("simulate/{task}-test.tsv")
        conda:
            "../../envs/pipeline.yaml"
        wildcard_constraints:
            task=one_of(ROUNDED),
        params:
            task=lambda wildcards: task_spec(wildcards.task),
            options=round_test_options,
            proposal=proposal_flags,
        threads: 1
        resources:
            mpi="mpiexec",
            tasks=1,
        shell:
            "{resources.mpi} -n {resources.tasks} pipeline simulate --task {params.task:q}"
            " --options {params.options:q} {params.proposal:q} --fit-chunks --out {output:q}"
            " --min-prior-mass {MIN_PRIOR_MASS} --overwrite --log {log:q}"
