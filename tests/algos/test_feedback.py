import json

import pytest

from elleci.algos.feedback import normalise_score, read_binary, read_pairwise, read_scored, write_jsonl

USER = [{"role": "user", "content": "Ciao?"}]


def lines(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n",
                    encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- pairwise

def test_pairwise_string_and_message_prompts(tmp_path):
    chat = [{"role": "system", "content": "Sii breve."}, {"role": "user", "content": "2+2?", "name": "x"}]
    p = lines(tmp_path / "p.jsonl", [
        {"prompt": "Ciao?", "chosen": "Ciao!", "rejected": "No."},
        {"prompt": chat, "chosen": "4", "rejected": "5", "ref_chosen_logps": -1.5, "ref_rejected_logps": -2},
    ])
    a, b = read_pairwise(p)
    assert a == {"prompt": USER, "chosen": "Ciao!", "rejected": "No."}
    assert b["prompt"] == [{"role": "system", "content": "Sii breve."}, {"role": "user", "content": "2+2?"}]
    assert b["ref_chosen_logps"] == -1.5 and b["ref_rejected_logps"] == -2.0
    assert isinstance(b["ref_rejected_logps"], float)


def test_round_trip(tmp_path):
    records = [{"prompt": USER, "chosen": "Sì è così 🙂", "rejected": "no"},
               {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}], "chosen": "d", "rejected": "e",
                "ref_chosen_logps": -3.25, "ref_rejected_logps": -4.0}]
    path = tmp_path / "sub" / "pairs.jsonl"
    write_jsonl(path, records)
    assert read_pairwise(path) == records
    assert "🙂" in path.read_text(encoding="utf-8")        # non-ASCII kept as is
    assert list(path.parent.iterdir()) == [path]           # no temporary file left behind
    binary = [{"prompt": USER, "completion": "ok", "label": 1, "ref_logps": -7.5}]
    write_jsonl(tmp_path / "b.jsonl", binary)
    assert read_binary(tmp_path / "b.jsonl") == binary


def test_write_is_atomic_on_failure(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(TypeError, match="records must be dicts"):
        write_jsonl(path, [{"a": 2}, "oops"])
    assert path.read_text() == '{"a": 1}\n'
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "x", "chosen": "y"}, r"missing field 'rejected'; keys found: \['chosen', 'prompt'\]"),
    ({"chosen": "y", "rejected": "z"}, "missing field 'prompt'"),
    ({"prompt": "x", "chosen": ["y"], "rejected": "z"}, "field 'chosen' must be a string, got list"),
    ({"prompt": 3, "chosen": "y", "rejected": "z"}, "field 'prompt' must be a string or a list"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "y", "rejected": "z"}, r"messages\[0\] has role"),
    ({"prompt": [], "chosen": "y", "rejected": "z"}, "non-empty list"),
    ({"prompt": USER + [{"role": "assistant", "content": "x"}], "chosen": "y", "rejected": "z"},
     "must end with a user message"),
    ({"prompt": "x", "chosen": "y", "rejected": "z", "ref_chosen_logps": -1.0},
     "'ref_chosen_logps' given without 'ref_rejected_logps'"),
    ({"prompt": "x", "chosen": "y", "rejected": "z", "ref_chosen_logps": 0.5, "ref_rejected_logps": -1},
     "must be <= 0, got 0.5"),
    ({"prompt": "x", "chosen": "y", "rejected": "z", "ref_chosen_logps": "-1", "ref_rejected_logps": -1},
     "'ref_chosen_logps' must be a finite number"),
])
def test_pairwise_errors_name_file_line_and_field(tmp_path, bad, message):
    p = lines(tmp_path / "fb.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(ValueError, match=r"fb\.jsonl:2: .*" + message):
        read_pairwise(p)


def test_invalid_json_line(tmp_path):
    p = lines(tmp_path / "fb.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, "", '{"prompt": '])
    with pytest.raises(ValueError, match=r"fb\.jsonl:3: invalid JSON"):
        read_pairwise(p)


# ---------------------------------------------------------------------------------------------- binary

def test_binary_labels(tmp_path):
    p = lines(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                      {"prompt": "q", "completion": "b", "label": False},
                                      {"prompt": "q", "completion": "c", "label": 1},
                                      {"prompt": "q", "completion": "d", "label": 0}])
    out = read_binary(p)
    assert [r["label"] for r in out] == [1, 0, 1, 0]
    assert all(type(r["label"]) is int for r in out)
    assert out[0] == {"prompt": [{"role": "user", "content": "q"}], "completion": "a", "label": 1}


@pytest.mark.parametrize("label", [2, 1.0, "up", None])
def test_binary_bad_label(tmp_path, label):
    p = lines(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "a", "label": 1},
                                      {"prompt": "q", "completion": "a", "label": label}])
    with pytest.raises(ValueError, match=r"b\.jsonl:2: field 'label' must be true/false or 0/1"):
        read_binary(p)


def test_binary_missing_fields(tmp_path):
    p = lines(tmp_path / "b.jsonl", [{"prompt": "q", "label": 1}])
    with pytest.raises(ValueError, match=r"b\.jsonl:1: missing field 'completion'"):
        read_binary(p)
    p = lines(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(ValueError, match=r"b\.jsonl:1: missing field 'label'"):
        read_binary(p)


# ---------------------------------------------------------------------------------------------- scored

def test_scored_plain_and_normalised(tmp_path):
    p = lines(tmp_path / "s.jsonl", [{"prompt": "q", "completion": "a", "score": 0.25, "ref_logps": -9},
                                      {"prompt": "q", "completion": "b", "score": 1}])
    out = read_scored(p)
    assert [r["score"] for r in out] == [0.25, 1.0] and out[0]["ref_logps"] == -9.0
    u = lines(tmp_path / "u.jsonl", [{"prompt": "q", "completion": c, "score": s}
                                      for c, s in (("a", 1), ("b", 10), ("c", 5.5))])
    assert [r["score"] for r in read_scored(u, min_score=1, max_score=10)] == \
        pytest.approx([0.0, 1.0, 0.5])   # UltraFeedback: (s - 1) / 9


def test_scored_out_of_range_names_line(tmp_path):
    u = lines(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a", "score": 7},
                                      {"prompt": "q", "completion": "b", "score": 11}])
    with pytest.raises(ValueError, match=r"u\.jsonl:2: score 11.* range \[1, 10\], outside \[0, 1\]"):
        read_scored(u, min_score=1, max_score=10)
    with pytest.raises(ValueError, match=r"u\.jsonl:1: score 7.* outside \[0, 1\]"):
        read_scored(u)


@pytest.mark.parametrize("score", [True, "0.5", None, float("nan")])
def test_scored_non_number(tmp_path, score):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"prompt": "q", "completion": "a", "score": score}) + "\n")
    with pytest.raises(ValueError, match=r"s\.jsonl:1: field 'score' must be a finite number"):
        read_scored(p)


def test_score_range_arguments():
    assert normalise_score(3.0, 1, 5) == 0.5
    with pytest.raises(ValueError, match="both min_score and max_score"):
        read_scored("unused.jsonl", min_score=1)
    with pytest.raises(ValueError, match="max_score must be > min_score"):
        read_scored("unused.jsonl", min_score=5, max_score=5)
