"""`elleci eval` (elleci.eval.command) end to end on a saved tiny model, and lm-eval's CLI with --model elleci."""
import argparse
import json
import os
import re
import sys
from pathlib import Path

import pytest

from elleci import __version__
from elleci.eval import run_tasks
from elleci.eval.command import add_arguments, apply_override, build_config, main

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "configs" / "eval" / "data"


def _has_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok, make_model):
    d = tmp_path_factory.mktemp("saved")
    make_model(tok, seed=4).save_pretrained(d / "model", tokenizer=tok)
    return d / "model"


def _local_lm_eval_task(d: Path) -> Path:
    d.mkdir(exist_ok=True)
    (d / "mc.yaml").write_text(
        f"task: elleci_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA / 'mc_it.jsonl'}\n"
        f"  cache_dir: {d / 'cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: 'Domanda: {{question}}\\nRisposta:'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return d


def test_eval_command_writes_results(saved, tmp_path, capsys):
    out = tmp_path / "out"
    config = tmp_path / "eval.toml"
    lm_eval_task = ""
    if _has_lm_eval():
        lm_eval_task = (f'[[tasks]]\ntype = "lm_eval"\ntasks = ["elleci_local_mc"]\n'
                        f'include_path = "{_local_lm_eval_task(tmp_path / "yaml")}"\nlimit = 6\n')
    config.write_text(f"""out_dir = "{out}"
[model]
path = "{saved}"
dtype = "float64"
device = "cpu"

[[tasks]]
type = "multiple_choice"
path = "{DATA / 'mc_it.jsonl'}"
template = "Domanda: {{question}}\\nRisposta:"
limit = 10

[[tasks]]
type = "perplexity"
path = "{DATA / 'testo_it.txt'}"
max_length = 64

[[tasks]]
type = "generation"
path = "{DATA / 'gen_it.jsonl'}"
verifier = "elleci.eval.verified_generation:contains_answer"
max_new_tokens = 6
{lm_eval_task}""", encoding="utf-8")
    assert main([str(config), "tasks.2.limit=3", "tasks.0.limit=6"]) == 0
    printed = capsys.readouterr().out
    assert "| task | metric | value |" in printed and "| mc_it | acc |" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["elleci_version"] == __version__ and result["model"] == str(saved) and result["adapter"] is None
    assert result["settings"] == {"dtype": "torch.float64", "device": "cpu"}
    assert [t["limit"] for t in result["tasks"][:3:2]] == [6, 3]
    metrics = result["metrics"]
    assert {"eval/mc_it/acc", "eval/mc_it/acc_norm", "eval/testo_it/word_perplexity", "eval/gen_it/score"} <= set(metrics)
    assert (out / "results.md").read_text().startswith("| task | metric | value |")
    assert len((out / "samples" / "mc_it.jsonl").read_text().splitlines()) == 6
    assert len((out / "samples" / "testo_it.jsonl").read_text().splitlines()) == 5
    assert len((out / "samples" / "gen_it.jsonl").read_text().splitlines()) == 3
    # the same numbers as run_tasks on the same model
    from elleci.eval import load_model, load_tokenizer
    model, tok = load_model(saved, dtype="float64", device="cpu"), load_tokenizer(saved)
    again = run_tasks(model, tok, result["tasks"][:3])
    assert again == {k: v for k, v in metrics.items() if k in again}
    if _has_lm_eval():
        assert (out / "lm_eval" / "3.json").is_file()
        assert metrics["eval/elleci_local_mc/acc"] == again.get("eval/elleci_local_mc/acc", metrics["eval/elleci_local_mc/acc"])
        offline = run_tasks(model, tok, [{"type": "multiple_choice", "path": str(DATA / "mc_it.jsonl"), "limit": 6,
                                          "template": "Domanda: {question}\nRisposta:"}])
        assert metrics["eval/elleci_local_mc/acc"] == offline["eval/mc_it/acc"]
        assert metrics["eval/elleci_local_mc/acc_norm"] == offline["eval/mc_it/acc_norm"]


def _args(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_flags_only_and_overrides(saved, tmp_path):
    cfg = build_config(_args(["--model", str(saved), "--mc", str(DATA / "mc_it.jsonl"), "--limit", "5", "--chat",
                              "--tasks", "arc_it,hellaswag_it", "--num-fewshot", "0", "--out-dir", str(tmp_path)]))
    assert cfg["model"] == {"path": str(saved)} and cfg["out_dir"] == str(tmp_path)
    lm, mc = cfg["tasks"]
    assert lm == {"type": "lm_eval", "tasks": ["arc_it", "hellaswag_it"], "num_fewshot": 0, "limit": 5,
                  "apply_chat_template": True}
    assert mc["chat"] is True and mc["limit"] == 5 and mc["name"] == "mc_it"
    cfg = build_config(_args([f"model.path={saved}", "model.dtype=bfloat16", "--perplexity", str(DATA / "testo_it.txt")]))
    assert cfg["model"] == {"path": str(saved), "dtype": "bfloat16"}
    conf = {"tasks": [{"type": "perplexity"}]}
    apply_override(conf, "tasks.0.limit=200")
    apply_override(conf, 'tasks.0.field="body"')
    apply_override(conf, "tasks.0.until=['a', 'b']")
    assert conf["tasks"][0] == {"type": "perplexity", "limit": 200, "field": "body", "until": ["a", "b"]}


@pytest.mark.parametrize("argv, error", [
    (["--mc", "x.jsonl"], "no model"),
    (["--model", "m"], "no tasks"),
    (["--model", "m", "--generation", "g.jsonl"], "needs --verifier"),
    (["--model", "m", "--mc", "nope.jsonl"], "nope.jsonl is not a file"),
    (["--model", "m", "--dtype", "fp8", "--tasks", "arc_it"], "dtype='fp8'"),
    (["colour=blue", "--model", "m", "--tasks", "arc_it"], r"unknown key\(s\) \['colour'\]"),
    (["model.size=1", "--model", "m", "--tasks", "arc_it"], r"\[model\]: unknown key\(s\) \['size'\]"),
    (["tasks.0.limit=1", "--model", "m"], "not a task index"),
])
def test_bad_configs_are_refused_before_anything_is_written(argv, error, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        main(argv + ["--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def _lm_eval_task_names() -> set[str]:
    """Every `task:` and `group:` name in lm-eval's own task YAMLs (a text scan: TaskManager's index takes
    10-20 s)."""
    import lm_eval
    names = set()
    for path in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
        text = path.read_text(encoding="utf-8", errors="replace")
        names |= {m.group(1).strip("'\"") for m in re.finditer(r"^(?:task|group):\s*(\S+)\s*$", text, re.M)}
    return names


def test_shipped_configs_parse_and_name_real_tasks():
    configs = sorted((ROOT / "configs" / "eval").glob("*.toml"))
    assert {c.name for c in configs} >= {"italian.toml", "english.toml", "offline_it.toml"}
    known = _lm_eval_task_names() if _has_lm_eval() else None
    cwd = os.getcwd()
    os.chdir(ROOT)                                                          # the configs' paths are repo-relative
    try:
        for path in configs:
            cfg = build_config(_args([str(path), "--model", "m"]))
            for task in cfg["tasks"]:
                if task["type"] == "lm_eval" and known is not None:
                    assert set(task["tasks"]) <= known, (path.name, set(task["tasks"]) - known)
    finally:
        os.chdir(cwd)


def test_lm_eval_cli_with_model_elleci(saved, tmp_path, monkeypatch, capsys):
    """lm-eval's own command line (in this process: the same code as `python -m elleci.eval.lm_eval_cli ...`)."""
    pytest.importorskip("lm_eval")
    from elleci.eval import lm_eval_cli
    from elleci.eval.lm_eval_tasks import preserved_rng

    yaml_dir = _local_lm_eval_task(tmp_path / "yaml")
    monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "elleci", "--model_args",
                                      f"path={saved},dtype=float64,device=cpu,batch_size=8", "--tasks", "elleci_local_mc",
                                      "--include_path", str(yaml_dir), "--limit", "4",
                                      "--output_path", str(tmp_path / "res")])
    with preserved_rng():
        lm_eval_cli.main()
    printed = capsys.readouterr().out
    assert "elleci_local_mc" in printed and "acc_norm" in printed
    results = list((tmp_path / "res").rglob("results_*.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    assert result["config"]["model"] == "elleci" and result["config"]["elleci_version"] == __version__
    assert result["config"]["model_path"] == str(saved) and result["config"]["model_dtype"] == "torch.float64"
    from elleci.eval import load_model, load_tokenizer
    offline = run_tasks(load_model(saved, dtype="float64", device="cpu"), load_tokenizer(saved),
                        [{"type": "multiple_choice", "path": str(DATA / "mc_it.jsonl"), "limit": 4,
                          "template": "Domanda: {question}\nRisposta:"}])
    assert result["results"]["elleci_local_mc"]["acc,none"] == offline["eval/mc_it/acc"]
    assert result["results"]["elleci_local_mc"]["acc_norm,none"] == offline["eval/mc_it/acc_norm"]
