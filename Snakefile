# lorachain: continual and modular LoRA personalisation of text-to-image diffusion models.
#   snakemake --profile profiles/local                              # the demo on the miniature world (config/demo.yaml)
#   snakemake --profile profiles/local --configfile config/config.yaml   # the paper's grid
from snakemake.utils import min_version

from lorachain.cluster_checks import check_slurm_profile
from lorachain.config_checks import check_config, validate_config
from lorachain.plan import all_outputs, export_outputs

min_version("9.0")

if not config:  # --configfile replaces the demo instead of being merged into it

    configfile: "config/demo.yaml"


validate_config(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")
check_config(config)  # what the schema cannot see; the dry-run makes this check too


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/world.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/modular.smk"
include: "workflow/rules/export.smk"


report: "workflow/report/workflow.rst"


onstart:
    check_slurm_profile(workflow)


rule all:
    """Every domain's tables, heatmaps, curves and image grid (and so every state, sample and score)."""
    input:
        all_outputs(config),


rule export:
    """`snakemake export`: every continual run's final state and every merge at its largest k as
    diffusers / kohya LoRA files (and fused U-Nets): config block `export`. Not part of `all`."""
    input:
        export_outputs(config),
