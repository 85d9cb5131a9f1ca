# Simulation-based inference pipeline: simulate -> train -> sample -> validate -> report.
# The library and its CLI live in src/pipeline; rules only wire files together.
import copy
from pathlib import Path

import yaml

from snakemake.utils import min_version, validate

from pipeline.options import as_schema_types

min_version("9.0")


configfile: "config/config.yaml"


# A task's training block in a --configfile (an experiment) or --config replaces config.yaml's
# block of that task rather than merging into it: a block's options are chosen together, and
# config.yaml's (npe's embedding) may not even apply to the experiment's method.
task_overrides = copy.deepcopy(config.get("task_train", {}))
for layer in [
    *(yaml.safe_load(path.read_text()) for path in workflow.config_settings.configfiles),
    workflow.config_settings.config,
]:
    blocks = (layer or {}).get("task_train")
    if isinstance(blocks, dict):
        task_overrides.update(copy.deepcopy(blocks))
config_schema = yaml.safe_load(
    Path(workflow.basedir, "workflow/schemas/config.schema.yaml").read_text()
)
config.update(as_schema_types(dict(config), config_schema))
# Validation fills in the schema's defaults. Per-task training overrides must stay exactly what
# was written, or their filled-in defaults would mask every option of `train`.
validate(config, "workflow/schemas/config.schema.yaml")
config["task_train"] = as_schema_types(task_overrides, config_schema["properties"]["task_train"])


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


# The index is rebuilt after every report. A run that fails before its report may have
# replaced or removed (Snakemake removes a job's outputs before rerunning it) results the last
# verdict rests on: it rebuilds the index, which lists such a verdict as stale. A run also marks
# the experiment while it goes, so that the index of a run killed outright (a time limit, the
# OOM killer: no hook runs) says so.
onstart:
    mark_run(True)


onsuccess:
    mark_run(False)


onerror:
    mark_run(False)


rule all:
    input:
        EXPERIMENT / "report.html",
        Path(config["results"]) / "index.html",
        all_shards(),


check_profile_resources(workflow)
