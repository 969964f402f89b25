"""The structure of issue 12: one sampling path for validation, evaluate and predict; the
trainer imported by the CLI only; one options object per command; ``model.name``."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from probunet import inference
from probunet.checkpoint import load_model, save_checkpoint
from probunet.cli import build_parser, main, parse_args
from probunet.config import Config, ConfigError, from_dict, load_config
from probunet.data import prepare_items, synthetic
from probunet.models import build_model
from probunet.options import (EvaluateOptions, PredictOptions, TrainOptions, add_arguments, from_args,
                              with_overrides)

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model whose prior has real spread (so that samples differ), saved as a checkpoint."""
    cfg = load_config(DEBUG, ["data.normalize=none"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.prior_net.head.proj.weight.normal_(0, 0.5)
        model.prior_net.head.proj.bias[cfg.model.latent_dim:].fill_(0.5)
        model.fcomb.first.weight.mul_(5)
    path = tmp_path_factory.mktemp("structure") / "model.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, path)
    return path


def test_validation_evaluate_and_predict_draw_identical_samples(checkpoint, monkeypatch):
    from probunet.evaluate import evaluate
    from probunet.predict import Predictor
    from probunet.validation import validate

    model, cfg, _ = load_model(checkpoint)
    items = prepare_items(synthetic.generate(num_cases=2, size=32, spatial_dims=2, num_raters=4, seed=3), cfg)
    num_samples = 6
    cfg.train.val_samples = num_samples
    drawn: dict[str, list] = {}
    real_sample = inference.Sampler.sample

    def spy(self, case_ids, images, n, **kw):
        out = real_sample(self, case_ids, images, n, **kw)
        for cid, lab in zip(case_ids, out.labels):
            drawn.setdefault(cid, []).append(lab.clone())
        return out

    monkeypatch.setattr(inference.Sampler, "sample", spy)
    validate(model, items, cfg, "cpu")
    evaluate(model, cfg, items, num_samples=num_samples, seed=cfg.eval.seed, device="cpu")
    predictor = Predictor(model, cfg, PredictOptions(num_samples=num_samples, seed=cfg.eval.seed, device="cpu",
                                                     roi_size=0))
    for item in items:
        predicted = predictor(item["image"][0], case_id=item["case_id"])  # (*spatial): a single-channel image
        validated, evaluated, sampled = drawn[item["case_id"]]
        assert torch.equal(validated, evaluated)
        assert torch.equal(evaluated, sampled)
        np.testing.assert_array_equal(predicted.samples, evaluated.numpy())
        assert len({tuple(s.reshape(-1).tolist()) for s in evaluated}) > 1  # the samples differ from each other


# ----------------------------------------------------------------------------- who imports what


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules (and module.name) a file imports, relative imports resolved."""
    package = path.relative_to(ROOT).with_suffix("").parts  # ("probunet", "data", "io")
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _imports_trainer(path: Path) -> bool:
    return any(n == "probunet.train" or n.startswith("probunet.train.") for n in _imports(path))


def test_nothing_outside_the_cli_imports_the_trainer():
    users = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "probunet").rglob("*.py"))
             if p.name not in ("cli.py", "train.py") and _imports_trainer(p)]
    assert users == []
    assert _imports_trainer(ROOT / "probunet" / "cli.py")  # the check sees an import where there is one
    # scripts: only the one that really trains (fault injection into fit) imports the trainer
    assert [p.name for p in sorted((ROOT / "scripts").glob("*.py")) if _imports_trainer(p)] == ["fault_check.py"]


def test_training_evaluation_and_prediction_use_only_the_model_interface():
    internals = {"unet", "fcomb", "prior_net", "posterior_net", "base_dist", "feature_term", "latent_dim"}
    for name in ("train.py", "evaluate.py", "scoring.py", "report.py", "predict.py", "predictor.py", "batch.py",
                 "inference.py", "validation.py", "viz.py", "cli.py"):
        tree = ast.parse((ROOT / "probunet" / name).read_text(encoding="utf-8"))
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & internals
        assert not used, (name, used)


def test_io_and_lidc_pickle_take_data_error_from_its_module():
    from probunet.data import errors, io, lidc_pickle

    for module in (io, lidc_pickle):
        assert module.DataError is errors.DataError
        assert "probunet.data.validate.DataError" not in _imports(Path(module.__file__))
        assert "probunet.data.errors.DataError" in _imports(Path(module.__file__))


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, cls", [(["train", "c.yaml"], TrainOptions),
                                       (["evaluate", "run"], EvaluateOptions),
                                       (["predict", "ck", "in", "out"], PredictOptions)])
def test_each_default_lives_in_the_options_dataclass(argv, cls):
    args = parse_args(build_parser(), argv)
    opts = from_args(cls, args)
    defaults = {f.name: getattr(opts, f.name) for f in dataclasses.fields(cls)}
    expected = {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls)}
    positional = {k for k, v in expected.items() if v is None and defaults[k] is not None and
                  k in ("config", "checkpoint")}
    assert {k: v for k, v in defaults.items() if k not in positional} == \
        {k: v for k, v in expected.items() if k not in positional}


def test_predict_options_reach_the_predictor_and_the_cli(checkpoint):
    from probunet.predict import Predictor

    model, cfg, _ = load_model(checkpoint)
    p = Predictor(model, cfg, num_samples=3, blend="constant")
    assert p.options == dataclasses.replace(PredictOptions(), num_samples=3, blend="constant")
    assert p.sampler.blend == "constant" and p.num_samples == 3 and p.dtype is None  # fp32 by default
    q = Predictor(model, cfg, PredictOptions(seed=4, batch_size=2), seed=5)
    assert q.seed == 5 and q.batch_size == 2 and q.sampler.batch_size == 2
    with pytest.raises(TypeError, match="num_sample"):
        Predictor(model, cfg, num_sample=3)
    with pytest.raises(ValueError, match="overlap"):
        Predictor(model, cfg, overlap=1.5)
    args = parse_args(build_parser(), ["predict", "ck", "in", "out", "--roi", "64,32", "--axis", "1",
                                       "--amp", "bf16", "--num-samples", "5"])
    opts = from_args(PredictOptions, args).check()
    assert (opts.roi_size, opts.axis, opts.amp, opts.num_samples) == ([64, 32], 1, "bf16", 5)


def test_options_parser_and_overrides():
    import argparse

    parser = add_arguments(argparse.ArgumentParser(), EvaluateOptions)
    opts = from_args(EvaluateOptions, parser.parse_args(["ck", "eval.split=val", "--num-samples", "7"]))
    assert opts == EvaluateOptions(checkpoint="ck", overrides=["eval.split=val"], num_samples=7)
    assert with_overrides(None, PredictOptions) == PredictOptions()
    with pytest.raises(TypeError, match="colour"):
        with_overrides(None, PredictOptions, colour="red")


# ----------------------------------------------------------------------------- model.name and the demo


def test_model_name_defaults_and_unknown_names_are_one_line_errors(tmp_path, capsys):
    assert Config().model.name == "prob_unet"
    assert from_dict({"model": {"features": [4, 8]}}).model.name == "prob_unet"
    with pytest.raises(ConfigError, match=r"model\.name.*'unet3000'.*known: .*prob_unet"):
        from_dict({"model": {"name": "unet3000"}})
    rc = main(["train", DEBUG, "model.name=unet3000", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.name" in err[0] and "prob_unet" in err[0]
    assert not (tmp_path / "r").exists()


def test_resume_accepts_a_checkpoint_written_before_model_name(tmp_path):
    from probunet.checkpoint import load_checkpoint
    from probunet.train import fit

    run = tmp_path / "run"
    fast = ["train.val_every=1000", "train.log_every=1", "train.checkpoint_every=1"]
    fit(load_config(DEBUG, ["train.steps=1", *fast]), run)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    del ckpt["config"]["model"]["name"], ckpt["digest"], ckpt["path"]
    save_checkpoint(ckpt, run / "checkpoints" / "last.pt")
    summary = fit(load_config(DEBUG, ["train.steps=2", *fast]), run, resume=True)
    assert summary["steps"] == 2 and load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2


def test_demo_uses_the_shipped_config_from_any_folder(tmp_path, monkeypatch):
    from probunet import cli
    from probunet.resources import config_path

    used = {}

    def record(name):
        def f(args):
            used[name] = args
            return 0
        return f

    for name in ("cmd_synth", "cmd_train", "cmd_evaluate"):
        monkeypatch.setattr(cli, name, record(name))
    monkeypatch.chdir(tmp_path)  # not the repository: a relative configs/ would not be found
    assert main(["demo", "--out", str(tmp_path / "demo"), "train.steps=3", "--no-progress"]) == 0
    assert Path(used["cmd_train"].config) == config_path("synthetic.yaml")
    assert used["cmd_train"].overrides[0] == "train.steps=3"


# ----------------------------------------------------------------------------- one job per module, no import circle

# Import edges (importer, imported) still allowed to close a circle, until they go (none left: config.py no
# longer imports the models, and nothing imports the offline LIDC manifest rebuild):
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the probunet modules it imports, at the top or inside functions. ``from . import io``
    is an edge to the submodule ``io``; ``from . import __version__`` one to the package."""
    paths = {_module_name(p): p for p in (ROOT / "probunet").rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{mod}.{a.name}" for a in node.names} & paths.keys()
                edges |= subs | ({mod} if len(subs) < len(node.names) else set())
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
        graph[name] = (edges & paths.keys()) - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_cycle_in_probunet():
    graph = import_graph()
    assert "probunet.data.io" in graph["probunet.data.validate"]  # `from . import io` inside a function counts
    assert "probunet.data" not in graph["probunet.data.validate"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # it sees one
    pruned = {m: {t for t in targets if (m, t) not in KNOWN_CYCLE_EDGES} for m, targets in graph.items()}
    assert import_cycles(pruned) == []


def test_config_sits_below_the_models_and_nothing_imports_the_manifest_rebuild():
    graph = import_graph()
    assert not any(m.startswith("probunet.models") for m in graph["probunet.config"])
    assert "probunet.config" in graph["probunet.models.registry"]  # the models read the config, not the reverse
    assert graph["probunet.errors"] == set()  # ConfigError's leaf module
    assert "probunet.data.lidc_manifest" not in set().union(*graph.values())  # the offline rebuild
    assert "probunet.data.lidc_patients" in graph["probunet.data.splits"]


def test_inference_in_memory_knows_nothing_of_folders_commands_or_training():
    graph = import_graph()
    assert not graph["probunet.predictor"] & {"probunet.batch", "probunet.predict", "probunet.cli",
                                              "probunet.train", "probunet.evaluate", "probunet.scoring"}
    assert "probunet.predictor" in graph["probunet.batch"]
    assert not graph["probunet.batch"] & {"probunet.cli", "probunet.predict", "probunet.train"}
    # nothing inside the package goes through the re-export shims
    for shim in ("probunet.predict", "probunet.evaluate"):
        assert [m for m, targets in graph.items() if shim in targets] == []


def test_the_old_import_paths_still_work():
    from probunet import batch, cli, evaluate, predict, predictor, report, scoring, viz

    assert predict.Predictor is predictor.Predictor and predict.Prediction is predictor.Prediction
    assert predict.predict_folder is batch.predict_folder and predict.predict_cli is cli.predict_cli
    for name in predict.__all__:
        assert hasattr(predict, name), name
    assert evaluate.evaluate is scoring.evaluate and evaluate.lesion_scatter is viz.lesion_scatter
    assert evaluate.output_paths is report.output_paths and evaluate.evaluate_checkpoint is cli.evaluate_checkpoint
    for name in evaluate.__all__:
        assert hasattr(evaluate, name), name


def test_the_safe_unpickler_and_the_annotation_preparation_stand_alone():
    graph = import_graph()
    assert graph["probunet.data.safe_pickle"] == {"probunet.data.errors"}  # generic: knows no dataset
    assert graph["probunet.data.lidc_annotations"] == {"probunet.data.errors"}
    assert {"probunet.data.safe_pickle", "probunet.data.lidc_annotations"} <= graph["probunet.data.lidc_pickle"]
    from probunet.data import errors, lidc_annotations, safe_pickle

    assert safe_pickle.DataError is errors.DataError and lidc_annotations.DataError is errors.DataError


# Modules that may still print besides the CLI, until they stop: the offline manifest rebuild
# removed by the model-base restructuring
PRINTING_ALLOWED = {"probunet/data/lidc_manifest.py"}


def test_only_the_cli_prints():
    printing = set()
    for path in sorted((ROOT / "probunet").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
        if any(isinstance(f, ast.Name) and f.id == "print" for f in calls):
            printing.add(path.relative_to(ROOT).as_posix())
    assert "probunet/cli.py" in printing  # the check sees a print where there is one
    assert printing - PRINTING_ALLOWED == {"probunet/cli.py"}
