"""data_tools on hand-made rows: every quarantine reason and every filter, with counts asserted;
packing equals the chat template with the loss on assistant tokens only; the embedded default."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.decontam import decontaminate
from data_tools.dedup import dedup
from data_tools.difficulty import difficulty_filter
from data_tools.filters import quality_filter
from data_tools.ingest import ingest
from data_tools.mix import mix
from data_tools.pack import pack
from data_tools.schema import RL_SCHEMA, SFT_SCHEMA

A = "Please reason step by step, and put your final answer within \\boxed{}."


def _sft(i, q, a, domain="math"):
    return {"id": f"s{i}", "domain": domain, "source": "t",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _rl(i, q, ans="1", domain="math", tests=None):
    return {"id": f"r{i}", "prompt": q, "domain": domain, "answer": ans if domain != "code" else None,
            "test_cases": tests, "difficulty": None, "source": "t"}


def _parquet(path, rows, schema):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))
    return path


def _rows(path):
    return pq.read_table(str(path)).to_pylist()


def test_ingest_quarantines_every_bad_row_with_its_reason(tmp_path):
    good = {"prompt": "What is 2 + 2?", "domain": "math", "answer": "4"}
    lines = [json.dumps(good),
             '{"prompt": "broken", "domain": ',                                         # broken_json
             json.dumps({"domain": "math", "answer": "1"}),                              # missing prompt
             json.dumps({"prompt": 7, "domain": "math", "answer": "1"}),                 # wrong type
             json.dumps({"prompt": "Q", "domain": "math", "answer": "  "}),              # empty answer
             json.dumps({"prompt": "Q", "domain": "math"}),                              # missing answer
             json.dumps({"prompt": "Q", "domain": "poetry", "answer": "x"}),             # bad domain
             json.dumps({"prompt": "Q", "domain": "code", "test_cases": []}),            # no tests
             json.dumps({"prompt": "Q", "domain": "code", "test_cases": [{"input": 1}]}),  # bad test type
             json.dumps({"prompt": "Q2", "domain": "code", "test_cases": [{"input": "1", "output": "2"}]}),
             json.dumps({"prompt": "Q3", "domain": "science", "answer": 3.5, "difficulty": "hard"}),
             json.dumps(["not", "an", "object"]),
             json.dumps({"prompt": "Q4", "domain": "science", "answer": 3.5, "difficulty": 0.2})]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    r = ingest(src, tmp_path / "rl.parquet", "rl", progress=False)
    assert r["rows_in"] == 13 and r["rows_kept"] == 3 and r["rows_removed"] == 10
    assert r["removed_by_reason"] == {"broken_json": 1, "missing_field:prompt": 1, "wrong_type:prompt": 1,
                                      "empty_answer": 2, "missing_field:answer": 1, "bad_domain": 1,
                                      "wrong_type:test_cases": 1, "wrong_type:difficulty": 1, "wrong_type:row": 1}
    q = _rows(tmp_path / "rl.quarantine.parquet")
    assert [x["row"] for x in q] == [2, 3, 4, 5, 6, 7, 8, 9, 11, 12]  # JSONL line numbers
    assert all(x["file"] == str(src) for x in q) and q[0]["raw"].startswith('{"prompt": "broken"')
    kept = _rows(tmp_path / "rl.parquet")
    assert kept[2]["answer"] == "3.5" and kept[1]["test_cases"] == [{"input": "1", "output": "2"}]
    assert pq.read_schema(str(tmp_path / "rl.parquet")) == RL_SCHEMA


def test_ingest_sft_reasons_and_parquet_and_datasets_folder(tmp_path):
    rows = [{"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans"}]},
            {"id": "b", "messages": []},
            {"id": "c", "messages": [{"role": "robot", "content": "q"}]},
            {"id": "d", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            {"id": "a", "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "x"}]},
            {"id": "f", "messages": "hello"}]
    src = tmp_path / "sft.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    r = ingest(src, tmp_path / "sft.parquet", "sft", progress=False)
    assert r["removed_by_reason"] == {"empty_messages": 1, "bad_role": 1, "empty_answer": 1, "duplicate_id": 1,
                                      "wrong_type:messages": 1}
    assert r["rows_kept"] == 1 and _rows(tmp_path / "sft.parquet")[0]["domain"] == "other"
    # a local HF datasets folder (arrow stream files) and a Parquet file read the same
    d = tmp_path / "hf_ds"
    d.mkdir()
    table = pa.Table.from_pylist([{"prompt": "What is 1+1?", "domain": "math", "answer": "2"}])
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    assert ingest(d, tmp_path / "ds.parquet", "rl", progress=False)["rows_kept"] == 1
    pq.write_table(table, str(tmp_path / "x.parquet"))
    assert ingest(tmp_path / "x.parquet", tmp_path / "x_out.parquet", "rl", progress=False)["rows_kept"] == 1
    with pytest.raises(FileNotFoundError, match="no such file"):
        ingest(tmp_path / "nope.jsonl", tmp_path / "o.parquet", "rl", progress=False)


def test_dedup_exact_and_near(tmp_path):
    base = ("A train leaves the station at noon travelling east at sixty miles per hour while a second train, "
            "which is heavier and carries coal from the northern mines to the harbour, follows on the parallel track "
            "and")
    rows = [_rl(0, base + " leaves at one. When do they meet?"),
            _rl(1, "  " + base.upper() + " leaves at one.   When do they meet?!"),      # exact after normalising
            _rl(2, base + " leaves at one. When will they meet?"),                       # near duplicate
            _rl(3, "Compute the integral of x squared from zero to three and simplify the result fully."),
            _rl(4, base + " leaves at one. When do they meet? " + A)]                    # boilerplate only
    src = _parquet(tmp_path / "in.parquet", rows, RL_SCHEMA)
    r = dedup(src, tmp_path / "d.parquet", progress=False)
    assert r["rows_kept"] == 2 and r["removed_by_reason"] == {"exact_duplicate_of": 2, "near_duplicate_of": 1}
    removed = {x["id"]: x["reason"] for x in _rows(tmp_path / "d.removed.parquet")}
    assert removed == {"r1": "exact_duplicate_of:r0", "r2": "near_duplicate_of:r0", "r4": "exact_duplicate_of:r0"}
    r = dedup(src, tmp_path / "e.parquet", near=False, progress=False)
    assert r["rows_kept"] == 3


def test_decontaminate_names_the_benchmark_item(tmp_path):
    bench = tmp_path / "aime.jsonl"
    long_q = "Find the number of ordered pairs of positive integers such that the product of the two numbers equals"
    bench.write_text(json.dumps({"id": "aime24-7", "problem": long_q + " two thousand and twenty four."}) + "\n"
                     + json.dumps({"id": "aime24-8", "problem": "What is 6 times 7?"}) + "\n")
    rows = [_rl(0, "Warm up. " + long_q + " one hundred."), _rl(1, "what is 6 TIMES 7?"),
            _rl(2, "What is 6 times 8?"), _rl(3, "An unrelated question about the area of a circle of radius two.")]
    src = _parquet(tmp_path / "in.parquet", rows, RL_SCHEMA)
    r = decontaminate(src, tmp_path / "c.parquet", [bench], n=13, progress=False)
    assert r["rows_kept"] == 2 and r["removed_by_reason"] == {"contaminated": 2}
    assert {x["id"]: x["reason"] for x in _rows(tmp_path / "c.removed.parquet")} == {
        "r0": "contaminated:aime.jsonl#aime24-7", "r1": "contaminated:aime.jsonl#aime24-8"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "text": "no question field"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: item 0 has no question field"):
        decontaminate(src, tmp_path / "x.parquet", [bad], progress=False)


def test_sft_quality_filters(tmp_path):
    ok = "<think>2 + 2 = 4</think> The answer is \\boxed{4}."
    rows = [_sft(0, "What is 2+2?", ok),
            _sft(1, "What is 2+2?", "<think>2 + 2 = 4 and then I keep thinking"),               # unclosed_think
            _sft(2, "What is 2+2?", "<think>2 + 2 = 4</think> The answer is 4."),               # no_final_answer
            _sft(3, "What is 2+2?", "<think>" + "let me check this again ok " * 40 + "</think> \\boxed{4}"),
            _sft(4, "As shown in the figure, what is the area?", ok),                          # image_reference
            _sft(5, "What is $\\frac{1}{2$?", ok),                                              # invalid_latex
            _sft(6, "Write code.", "<think>easy</think> here: print(1)", "code"),               # no_final_answer
            _sft(7, "Write code.", "<think>easy</think>\n```python\nprint(1)\n```", "code"),
            _sft(8, "Say hi.", "<think>ok</think>", "other")]                                    # no_final_answer
    src = _parquet(tmp_path / "in.parquet", rows, SFT_SCHEMA)
    r = quality_filter(src, tmp_path / "f.parquet", "sft", progress=False)
    assert r["removed_by_reason"] == {"unclosed_think": 1, "no_final_answer": 3, "repetition": 1,
                                      "image_reference": 1, "invalid_latex": 1}
    assert [x["id"] for x in _rows(tmp_path / "f.parquet")] == ["s0", "s7"]


def test_rl_quality_filters(tmp_path):
    rows = [_rl(0, "What is 2+2?"),
            _rl(1, "Which of the following is prime?\n(A) 4\n(B) 6\n(C) 7\n(D) 8"),   # multiple_choice
            _rl(2, "True or false: every even number is composite."),               # true_false
            _rl(3, "Refer to the diagram below. In the figure below, find x."),      # image_reference
            _rl(4, "Find \\left( x + 1 when x = 2."),                                # invalid_latex
            _rl(5, "Solve it.", ans=""),                                             # answerless
            _rl(6, "Reverse a string.", domain="code", tests=[{"input": "ab", "output": "ba"}])]
    src = _parquet(tmp_path / "in.parquet", rows, RL_SCHEMA)
    r = quality_filter(src, tmp_path / "f.parquet", "rl", progress=False)
    assert r["removed_by_reason"] == {"multiple_choice": 1, "true_false": 1, "image_reference": 1,
                                      "invalid_latex": 1, "answerless": 1}
    assert [x["id"] for x in _rows(tmp_path / "f.parquet")] == ["r0", "r6"]


def test_difficulty_filter(tmp_path):
    rows = [_rl(i, f"Question number {i}?") for i in range(4)]
    src = _parquet(tmp_path / "in.parquet", rows, RL_SCHEMA)
    rollouts = [{"id": "r0", "reward": 1.0}] * 4 + [{"id": "r1", "reward": 0.0}] * 4 + \
               [{"id": "r2", "reward": float(k < 1)} for k in range(4)]
    pq.write_table(pa.Table.from_pylist(rollouts), str(tmp_path / "roll.parquet"))
    r = difficulty_filter(src, tmp_path / "d.parquet", tmp_path / "roll.parquet", progress=False)
    assert r["removed_by_reason"] == {"all_solved": 1, "never_solved": 1} and r["rows_kept"] == 2
    kept = {x["id"]: x["difficulty"] for x in _rows(tmp_path / "d.parquet")}
    assert kept == {"r2": 0.75, "r3": None}  # r3 has no rollouts: kept unrated by default
    r = difficulty_filter(src, tmp_path / "e.parquet", tmp_path / "roll.parquet", keep_unrated=False, progress=False)
    assert r["removed_by_reason"]["no_rollouts"] == 1
    # the same rollouts split over shard files (`megatron-ring rollouts --shard`): the same pass rates
    for i in range(3):
        pq.write_table(pa.Table.from_pylist(rollouts[i::3]), str(tmp_path / f"roll-{i}.parquet"))
    r = difficulty_filter(src, tmp_path / "s.parquet", [tmp_path / f"roll-{i}.parquet" for i in range(3)],
                          progress=False)
    assert r["removed_by_reason"] == {"all_solved": 1, "never_solved": 1}
    assert {x["id"]: x["difficulty"] for x in _rows(tmp_path / "s.parquet")} == kept


def test_mix_hits_the_ratios(tmp_path):
    rows = [_sft(i, f"q{i}", "a", d) for i, d in enumerate(["math"] * 700 + ["code"] * 200 + ["science"] * 300
                                                           + ["chat"] * 50)]
    src = _parquet(tmp_path / "in.parquet", rows, SFT_SCHEMA)
    r = mix(src, tmp_path / "m.parquet", {"math": 60, "code": 20, "science": 10, "other": 10}, progress=False)
    got = {}
    for x in _rows(tmp_path / "m.parquet"):
        got[x["domain"]] = got.get(x["domain"], 0) + 1
    # "other" (the 50 chat rows) is the scarce domain at 10 %: 500 rows in all, each domain at its exact share
    assert got == {"math": 300, "code": 100, "science": 50, "chat": 50}
    assert r["rows_kept"] == 500 and r["removed_by_reason"] == {"over_quota": 750}
    r2 = mix(src, tmp_path / "m2.parquet", {"math": 60, "code": 20, "science": 10, "other": 10}, total=100,
             progress=False)
    assert r2["quota"] == {"math": 60, "code": 20, "science": 10, "other": 10} and r2["rows_kept"] == 100


def test_pack_loss_mask_boundaries_and_template(tmp_path):
    from megatron_ring.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(512, tmp_path / "tok")
    convs = [_sft(i, f"What is {i} + {i}?", f"<think>{i} + {i} = {2 * i}</think> \\boxed{{{2 * i}}}") for i in range(30)]
    convs.append(_sft(99, "long " * 300, "x"))
    src = _parquet(tmp_path / "in.parquet", convs, SFT_SCHEMA)
    r = pack(src, tmp_path / "p.parquet", tmp_path / "tok", seq_len=128, progress=False)
    assert r["rows_in"] == 31 and r["rows_kept"] == 30 and r["removed_by_reason"] == {"too_long": 1}
    packed = _rows(tmp_path / "p.parquet")
    assert all(len(p["tokens"]) == len(p["loss_mask"]) == 128 for p in packed)
    assert sorted(i for p in packed for i in p["ids"]) == sorted(c["id"] for c in convs[:30])
    by_id = {c["id"]: c for c in convs}
    for p in packed:
        off = 0
        for rid, n in zip(p["ids"], p["seq_lens"]):
            ids, mask = p["tokens"][off:off + n], p["loss_mask"][off:off + n]
            msgs = by_id[rid]["messages"]
            # the pieces equal the chat template, tokenized whole
            assert ids == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
            # loss exactly on the assistant content (think included) and its end-of-turn token
            trained = tok.decode([t for t, m in zip(ids, mask) if m])
            assert trained == msgs[1]["content"] + "<|endoftext|>"
            off += n
        assert all(m == 0 for m in p["loss_mask"][off:])
    assert r["trained_tokens"] < r["tokens"] and 0 < r["fill"] <= 1


def test_embedded_default_sets(tmp_path):
    from data_tools.default import build_default

    small = {"eval": {"math": 40, "code": 20, "science": 20}, "rl_stage1": {"math": 200},
             "rl_stage2": {"code": 60, "science": 60}, "sft": 1000}
    s = build_default(tmp_path / "d", seed=1, seq_len=256, sizes=small)
    assert s["eval_disjoint_from_training"] is True
    assert s["rows"] == {"sft": 1000, "rl_stage1": 200, "rl_stage2": 120}
    assert (tmp_path / "d" / "stats" / "sft.png").stat().st_size > 10_000
    eval_q = {x["prompt"] for d in ("math", "code", "science") for x in _rows(tmp_path / "d" / "eval" / f"{d}.parquet")}
    train_q = {x["prompt"] for x in _rows(tmp_path / "d" / "rl_stage1" / "4_filtered.parquet")}
    train_q |= {x["messages"][0]["content"] for x in _rows(tmp_path / "d" / "sft" / "5_mixed.parquet")}
    assert not eval_q & train_q
    mixed = _rows(tmp_path / "d" / "sft" / "5_mixed.parquet")
    assert sum(x["domain"] == "math" for x in mixed) == 645  # 64.5 %
    again = build_default(tmp_path / "e", seed=1, seq_len=256, sizes=small)
    assert _rows(tmp_path / "e" / "sft" / "packed.parquet") == _rows(tmp_path / "d" / "sft" / "packed.parquet")
    assert again["rows"] == s["rows"]
