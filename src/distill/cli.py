"""The `distill` command line: parse config + overrides, call one stage, say where the result is."""

from __future__ import annotations

import inspect
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from distill.errors import ConfigError, DistillError, Terminated
from distill.stages import STAGES, Stage, resolve

app = typer.Typer(
    help="Distill a large teacher LLM into a small student that serves on a small GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
task_app = typer.Typer(help="The config's task pack: its prompts and its checks.", no_args_is_help=True)
app.add_typer(task_app, name="task")

console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Pipeline YAML, e.g. configs/tiny.yaml.")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.lr=1e-4 generate.num_examples=64.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Discard this stage's existing output and redo it.")]


def _fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a command body; user errors become one line each and a non-zero exit, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_log_handler()], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress
    # transformers imports torchao (the int8 export) whenever a model loads, and each import warns that torchao's
    # CUDA kernels cannot load on torch's CPU build and that torch deprecates a registration torchao makes for
    # torch.compile: nothing a CPU run can act on. Errors still show.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return fn()
    except ConfigError as exc:
        for problem in exc.problems:
            err_console.print(f"[bold red]error:[/] {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except DistillError as exc:
        _fail(str(exc), exc.exit_code)
    except Terminated:
        _fail("terminated; re-run the same command to resume", 128 + signal.SIGTERM)
    except KeyboardInterrupt:
        _fail("interrupted; re-run the same command to resume", 130)


def _terminate(_signum: int, _frame: Any) -> None:
    raise Terminated


def _log_handler() -> logging.Handler:
    from rich.logging import RichHandler

    return RichHandler(console=err_console, show_path=False, rich_tracebacks=False, markup=False)


def _load(config: Path, overrides: list[str] | None) -> Any:
    from distill.config import load_config

    return load_config(config, overrides or [])


def _show(title: str, data: dict[str, Any], rows: list[tuple[str, str]], as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps(data))
        return
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _stage_command(stage: Stage) -> Callable[..., None]:
    """The command of one stage, from its registry entry: config, overrides, --overwrite, its own options, and
    --dry-run/--json where it has a preview."""

    def command(
        config: Path,
        overrides: list[str] | None,
        overwrite: bool,
        dry_run: bool = False,
        as_json: bool = False,
        **options: Any,
    ) -> None:
        def body() -> None:
            cfg = _load(config, overrides)
            if dry_run:
                _show(*resolve(stage.preview)(cfg), as_json)
                return
            console.print(f"[green]{stage.name}:[/] {stage.run(cfg, overwrite=overwrite, **options)}")

        _guard(body)

    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ConfigArg),
        inspect.Parameter("overrides", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=OverridesArg, default=None),
        inspect.Parameter("overwrite", keyword, annotation=OverwriteOpt, default=False),
    ]
    for option in stage.options:
        flag = option.flag or "--" + option.name.replace("_", "-")
        annotation = Annotated[option.type, typer.Option(flag, help=option.help)]
        params.append(inspect.Parameter(option.name, keyword, annotation=annotation, default=option.default))
    if stage.preview is not None:
        dry_run = Annotated[bool, typer.Option("--dry-run", help="Print what it would do; start nothing.")]
        params.append(inspect.Parameter("dry_run", keyword, annotation=dry_run, default=False))
        params.append(inspect.Parameter("as_json", keyword, annotation=JsonOpt, default=False))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


# Stage commands, in pipeline order, from the stage registry.
for _stage in STAGES.values():
    app.command(_stage.name, help=_stage.help)(_stage_command(_stage))


@app.command()
def deploy(
    config: ConfigArg,
    overrides: OverridesArg = None,
    port: Annotated[int, typer.Option(help="Port of the OpenAI-compatible base URL on 127.0.0.1.")] = 8080,
) -> None:
    """Serve the student the way `distill serve` found best, on 127.0.0.1, until Ctrl-C or SIGTERM; restarts
    a server process that dies."""

    def body() -> None:
        from distill.serving.deploy import deploy as run_deploy

        run_deploy(_load(config, overrides), port, announce=lambda line: console.print(line, highlight=False))

    _guard(body)


@app.command("run")
def run_all(
    config: ConfigArg,
    overrides: OverridesArg = None,
    start: Annotated[str | None, typer.Option("--from", help="First stage to run.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Last stage to run.")] = None,
) -> None:
    """Chain generate -> train -> merge -> export -> serve -> eval, skipping complete stages, resuming partial
    ones; then write REPORT.md."""

    def body() -> None:
        from distill.pipeline import run_pipeline

        report = run_pipeline(_load(config, overrides), start, until)
        console.print(f"[green]run:[/] report at {report}")

    _guard(body)


@app.command()
def validate(config: ConfigArg, overrides: OverridesArg = None) -> None:
    """Check a config (and overrides) and its task's inputs without running anything; print the resolved config."""

    def body() -> None:
        import yaml

        from distill.stages.generate import input_counts, requested, size_problems
        from distill.tasks import load_task

        cfg = _load(config, overrides)
        task = load_task(cfg)  # the task's files (JSONL, schema, catalog, python factory) are read and checked
        counts = input_counts(cfg, task)
        if problems := size_problems(cfg, task, counts):
            raise ConfigError(problems)
        console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")
        asked = requested(cfg)
        known = "; ".join(
            f"{split} {usable:,} usable"
            + (f" of {inputs:,}" if usable < inputs else "")
            + f", asks {'all' if asked[split] is None else asked[split]}"
            for split, (inputs, usable) in counts.items()
            if usable is not None
        )
        err_console.print(
            f"[green]ok:[/] {config} is valid; task '{task.name}'" + (f" (inputs: {known})" if known else ""),
            soft_wrap=True,
        )

    _guard(body)


@app.command()
def plan(config: ConfigArg, overrides: OverridesArg = None, as_json: JsonOpt = False) -> None:
    """Parameters, steps and memory of the training run, from the student on the meta device (as `train --dry-run`)."""

    def body() -> None:
        from distill.plan import preview

        _show(*preview(_load(config, overrides)), as_json)

    _guard(body)


@app.command("tiny-models")
def tiny_models(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write teacher/ and student/ into.")],
    seed: Annotated[int, typer.Option(help="Seed for weights and tokenizer.")] = 0,
    config: Annotated[Path | None, typer.Option(help="Take models.tiny settings from this pipeline YAML.")] = None,
) -> None:
    """Build a tiny random Qwen3 teacher and Gemma3 student with a tokenizer trained on task text
    (the config's task; the crew task without --config)."""

    def body() -> None:
        from distill.config import TinyModelsConfig
        from distill.models import build_tiny
        from distill.tasks import default_task, load_task

        spec = TinyModelsConfig(seed=seed)
        if config is not None:
            cfg = _load(config, None)
            spec = cfg.models.tiny.model_copy(update={"seed": seed}) if cfg.models.tiny else spec
            task = load_task(cfg)
        else:
            task = default_task(seed)
        paths = build_tiny(out_dir, spec, task)
        for role, path in paths.items():
            console.print(f"{role}: {path}")

    _guard(body)


@task_app.command("sample")
def task_sample(
    config: ConfigArg,
    overrides: OverridesArg = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Prompts to print.")] = 1,
    start: Annotated[int, typer.Option(help="Index of the first input.")] = 0,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "train",
) -> None:
    """Print task prompts exactly as teacher and student see them."""

    def body() -> None:
        from distill.tasks import SPLITS, load_task

        if split not in SPLITS:
            raise DistillError(f"--split {split}: use one of {', '.join(SPLITS)}")
        task = load_task(_load(config, overrides))
        for index in range(start, start + n):
            example = task.example(split, index)
            if example is None:
                break
            console.rule(f"{split} input {index} · id {example.id} · group {example.group}")
            console.print(example.prompt, highlight=False, markup=False, soft_wrap=True)

    _guard(body)


@task_app.command("check")
def task_check(
    config: ConfigArg,
    payload: Annotated[Path, typer.Option(help="The input's payload JSON, or a dataset record with a 'payload'.")],
    answer: Annotated[Path, typer.Option(help="Answer text file to check.")],
    overrides: OverridesArg = None,
) -> None:
    """Check an answer with the config's task: prints {"valid", "violations"}; exit 0 valid, 1 invalid, 2 bad input."""

    def body() -> None:
        from distill.tasks import TaskError, load_task

        task = load_task(_load(config, overrides))
        try:
            violations = task.check(answer.read_text(encoding="utf-8"), _read_payload(payload))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TaskError) as exc:
            _fail(_input_error(exc, payload, answer), 2)
        result = {"valid": not violations, "violations": [{"check": v.check, "detail": v.detail} for v in violations]}
        print(json.dumps(result, ensure_ascii=False))
        raise typer.Exit(0 if result["valid"] else 1)

    _guard(body)


@task_app.command("grammar")
def task_grammar(
    config: ConfigArg,
    payload: Annotated[Path, typer.Option(help="The input's payload JSON, or a dataset record with a 'payload'.")],
    overrides: OverridesArg = None,
) -> None:
    """Print the input's output grammar (llama.cpp GBNF): what a client sends as `grammar` to constrain the answer."""

    def body() -> None:
        from distill.constrain import first_grammar
        from distill.tasks import TaskError, load_task

        task = load_task(_load(config, overrides))
        try:
            grammar = first_grammar(task, _read_payload(payload), None)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, TaskError) as exc:
            _fail(_input_error(exc, payload, payload), 2)
        if grammar is None:
            _fail(f"task '{task.name}' has no output grammar", 1)
        print(grammar.gbnf, end="")

    _guard(body)


def _read_payload(path: Path) -> Any:
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and "payload" in data:  # a dataset or shard record
        return json.loads(data["payload"]) if isinstance(data["payload"], str) else data["payload"]
    return data


def _input_error(exc: Exception, payload: Path, answer: Path) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: file not found"
    if isinstance(exc, json.JSONDecodeError):
        return f"{payload}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
    if isinstance(exc, UnicodeDecodeError):
        return f"{payload} or {answer}: not UTF-8 text"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/] interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
