"""The CPU-checkable parts of the SGLang rollout path: the launch command line, the /generate payload and
the parsing of its answer into rollouts (SGLang itself needs a GPU)."""
import subprocess

from megatron_ring.rl.rollout import SamplingParams
from megatron_ring.rl.sglang_engine import generate_payload, parse_generate
from serving.sglang import SGLangServer

from .conftest import PY, ROOT


def test_command_line_for_ring_lite():
    s = SGLangServer("runs/ling_lite/rl_stage1/rollout_init_hf", port=30123, tp_size=4, ep_size=4,
                     context_length=32768, reasoning_parser="deepseek-r1", api_key="k", enable_memory_saver=True)
    cmd = s.command(python="python")
    assert cmd[:3] == ["python", "-m", "sglang.launch_server"]
    pairs = dict(zip(cmd[3::1], cmd[4::1]))
    assert pairs["--model-path"] == "runs/ling_lite/rl_stage1/rollout_init_hf" and pairs["--port"] == "30123"
    assert pairs["--tp-size"] == "4" and pairs["--ep-size"] == "4" and pairs["--context-length"] == "32768"
    assert pairs["--reasoning-parser"] == "deepseek-r1" and pairs["--api-key"] == "k"
    assert "--trust-remote-code" in cmd and "--enable-memory-saver" in cmd
    assert "--ep-size" not in SGLangServer("m").command()  # defaults stay out of the command line
    r = subprocess.run([PY, "-m", "serving.sglang", "--model-path", "m", "--tp-size", "2", "--print-command"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "sglang.launch_server --model-path m" in r.stdout and "--tp-size 2" in r.stdout


def test_generate_payload_and_parse():
    p = generate_payload([[1, 2, 3], [4, 5]], 2, SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.95, seed=3))
    assert p["input_ids"] == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]] and p["return_logprob"] is True
    one = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 7, "skip_special_tokens": False}
    # a seed per sample: the K samples of a prompt differ, a rerun reproduces them
    assert p["sampling_params"] == [dict(one, sampling_seed=s) for s in (3, 4, 5, 6)]
    q = generate_payload([[4, 5]], 2, SamplingParams(max_new_tokens=7, temperature=1.0, top_p=0.95, seed=3), [1])
    assert [x["sampling_seed"] for x in q["sampling_params"]] == [5, 6]  # a server's shard keeps the batch's seeds
    out = [{"text": "a", "output_ids": [9, 1], "meta_info": {"output_token_logprobs": [[-0.5, 9, None], [-0.1, 1, None]],
                                                             "finish_reason": {"type": "stop", "matched": 1}}},
           {"text": "b", "meta_info": {"output_token_logprobs": [[-1.5, 8, None]], "finish_reason": {"type": "length"}}}]
    import pytest

    from megatron_ring.rl.http import EngineError

    cut = [dict(out[0], meta_info=dict(out[0]["meta_info"], finish_reason={"type": "abort", "message": "Abort all"}))]
    with pytest.raises(EngineError, match="sample 0 \\(prompt 0\\) was aborted by the server: Abort all"):
        parse_generate(cut, [[1, 2, 3]], 1)  # SGLang's 200 for an aborted request: not a finished sample
    rs = parse_generate(out, [[1, 2, 3]], 2)
    assert [r.prompt_index for r in rs] == [0, 0] and rs[0].response_ids == [9, 1] and rs[1].response_ids == [8]
    assert rs[0].logprobs == [-0.5, -0.1] and [r.finish_reason for r in rs] == ["stop", "length"]


def test_the_tensor_parallel_size_divides_the_heads_as_sglang_requires(tmp_path):
    """serve.sh / eval / the job servers: ``--tp-size auto`` is the largest size up to the node's GPUs that SGLang
    accepts (heads % tp == 0; KV heads split or replicated evenly); a size it would stop at is refused with the
    numbers before launch."""
    import json

    from megatron_ring.config import load_recipe
    from serving.sglang import fit_tp, tp_fits

    tiny, ling = tmp_path / "tiny", tmp_path / "ling"
    for d, recipe in ((tiny, "tiny"), (ling, "ling_lite")):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(load_recipe(recipe).hf_config))
    assert [fit_tp(str(tiny), g) for g in (1, 2, 4, 8)] == [1, 2, 4, 4]  # 4 heads, 2 KV heads
    assert [fit_tp(str(ling), g) for g in (1, 2, 4, 8)] == [1, 2, 4, 8]  # 16 heads, 4 KV heads
    assert not tp_fits(8, 4, 2) and not tp_fits(3, 6, 2) and tp_fits(4, 16, 4) and tp_fits(8, 16, 4)
    r = subprocess.run([PY, "-m", "serving.sglang", "--model-path", str(tiny), "--tp-size", "auto", "--gpus", "8",
                        "--print-command"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--tp-size 4" in r.stdout, r
    r = subprocess.run([PY, "-m", "serving.sglang", "--model-path", str(tiny), "--tp-size", "8", "--print-command"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not divide the model's 4 attention heads / 2 KV heads" in r.stderr, r


def test_sglangs_own_output_reaches_the_job_log_and_a_failed_start_shows_its_tail(tmp_path):
    """Without a log file SGLang's output is the job's (its traceback in logs/serve-<job>.out); with one (eval),
    a server that exits before it is healthy raises with the log's last lines."""
    import os

    from serving.sglang import SGLangServer, launch

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'AssertionError: total_num_heads % attn_tp_size (sglang said)'\nexit 1\n")
    fake.chmod(0o755)
    env = dict(os.environ, SGLANG_PYTHON=str(fake))
    r = subprocess.run([PY, "-m", "serving.sglang", "--model-path", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "attn_tp_size (sglang said)" in r.stdout + r.stderr, r
    log = tmp_path / "sglang.log"
    os.environ["SGLANG_PYTHON"] = str(fake)
    try:
        launch(SGLangServer(str(tmp_path), port=1), str(log))
    except RuntimeError as e:
        assert "exited with code 1" in str(e) and "attn_tp_size (sglang said)" in str(e), e
    else:
        raise AssertionError("a server that exited was taken as healthy")
    finally:
        del os.environ["SGLANG_PYTHON"]


# SGLang's own code (locks/sglang-side.txt, installed by scripts/setup_env.sh without dependencies beside the venv),
# run in a subprocess: its request default for skip_special_tokens, its detokenisation of each token id, its
# deepseek-r1 reasoning parser whole and streamed
SGLANG_SPLIT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from transformers import AutoTokenizer
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
from sglang.srt.parser.reasoning_parser import ReasoningParser
tok = AutoTokenizer.from_pretrained(sys.argv[2])
skip = ChatCompletionRequest.model_fields["skip_special_tokens"].default
out = []
for ids in json.loads(sys.argv[3]):
    text = tok.decode(ids, skip_special_tokens=skip)
    whole = ReasoningParser("deepseek-r1", stream_reasoning=False).parse_non_stream(text)
    p, r, c, prev = ReasoningParser("deepseek-r1", stream_reasoning=True), "", "", ""
    for n in range(1, len(ids) + 1):
        t = tok.decode(ids[:n], skip_special_tokens=skip)
        if not t.endswith("\ufffd"):
            a, b = p.parse_stream_chunk(t[len(prev):])
            r, c, prev = r + (a or ""), c + (b or ""), t
    a, b = p.parse_stream_end()
    out.append({"skip": skip, "whole": [whole[0] or "", whole[1] or ""], "stream": [r + (a or ""), c + (b or "")]})
print(json.dumps(out))
"""
REPLIES = ["<think>\nWe add 15 and 730.\nones: 5 + 0 = 5.\n</think>\nThe answer is \\boxed{745}.", "Hello!",
           "<think>\ncut off while thinking", "<think>\n\n</think>\n\n4", "<think>a<role>b</think>c"]


def _sglang_split(tok_dir, ids: list[list[int]]) -> list[dict]:
    import json
    import sys
    from pathlib import Path

    side = Path(sys.executable).parents[1] / "sglang-side"
    assert (side / "sglang").is_dir(), f"{side}: SGLang's side folder is missing (bash scripts/setup_env.sh makes it)"
    r = subprocess.run([PY, "-c", SGLANG_SPLIT, str(side), str(tok_dir), json.dumps(ids)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_reply_splits_the_same_under_sglang_and_on_the_cpu_server(tmp_path):
    """The same token ids give the same reasoning_content / content under SGLang 0.5.23 (its default decoding, its
    deepseek-r1 parser, whole and streamed token by token) and on the CPU server (its decoder and split), for the
    tokenizer an export ships: the reasoning tags survive, the answer is in ``content``. The tokenizer as it was
    before (tags special) loses the answer under SGLang, and the export's check refuses it."""
    import json

    import pytest

    from megatron_ring.config import load_recipe
    from megatron_ring.convert.hf_io import ship_tokenizer
    from megatron_ring.tokenizer import build_tiny_tokenizer
    from megatron_ring.tokenizer.serving_check import check_tokenizer
    from serving.openai_server import Decoder
    from serving.reasoning import ReasoningStream, split_reasoning

    tok = build_tiny_tokenizer(512, tmp_path / "tok")
    ids = [tok.encode(t, add_special_tokens=False) for t in REPLIES]
    sg = _sglang_split(tmp_path / "tok", ids)
    for text, i, s in zip(REPLIES, ids, sg):
        assert s["skip"] is True  # SGLang's default: special tokens dropped
        dec, p, r, c = Decoder(tok, {tok.eos_token_id}, []), ReasoningStream(), "", ""
        for t in i:
            a, b = p.feed(dec.push(t))
            r, c = r + a, c + b
        a, b = p.feed(dec.flush())
        a2, b2 = p.close()
        ours_stream = [r + a + a2, c + b + b2]
        whole = split_reasoning(tok.decode(i, skip_special_tokens=True), strip=False)
        assert s["whole"] == s["stream"] == [whole[0] or "", whole[1]] == ours_stream, (text, s, ours_stream)
    assert sg[0]["whole"][1] == "\nThe answer is \\boxed{745}."  # the answer, not lost in the reasoning
    check_tokenizer(tmp_path / "tok", load_recipe("tiny").hf_config)

    special = tmp_path / "special"  # the tags as the tokenizer had them before: special tokens
    tok.save_pretrained(special)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        s = (special / f).read_text()
        (special / f).write_text(json.dumps(_mark_special(json.loads(s))))
    lost, shipped = _sglang_split(special, ids[:1])[0], tmp_path / "export"
    assert lost["whole"][1] == "" and "745" in lost["whole"][0]  # the answer went into reasoning_content
    with pytest.raises(ValueError, match="<think> is a special token"):
        check_tokenizer(special, load_recipe("tiny").hf_config)
    shipped.mkdir()
    ship_tokenizer(special, shipped)  # what an export ships from it: the tags plain again, the same ids
    assert _sglang_split(shipped, ids[:1])[0] == sg[0]
    check_tokenizer(shipped, load_recipe("tiny").hf_config)


def _mark_special(d: dict) -> dict:
    for t in d.get("added_tokens", []) + list((d.get("added_tokens_decoder") or {}).values()):
        if t.get("content") in ("<think>", "</think>"):
            t["special"] = True
    return d


def test_an_export_refuses_a_tokenizer_that_does_not_fit_its_model_before_converting(tmp_path):
    """Vocab, EOS and pad against the checkpoint's config, and the chat template against the layout SFT trained on
    (single- and multi-turn): the tiny tokenizer for a Ling-lite checkpoint, or a template that drops the end of
    earlier assistant turns, is refused before any weight is read."""
    import json

    import pytest

    from megatron_ring.config import load_recipe
    from megatron_ring.convert.hf_io import ship_tokenizer
    from megatron_ring.convert.run import mcore_to_hf_checkpoint
    from megatron_ring.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer
    from megatron_ring.tokenizer.serving_check import check_tokenizer

    tiny = load_recipe("tiny").hf_config
    tok = build_tiny_tokenizer(512, tmp_path / "tok")
    check_tokenizer(tmp_path / "tok", tiny)
    with pytest.raises(ValueError, match="512 tokens for a model whose vocab_size is 1024"):
        check_tokenizer(tmp_path / "tok", dict(tiny, vocab_size=1024))
    with pytest.raises(ValueError, match="eos_token_id 1 .* is not the model's eos_token_id 7"):
        check_tokenizer(tmp_path / "tok", dict(tiny, eos_token_id=7))
    with pytest.raises(ValueError, match="pad_token_id 1 is not the model's pad_token_id 0"):
        check_tokenizer(tmp_path / "tok", dict(tiny, pad_token_id=0))
    # a template that ends only the last assistant turn with <|endoftext|> (SFT ends every one)
    tok.chat_template = CHAT_TEMPLATE.replace("message['content'] + '<|endoftext|>'",
                                              "message['content'] + ('<|endoftext|>' if loop.last else '')")
    tok.save_pretrained(tmp_path / "drops")
    with pytest.raises(ValueError, match="renders a 4-message chat as other tokens than SFT trained on"):
        check_tokenizer(tmp_path / "drops", tiny)
    # the published Ling-lite layout (llama.cpp's test-chat-template.cpp quotes it): no <|endoftext|> after any turn;
    # the export ships the training layout's template instead, and its rendering is SFT's ids (multi-turn too)
    (tmp_path / "published").mkdir()
    tok.chat_template = ("{% for message in messages %}{% set role = message['role'] | lower %}{% if role == 'user' %}"
                         "{% set role = 'HUMAN' %}{% endif %}{% set role = role | upper %}"
                         "{{ '<role>' + role + '</role>' + message['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<role>ASSISTANT</role>' }}{% endif %}")
    tok.save_pretrained(tmp_path / "published")
    with pytest.raises(ValueError, match="renders a 4-message chat as other tokens"):
        check_tokenizer(tmp_path / "published", tiny)
    (tmp_path / "shipped").mkdir()
    assert any("chat_template.jinja" in c for c in ship_tokenizer(tmp_path / "published", tmp_path / "shipped"))
    check_tokenizer(tmp_path / "shipped", tiny)
    from transformers import AutoTokenizer

    from megatron_ring.tokenizer import chat_segments

    served = AutoTokenizer.from_pretrained(tmp_path / "shipped")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "The answer is \\boxed{4}."}, {"role": "user", "content": "And 3+3?"}]
    trained = [i for t, _ in chat_segments(chat) for i in served.encode(t, add_special_tokens=False)]
    assert served.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False) == \
        trained + served.encode("<role>ASSISTANT</role>", add_special_tokens=False)
    ckpt = tmp_path / "ling_ckpt"  # a Ling-lite checkpoint (its config is all the check reads) + the tiny tokenizer
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(load_recipe("ling_lite").hf_config))
    with pytest.raises(ValueError, match="512 tokens for a model whose vocab_size is 126464"):
        mcore_to_hf_checkpoint(ckpt, tmp_path / "out", tokenizer_dir=tmp_path / "tok")
    assert not (tmp_path / "out").exists()


def test_serve_sh_on_a_gpu_node_passes_host_dtype_and_tp_and_exports_once(tiny, tmp_path):
    """``slurm/serve.sh`` on a node with 8 GPUs and SGLang (both stand-ins that record what they are asked): SGLang
    gets HOST, the export's own dtype (float32 for the tiny recipes, not SGLang's float16 "auto") and a TP that
    divides the tiny model's 4 heads; its failure reaches the job's output; the second start serves the export the
    first one wrote instead of converting again; ALLOW_LONG_CONTEXT without CONTEXT is refused."""
    import os

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: fake\"; done\n")
    args = tmp_path / "sglang-args"
    (bin_ / "sglang-python").write_text(f"#!/bin/sh\n[ \"$1\" = -c ] && exit 0\necho \"$@\" > {args}\n"
                                        "echo 'fake sglang: no GPU here'\nexit 1\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", SGLANG_PYTHON=str(bin_ / "sglang-python"),
               CKPT=str(tiny["mcore"]), EXPORT=str(tmp_path / "export"), TOKENIZER=str(tiny["hf"]), HOST="127.0.0.1",
               PY=PY)
    runs = [subprocess.run(["bash", "slurm/serve.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode != 0 and "fake sglang: no GPU here" in r.stdout + r.stderr, r.stderr[-2000:]
    a = args.read_text().split()
    assert a[a.index("--host") + 1] == "127.0.0.1" and a[a.index("--dtype") + 1] == "float32"
    assert a[a.index("--tp-size") + 1] == "4"
    assert "exported" in runs[0].stdout and "serving it as it is" in runs[1].stdout, runs[1].stdout
    r = subprocess.run(["bash", "slurm/serve.sh"], cwd=ROOT, env=dict(env, ALLOW_LONG_CONTEXT="1"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs the context too" in r.stderr


def test_a_rollout_server_and_its_router_outlive_the_jobs_warning_signals():
    """USR1/USR2 (sbatch's --signal, submitit's warning to every step) ask the trainer to checkpoint at its step
    boundary, whose weight sync needs the servers: the server and router wrappers ignore them, and so does what
    they exec (SGLang itself: an ignored signal stays ignored across exec). SIGTERM still stops them."""
    code = ("import os, signal, subprocess, sys\n"
            "from serving.sglang import ignore_preemption_warnings\n"
            "ignore_preemption_warnings()\n"
            "os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGUSR2)\n"
            "child = subprocess.run(['sh', '-c', 'kill -USR1 $$; kill -USR2 $$; echo child-alive'],"
            " capture_output=True, text=True)\n"
            "print('alive', child.stdout.strip(), signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\n")
    r = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["alive", "child-alive", "True"], (r.stdout, r.stderr)
    for module in ("serving/sglang.py", "serving/router.py"):  # (both wrappers call it before they launch)
        src = (ROOT / module).read_text()
        assert 0 < src.find("\n    ignore_preemption_warnings()") < src.index("\n    proc = launch("), module
