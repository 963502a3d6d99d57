"""Smoke test of examples/rlaif_v.py (--quick): every stage runs, the three arms are reported, the JSON is
written, the base is cached; and the oracle labeler labels held-out claims exactly."""
import contextlib
import io
import json

import pytest

from elleci.algos.alignment import rlaif_v
from elleci.model import Tokenizer
from elleci.tasks.grounded_qa import make_items, verification_examples


@pytest.fixture(scope="module")
def quick_run(load_example, tmp_path_factory):
    """One --quick run. A 3-step base answers noise, so every candidate scores alike and no pair forms;
    where that happens the wrapped collect_pairs adds one (reference answer ≻ answer + a made-up claim)
    per prompt, so the DPO path runs too."""
    tmp = tmp_path_factory.mktemp("rlaif_v")
    mod, real = load_example("rlaif_v"), rlaif_v.collect_pairs

    def collect_pairs(policy, labeler, tok, items, **kw):
        records, stats = real(policy, labeler, tok, items, **kw)
        return records or [{"prompt": it.prompt, "chosen": it.answer, "rejected": it.answer + " Zed has a yak."}
                           for it in items], stats

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rlaif_v, "collect_pairs", collect_pairs)
        with contextlib.redirect_stdout(io.StringIO()) as out:   # capsys is per function
            results = mod.main(["--quick", "--out", str(tmp / "out"), "--cache", str(tmp / "bases")])
    return mod, tmp, results, out.getvalue()


def test_quick_run_reports_the_three_arms_and_writes_json(quick_run):
    _, tmp, results, printed = quick_run
    for arm in ("self-feedback", "oracle labeler", "SFT control"):
        for it in (1, 2):
            assert f"| {arm} iter {it} |" in printed
            assert 0.0 <= results[0][f"accuracy/{arm} iter {it}"] <= 1.0
    assert "| SFT |" in printed and "best-of-2 by r̄" in printed and "| self-feedback pairs iter 1 |" in printed
    assert "rewards/margin" in printed                               # DPO ran (on the wrapped pairs)
    saved = json.loads((tmp / "out" / "results.json").read_text())
    assert saved["results"][0]["seed"] == 0 and saved["args"]["quick"] is True
    assert set(saved["results"][0]["collect"]) == {f"{a} iter {i}" for a in ("self-feedback", "oracle labeler")
                                                   for i in (1, 2)}
    assert [p.name for p in (tmp / "bases").iterdir()][0].startswith("grounded_qa-seed0-")
    assert (tmp / "out" / "seed0" / "sft_adapter" / "adapter_model.safetensors").is_file()


def test_oracle_labeler_is_exact_on_held_out_claims(quick_run):
    mod, tmp, _, _ = quick_run
    tok = Tokenizer.load(next((tmp / "bases").iterdir()))
    convs = verification_examples(make_items(20, seed=3, split="test"), seed=0)     # half true, half unsupported
    probs = rlaif_v.judge(mod.OracleLabeler(tok), tok, [c[0]["content"] for c in convs])
    assert [p_yes > p_no for p_yes, p_no in probs.tolist()] == [c[1]["content"] == "yes" for c in convs]
