# Hyperparameter search (search.tasks): trials as jobs, then the choice the train rule reads.
# Trial i is proposed from every trial of the earlier generations (search.parallel trials each):
# its inputs are their scores, so its options never depend on which jobs happened to run first.

# Defined only when a search is configured: Snakemake refuses --containerize when a rule with a
# dynamic conda environment (search_trial's, chosen by accelerator) is outside the DAG.


if SEARCHED:

    wildcard_constraints:
        trial=r"\d+",


    rule search_trial:
        input:
            data=task_path("sims/train.h5"),
            history=search_history,
            stamp=params_stamp("search_trial"),
        output:
            task_path("search/trial-{trial}/score.json"),
        log:
            log_path("search/{task}/trial-{trial}.log"),
        benchmark:
            benchmark_path("search/{task}/trial-{trial}.tsv")
        conda:
            train_environment
        params:
            options=train_options,
            space=json.dumps(SEARCH["space"], sort_keys=True),
            search=search_trial_options(),
            out=lambda wildcards, output: Path(output[0]).parent,
        threads: 1
        resources:
            mpi="",
        shell:
            "{resources.mpi} pipeline search-trial --data {input.data:q} --out {params.out:q}"
            " --trial {wildcards.trial} --history {input.history:q}"
            " --train-options {params.options:q} --space {params.space:q}"
            " --options {params.search:q} --threads {threads} --overwrite --log {log:q}"


    rule search_select:
        input:
            scores=lambda wildcards: search_trials(wildcards.task),
            stamp=params_stamp("search_select"),
        output:
            task_path("search/best.json"),
        log:
            log_path("search/{task}/select.log"),
        conda:
            "../../envs/pipeline.yaml"
        params:
            search=stage_options(SearchOptions, "search"),
        shell:
            "pipeline search-select --scores {input.scores:q} --options {params.search:q} --overwrite"
            " --out {output:q} --log {log:q}"
