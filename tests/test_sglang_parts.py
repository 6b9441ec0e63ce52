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
    rs = parse_generate(out, [[1, 2, 3]], 2)
    assert [r.prompt_index for r in rs] == [0, 0] and rs[0].response_ids == [9, 1] and rs[1].response_ids == [8]
    assert rs[0].logprobs == [-0.5, -0.1] and [r.finish_reason for r in rs] == ["stop", "length"]
