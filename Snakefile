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


# The index is rebuilt after every report. A run that fails before its report leaves the
# results it replaced (or whose outputs Snakemake removed before rerunning their jobs) beside
# the last verdict: it records its failure and rebuilds the index, which lists the verdict as
# stale (the pipeline in this Python, found whatever PATH the run was started with).
onerror:
    import subprocess
    import sys
    from datetime import datetime

    from pipeline.report.index import FAILED_RUN

    results = Path(config["results"])
    try:
        EXPERIMENT.mkdir(parents=True, exist_ok=True)
        (EXPERIMENT / FAILED_RUN).write_text(
            f"a run of this experiment failed at {datetime.now().isoformat(timespec='seconds')}; "
            "report.html and summary.json are of the results before it\n"
        )
        if (results / "index.html").exists():
            main = "import pipeline.cli as c; raise SystemExit(c.main())"
            command = [sys.executable, "-c", main, "index", "--results", str(results)]
            command += ["--out", str(results / "index.html")]
            subprocess.run([*command, "--log", log_path("index.log")], check=False)
    except OSError as error:  # the run's own error is the one to report
        print(f"could not mark {EXPERIMENT} as failed: {error}")


rule all:
    input:
        EXPERIMENT / "report.html",
        Path(config["results"]) / "index.html",
        all_shards(),


check_profile_resources(workflow)
