# Simulation-based inference pipeline: simulate -> train -> sample -> validate -> report.
# The library and its CLI live in src/pipeline; rules only wire files together.
import copy

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


# Validation fills in the schema's defaults. Per-task training overrides must stay exactly what
# was written, or their filled-in defaults would mask every option of `train`.
task_overrides = copy.deepcopy(config.get("task_train", {}))
validate(config, "workflow/schemas/config.schema.yaml")
config["task_train"] = task_overrides


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/rounds.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/budgets.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        EXPERIMENT / "report.html",
        Path(config["results"]) / "index.html",
        all_shards(),


check_profile_resources(workflow)
