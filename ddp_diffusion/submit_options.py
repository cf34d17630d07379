"""The `ddp-diffusion submit` flags, each stated once: as a field of `SubmitOptions`.

A field's name, type, default and metadata (help, the submitit parameter it is) give its
argparse argument (`add_arguments`), its value read back from the parsed arguments
(`from_args`) and, for most, the submitit parameter that `slurm.build_executor` sets. Neither
torch nor submitit is imported here: the CLI builds its parser from this module, and
`ddp-diffusion --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ddp_diffusion.errors import UserError


def parse_sbatch(items: list[str]) -> dict[str, str | bool]:
    """Extra sbatch parameters "KEY=VALUE" or "FLAG" (e.g. mail-type=END, exclusive)."""
    out: dict[str, str | bool] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise UserError(f"--sbatch '{item}' must look like KEY=VALUE or FLAG")
        out[key] = value if sep else True
    return out


def parse_sweep(items: list[str]) -> list[tuple[str, list[str]]]:
    """--sweep KEY=V1,V2,... (repeatable) as (key, values), in order; one value is allowed."""
    out: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(parts):
            raise UserError(f"--sweep '{item}' must look like KEY=V1,V2,... e.g. "
                            "train.lr=1e-4,2e-4")
        if key.strip() in (k for k, _ in out):
            raise UserError(f"--sweep {key.strip()} is given twice; list all its values in one")
        if len(set(parts)) != len(parts):
            raise UserError(f"--sweep '{item}' repeats a value")
        out.append((key.strip(), parts))
    return out


def _flag(default: Any = None, help: str | None = None, *, submitit: str | None = None,
          flag: str | None = None, metavar: str | None = None,
          parse: Callable[[list[str]], Any] | None = None) -> Any:
    """A SubmitOptions field that is a flag.

    submitit: the submitit parameter that takes the value unchanged (None: build_executor
    derives a parameter from it, or gives it to the executor itself); flag: the flag when it
    is not --field-name; parse: makes the flag repeatable, and turns its list of values into
    the field's value (the default is what no value parses to).
    """
    metadata = {"help": help, "submitit": submitit, "flag": flag, "metavar": metavar,
                "parse": parse}
    if parse is not None:
        return dataclasses.field(default_factory=lambda: parse([]), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class SubmitOptions:
    """What to ask SLURM for (the `ddp-diffusion submit` flags)."""

    nodes: int = _flag(1, submitit="nodes")
    gpus_per_node: int = _flag(0, "also the tasks per node")
    tasks_per_node: int = _flag(0, "training processes per node (default: GPUs per node, or 1)")
    cpus_per_task: int | None = _flag(submitit="cpus_per_task")
    partition: str | None = _flag(submitit="slurm_partition")
    account: str | None = _flag(submitit="slurm_account")
    qos: str | None = _flag(submitit="slurm_qos")
    time: str = _flag("24:00:00", "time limit, e.g. 90, 4:00:00, 2-00:00")
    mem: str | None = _flag(help="memory per node, e.g. 64G", submitit="slurm_mem")
    constraint: str | None = _flag(submitit="slurm_constraint")
    exclude: str | None = _flag(help="nodes to avoid", submitit="slurm_exclude")
    job_name: str = _flag("ddp-diffusion", submitit="name")
    sbatch: dict[str, str | bool] = _flag(  # noqa: RUF009 (a field with a default_factory)
        help="extra sbatch parameter (repeatable), e.g. mail-type=END or exclusive",
        metavar="KEY=VALUE", parse=parse_sbatch)
    folder: str | None = _flag(help="submitit folder for logs and pickles "
                                    "(default: OUT_DIR/slurm)")
    local: bool = _flag(False, "run here with submitit's local executor")
    signal_delay_s: int = _flag(
        120, "USR2 this long before the time limit, to checkpoint and requeue",
        submitit="slurm_signal_delay_s", flag="--signal-delay", metavar="SECONDS")
    max_requeues: int = _flag(10, "how often the job may requeue itself after a stop signal")
    sweep: list[tuple[str, list[str]]] = _flag(  # noqa: RUF009 (a field with a default_factory)
        help="a config key's values (repeatable): one SLURM job array of every combination, "
             "each point in OUT_DIR/<its overrides>/ and its own W&B run in one group",
        metavar="KEY=V1,V2,...", parse=parse_sweep)
    max_parallel: int = _flag(0, "with --sweep: at most this many points run at once (0: all)")

    @property
    def tasks(self) -> int:
        """Tasks (training processes) per node."""
        return self.tasks_per_node or self.gpus_per_node or 1

    def submitit_copies(self) -> dict[str, Any]:
        """The submitit parameters that are flags' values unchanged (partition, mem, ...)."""
        return {f.metadata["submitit"]: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["submitit"] is not None}


def _value_type(hint: Any) -> Any:
    """What a flag's text is converted to: int for `int` and for `int | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = (t for t in typing.get_args(hint) if t is not type(None))
    return hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument per SubmitOptions field, stored under the field's name."""
    hints = typing.get_type_hints(SubmitOptions)
    for f in dataclasses.fields(SubmitOptions):
        meta = f.metadata
        kind = _value_type(hints[f.name])
        how: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if meta["metavar"] is not None:  # store_true takes no metavar at all
            how["metavar"] = meta["metavar"]
        if meta["parse"] is not None:
            how.update(action="append", default=[])
        elif kind is bool:
            how.update(action="store_true", default=f.default)
        else:
            how.update(type=kind, default=f.default)
        parser.add_argument(meta["flag"] or f"--{f.name.replace('_', '-')}", **how)


def from_args(args: argparse.Namespace) -> SubmitOptions:
    """The options of `add_arguments`' parsed flags; a malformed --sbatch is a UserError."""
    def value(f: dataclasses.Field) -> Any:
        parse = f.metadata["parse"]
        return getattr(args, f.name) if parse is None else parse(getattr(args, f.name))

    return SubmitOptions(**{f.name: value(f) for f in dataclasses.fields(SubmitOptions)})
