"""``lorachain rehearsal``: a CPU rehearsal of the paper config, or of the paper config with one of its
commented model blocks applied (``--block``), on local stand-ins for its models."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorachain.cli.common import fail


def run(args: argparse.Namespace) -> int:
    import yaml

    from lorachain.config_checks import ConfigError
    from lorachain.rehearsal import build_stand_ins, config_block, rehearsal_config, with_block

    paper_file, dreambooth = Path(args.paper), Path(args.dreambooth)
    if not paper_file.is_file():
        return fail("rehearsal", f"--paper {paper_file}: no such file")
    if not (dreambooth / "prompts_and_classes.txt").is_file():
        return fail("rehearsal", f"--dreambooth {dreambooth}: not a DreamBooth dataset (no prompts_and_classes.txt)")
    text = paper_file.read_text()
    paper = yaml.safe_load(text)
    if args.block:
        try:
            paper = with_block(paper, config_block(text, args.block, source=str(paper_file)))
        except ConfigError as error:
            return fail("rehearsal", f"--block {args.block}: {error}")
    out = Path(args.directory).absolute()
    config = rehearsal_config(paper, build_stand_ins(out / "stand-ins", paper), dreambooth)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {out / 'config.yaml'} and its stand-ins in {out / 'stand-ins'}; run it with")
    print(f"  snakemake --profile profiles/local --configfile={out / 'config.yaml'} --directory {out}")
    return 0


def register(commands) -> None:
    rehearsal = commands.add_parser(
        "rehearsal",
        help="write a CPU rehearsal of the paper config (local stand-ins for its models)",
        description="Write local stand-ins of the same classes for every model of the paper config and "
        "DIR/config.yaml, the paper config with only its models, dataset roots and sizes substituted.",
    )
    rehearsal.add_argument(
        "directory", metavar="DIR", help="where the stand-ins and the config go (the run's working directory)"
    )
    rehearsal.add_argument(
        "--dreambooth", required=True, metavar="ROOT", help="a DreamBooth dataset directory (prompts_and_classes.txt)"
    )
    rehearsal.add_argument(
        "--paper",
        default="config/config.yaml",
        metavar="YAML",
        help="the config to rehearse (default config/config.yaml)",
    )
    rehearsal.add_argument(
        "--block",
        metavar="NAME",
        help="rehearse the paper config with its commented block NAME applied ('# >>> NAME' ... '# <<< NAME', "
        "e.g. sd3.5-medium or flux.1-dev): its model gets a tiny stand-in of the same pipeline class",
    )
    rehearsal.set_defaults(handler=run)
