import json

import pytest
import torch

from elleci.data import (TokenBatches, alpaca_to_messages, chat_to_messages, detect_sft_format,
                         openorca_to_messages, pack_documents, read_jsonl, read_sft, read_text)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- JSONL

def test_read_jsonl_skips_blank_lines_and_numbers_from_one(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", ['{"a": 1}', "", "   ", '{"a": 2}'])
    assert list(read_jsonl(p)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_malformed_line_names_file_and_line(tmp_path):
    lines = ['{"text": "ok"}'] * 6 + ['{"text": "broken"'] + ['{"text": "ok"}']
    p = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(ValueError, match=r"data\.jsonl:7: invalid JSON"):
        read_text(p)


def test_non_object_line_is_an_error(tmp_path):
    p = write_lines(tmp_path / "data.jsonl", ['{"text": "ok"}', '["a", "list"]'])
    with pytest.raises(ValueError, match=r"data\.jsonl:2: expected a JSON object, got list"):
        list(read_jsonl(p))


def test_read_text_jsonl_field_and_missing_field(tmp_path):
    p = write_lines(tmp_path / "c.jsonl", ['{"text": "uno"}', '{"body": "due"}'])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: field 'text' is missing; keys found: \['body'\]"):
        read_text(p)
    q = write_lines(tmp_path / "d.jsonl", ['{"body": "due"}', '{"body": 3}'])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: field 'body' is not a string"):
        read_text(q, field="body")
    assert read_text(write_lines(tmp_path / "e.jsonl", ['{"body": "due"}']), field="body") == ["due"]


def test_read_text_txt_paragraphs(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("Primo documento,\nseconda riga.\n\n\n  \nSecond doc.\n\nThird\n", encoding="utf-8")
    assert read_text(p) == ["Primo documento,\nseconda riga.", "Second doc.", "Third"]


# ---------------------------------------------------------------------------------------------- SFT

def test_alpaca_to_messages():
    rec = {"instruction": "Traduci in inglese.", "input": "Buongiorno", "output": "Good morning"}
    assert alpaca_to_messages(rec) == [
        {"role": "user", "content": "Traduci in inglese.\n\nBuongiorno"},
        {"role": "assistant", "content": "Good morning"},
    ]
    for empty in ({"input": ""}, {"input": "  "}, {}):
        rec = {"instruction": "Dimmi un numero.", "output": "7", **empty}
        assert alpaca_to_messages(rec) == [{"role": "user", "content": "Dimmi un numero."},
                                           {"role": "assistant", "content": "7"}]


def test_openorca_to_messages():
    rec = {"id": "x", "system_prompt": "You are helpful.", "question": "2+2?", "response": "4"}
    assert openorca_to_messages(rec) == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    rec["system_prompt"] = ""
    assert openorca_to_messages(rec) == [{"role": "user", "content": "2+2?"},
                                         {"role": "assistant", "content": "4"}]


def test_chat_to_messages_validates():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a", "weight": 1}]
    assert chat_to_messages({"messages": msgs}) == [{"role": "system", "content": "s"},
                                                    {"role": "user", "content": "u"},
                                                    {"role": "assistant", "content": "a"}]
    bad = [
        {"messages": []},
        {"messages": [{"role": "human", "content": "u"}]},
        {"messages": [{"role": "user", "content": 3}]},
        {"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}]},
        {"messages": [{"role": "user"}]},
    ]
    for rec in bad:
        with pytest.raises(ValueError):
            chat_to_messages(rec)


def test_read_sft_auto_detects_each_record(tmp_path):
    recs = [
        {"messages": [{"role": "user", "content": "ciao"}, {"role": "assistant", "content": "ciao!"}]},
        {"instruction": "I", "input": "X", "output": "O"},
        {"system_prompt": "S", "question": "Q", "response": "R"},
    ]
    p = write_lines(tmp_path / "mix.jsonl", [json.dumps(r) for r in recs])
    assert [detect_sft_format(r) for r in recs] == ["chat", "alpaca", "openorca"]
    assert read_sft(p) == [
        [{"role": "user", "content": "ciao"}, {"role": "assistant", "content": "ciao!"}],
        [{"role": "user", "content": "I\n\nX"}, {"role": "assistant", "content": "O"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
         {"role": "assistant", "content": "R"}],
    ]
    # an explicit format applies to every record: the chat record is not Alpaca
    with pytest.raises(ValueError, match=r"mix\.jsonl:1: alpaca record: missing field 'instruction'"):
        read_sft(p, format="alpaca")


def test_read_sft_unrecognised_record_lists_keys(tmp_path):
    p = write_lines(tmp_path / "sft.jsonl", [json.dumps({"instruction": "I", "output": "O"}),
                                            json.dumps({"prompt": "p", "completion": "c"})])
    expected = r"sft\.jsonl:2: unrecognised SFT record with keys \['completion', 'prompt'\]"
    with pytest.raises(ValueError, match=expected):
        read_sft(p)
    with pytest.raises(ValueError, match="unknown SFT format"):
        read_sft(p, format="sharegpt")


def test_read_sft_bad_chat_names_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "u"}, {"role": "robot", "content": "a"}]}
    p = write_lines(tmp_path / "chat.jsonl", [json.dumps(good), "", json.dumps(bad)])
    with pytest.raises(ValueError, match=r"chat\.jsonl:3: chat record: messages\[1\] has role 'robot'"):
        read_sft(p, format="chat")


def test_read_sft_refuses_a_conversation_without_an_assistant_turn_by_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    no_answer = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    p = write_lines(tmp_path / "chat.jsonl", [json.dumps(good), json.dumps(no_answer)])
    with pytest.raises(ValueError, match=r"chat\.jsonl:2: chat record has no assistant turn after a prompt.*"
                                         r"\['system', 'user'\]"):
        read_sft(p)
    only_answer = {"messages": [{"role": "assistant", "content": "a"}]}
    write_lines(p, [json.dumps(only_answer)])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: chat record has no assistant turn after a prompt"):
        read_sft(p)


# ---------------------------------------------------------------------------------------------- encodings

def test_non_utf8_bytes_are_named_by_file_and_line_in_every_reader(tmp_path):
    from elleci.algos.feedback import read_pairwise
    rec = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "text": "t", "instruction": "i", "output": "o"})
    for name, read in (("d.jsonl", read_jsonl), ("d.jsonl", read_text), ("d.jsonl", read_sft),
                       ("d.jsonl", read_pairwise), ("d.txt", read_text)):
        path = tmp_path / name
        path.write_bytes((rec + "\n" + rec + "\n").encode() + b'{"text": "caf\xe9"}\n')     # latin-1 on line 3
        with pytest.raises(ValueError, match=rf"{name}:3: not valid UTF-8 \(byte 0xe9 at column 14\)"):
            list(read(path))


def test_a_bom_is_dropped(tmp_path):
    txt = tmp_path / "bom.txt"
    txt.write_bytes("\ufefffirst doc\n\nsecond".encode("utf-8"))
    assert read_text(txt) == ["first doc", "second"]                    # main: ["\ufefffirst doc", "second"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes("\ufeff".encode("utf-8") + b'{"text": "a"}\r\n{"text": "b"}\r\n')   # Windows tools
    assert read_text(jsonl) == ["a", "b"]


# ---------------------------------------------------------------------------------------------- stream

def test_pack_documents_golden():
    out = pack_documents([[5, 6, 7], [], [8]], eos_id=0)
    assert out.dtype == torch.long
    assert out.tolist() == [5, 6, 7, 0, 0, 8, 0]


def test_token_batches_deterministic_and_shifted():
    tokens = torch.arange(1000)  # token value == position, so shifts are easy to see
    a = TokenBatches(tokens, seq_len=16, batch_size=4, seed=3)
    b = TokenBatches(tokens.clone(), seq_len=16, batch_size=4, seed=3)
    x5, y5 = a.batch(5)
    assert x5.shape == y5.shape == (4, 16) and x5.dtype == torch.long
    # depends only on (seed, step): same after other calls, and from a fresh object
    a.batch(0), a.batch(99)
    for x, y in (a.batch(5), b.batch(5)):
        assert torch.equal(x, x5) and torch.equal(y, y5)
    # targets are the inputs shifted by one; every row is a contiguous window
    assert torch.equal(y5[:, :-1], x5[:, 1:])
    assert torch.equal(y5 - x5, torch.ones_like(x5))
    assert torch.equal(x5 - x5[:, :1], torch.arange(16).expand(4, 16))
    # different steps / seeds give different batches
    assert not torch.equal(a.batch(6)[0], x5)
    assert not torch.equal(TokenBatches(tokens, 16, 4, seed=4).batch(5)[0], x5)


def test_token_batches_bounds():
    tokens = torch.arange(17)
    x, y = TokenBatches(tokens, seq_len=16, batch_size=3, seed=0).batch(7)  # only one window fits
    assert x.tolist() == [list(range(16))] * 3 and y.tolist() == [list(range(1, 17))] * 3
    with pytest.raises(ValueError, match="need at least seq_len \\+ 1 = 17"):
        TokenBatches(torch.arange(16), seq_len=16, batch_size=1, seed=0)
    # all windows stay in range over many steps
    tb = TokenBatches(torch.arange(40), seq_len=8, batch_size=8, seed=1)
    ys = torch.cat([tb.batch(s)[1] for s in range(50)])
    assert ys.min().item() >= 1 and ys.max().item() == 39  # in range, and the last token is reachable
