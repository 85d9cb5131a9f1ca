# The budget study (simulate.budgets): each task trained again on the first N training
# simulations, sampled at the same observations and scored by C2ST against the reference. The
# rules are the main ones with other paths; a budget equal to num_simulations reuses the main
# model, which is trained on exactly those simulations, unless a search chose its options.


# Defined only when some budget needs its own model: Snakemake refuses --containerize when a rule
# with a dynamic conda environment (train's, chosen by accelerator) is outside the DAG.
if TRAINED_BUDGETS:

    use rule train as train_budget with:
        input:
            data=budget_training_data,
            stamp=params_stamp("train_budget"),
        output:
            posterior=task_path("budget-{budget}/model/posterior.pt"),
            spec=task_path("budget-{budget}/model/posterior.json"),
            metrics=task_path("budget-{budget}/model/metrics.csv"),
        log:
            log_path("train/{task}-budget-{budget}.log"),
        benchmark:
            benchmark_path("train/{task}-budget-{budget}.tsv")


    use rule sample_observations as sample_budget with:
        input:
            model=task_path("budget-{budget}/model/posterior.pt"),
            observations=task_path("observations.h5"),
            stamp=params_stamp("sample_budget"),
        output:
            task_path("budget-{budget}/samples/observations.h5"),
        log:
            log_path("sample/{task}-budget-{budget}.log"),
        benchmark:
            benchmark_path("sample/{task}-budget-{budget}.tsv")


rule score_budget:
    input:
        observation_samples=budget_observation_samples,
        observations=task_path("observations.h5"),
        stamp=params_stamp("score_budget"),
    output:
        task_path("budget-{budget}/c2st.json"),
    log:
        log_path("validate/{task}-budget-{budget}.log"),
    benchmark:
        benchmark_path("validate/{task}-budget-{budget}.tsv")
    conda:
        "../../envs/pipeline.yaml"
    params:
        seed=config["validate"]["seed"],
        c2st_folds=config["validate"]["c2st_folds"],
        c2st_max_samples=config["validate"]["c2st_max_samples"],
    threads: 1
    shell:
        "pipeline c2st --observation-samples {input.observation_samples:q}"
        " --observations {input.observations:q} --budget {wildcards.budget} --seed {params.seed:q}"
        " --folds {params.c2st_folds:q} --max-samples {params.c2st_max_samples:q}"
        " --out {output:q} --overwrite --log {log:q}"
