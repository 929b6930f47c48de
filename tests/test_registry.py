"""Each concept is extended in one place: a stage, a teacher backend and a model variant are added here from
outside the package (a plugin module and registry entries) and run end to end through the real CLI and stages."""

import json
import sys
from pathlib import Path

from conftest import trained_run_config, write_config

from distill.config import load_config

# Its config model is imported while distill.config builds the config: what needs the config comes inside run().
PLUGIN = '''
from distill.config import Strict
from distill.metrics import Metrics
from distill.teachers import Completion


class ToyConfig(Strict):
    greeting: str = "hello"


class ToyMetrics(Metrics):
    words: int | None = None


def run(cfg, overwrite=False, shout=False):
    from distill.artifacts import open_stage

    record = open_stage(cfg, "toy", overwrite)
    text = cfg.toy.greeting.upper() if shout else cfg.toy.greeting
    (record.folder / "greeting.txt").write_text(text)
    record.metrics = {"words": len(text.split())}
    if cfg.toy.greeting == "undeclared":
        record.metrics["colour"] = "red"
    return record.finish()


class EchoTeacher:
    """Answers every input with the pack's reference answer, as a model that reads the gold would."""

    name = "echo"

    def __init__(self, cfg, task):
        self.task = task

    def generate(self, instances, grammars=None):
        return [Completion(i["reference"], len(i["reference"].split())) for i in instances]

    def close(self):
        return None
'''

# Registered before distill.config and distill.cli are imported: they derive the config and the commands.
ENTRY = """
import sys
from distill.stages import STAGES, Option, Stage
from distill.teachers import BACKENDS, Backend

STAGES["toy"] = Stage(
    "toy", "Write a greeting.", ("toy",), lambda cfg: (), "greeting.txt",
    config="toyplugin:ToyConfig", metrics="toyplugin:ToyMetrics", module="toyplugin",
    options=(Option("shout", bool, False, "Write it in capitals."),),
)
BACKENDS["echo"] = Backend(
    "echo", "toyplugin:EchoTeacher", language_model=True, grammar=False, max_logprobs=0, local_model=False,
    summary="the gold, read back",
)
from distill.cli import main
main()
"""


def _plugin(root: Path) -> list[str]:
    (root / "toyplugin.py").write_text(PLUGIN)
    (root / "toy_distill.py").write_text(ENTRY)
    return [sys.executable, str(root / "toy_distill.py")]


def test_a_stage_and_a_teacher_backend_added_from_outside(tmp_path, tiny_models) -> None:
    import subprocess

    command = _plugin(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *args], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert "toy" in cli("--help").stdout and "--shout" in cli("toy", "--help").stdout
    config = write_config(tmp_path, tiny_models, toy={"greeting": "good morning crew"})
    done = cli("toy", str(config), "--shout")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "runs/t/toy"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (folder / "greeting.txt").read_text() == "GOOD MORNING CREW"
    assert manifest["metrics"] == {"words": 3} and manifest["config"]["toy"] == {"greeting": "good morning crew"}
    # its section is part of the config: typos are named, a change makes the output stale
    bad = cli("toy", str(config), "toy.greting=hi")
    assert bad.returncode == 1 and "toy.greting: unknown key (did you mean 'greeting'?)" in bad.stderr
    # a metric its model does not declare is the stage author's bug: the stage fails and is not marked complete
    again = cli("toy", str(config), "toy.greeting=undeclared", "--overwrite")
    assert again.returncode == 1 and "colour" in again.stderr
    written = folder / "manifest.json"
    assert not written.exists() or not json.loads(written.read_text()).get("complete")

    # the backend's declared capabilities are checked before any work; then it writes the data
    refused = cli("generate", str(config), "generate.backend=echo", "generate.grammar=true")
    assert refused.returncode == 1 and "the echo backend (the gold, read back) decodes nothing" in refused.stderr
    sizes = ["generate.num_examples=4", "generate.validation_examples=2", "generate.test_examples=2"]
    generated = cli("generate", str(config), "generate.backend=echo", "generate.grammar=false", *sizes)
    assert generated.returncode == 0, generated.stderr
    manifest = json.loads((tmp_path / "runs/t/generate/manifest.json").read_text())
    assert manifest["metrics"]["backend"] == "echo" and manifest["metrics"]["counts"]["train"] == 4


def test_a_model_variant_added_by_one_entry(exported_run, tiny_models, monkeypatch) -> None:
    """A variant loaded like the merged one, from the merged folder: evaluated, sized and compared."""
    from distill.artifacts import read_manifest
    from distill.stages.eval import run as evaluate
    from distill.variants import VARIANTS, Variant

    monkeypatch.setitem(
        VARIANTS, "again", Variant("again", "merge", "merged, read again", "transformers", VARIANTS["merged"].location)
    )
    path = trained_run_config(exported_run.parent, tiny_models, name="variant.yaml", eval={"num_prompts": 2})
    cfg = load_config(path, ["eval.max_new_tokens=8", "eval.grammar=false"])
    results = {model: read_manifest(evaluate(cfg, model=model))["metrics"] for model in ("merged", "again")}
    assert results["again"]["size_bytes"] == results["merged"]["size_bytes"] > 0
    assert results["again"]["perplexity"] == results["merged"]["perplexity"]
    assert "| merged, read again |" in (cfg.run_path / "eval" / "comparison.md").read_text()
