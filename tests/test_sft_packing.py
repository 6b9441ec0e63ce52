"""Packed SFT rows: per-sequence attention, restarted positions, next-token labels inside each sequence;
a packed row's loss and gradients equal those of its sequences run separately."""
import torch

from megatron_ring.sft.data import block_causal_mask, collate, packed_row_to_sample

from .conftest import read_json, torchrun


def test_packed_sample_layout():
    s = packed_row_to_sample([10, 11, 12, 20, 21, 1, 1], [0, 1, 1, 0, 1, 0, 0], [3, 2], pad_id=1)
    assert s["labels"].tolist() == [11, 12, 1, 21, 1, 1, 1]
    assert s["loss_mask"].tolist() == [1, 1, 0, 1, 0, 0, 0]  # weight of the *label* token; none across seqs
    assert s["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1]
    allowed = ~collate([s])["attention_mask"][0, 0]
    assert allowed[4].tolist() == [False, False, False, True, True, False, False]  # 2nd seq sees only itself
    assert allowed[2].tolist() == [True, True, True, False, False, False, False]
    assert bool(allowed.any(-1).all())  # no row without a key (padding attends within itself)
    assert torch.equal(allowed, allowed.tril())


def test_packed_equals_separate(tiny, tmp_path):
    out = tmp_path / "p.json"
    torchrun("case_packing.py", 1, "--ckpt", tiny["mcore"], "--out", out)
    r = read_json(out)
    assert r["n_grads"] == r["n_params"]  # every parameter got a gradient in both runs
    assert abs(r["packed_loss"] - r["separate_loss"]) <= 1e-5 * max(1.0, abs(r["separate_loss"]))
    assert r["max_grad_diff"] <= 1e-5 and r["max_grad"] > 1e-3


def test_last_boxed_answer_extraction():
    from megatron_ring.sft.heldout import last_boxed

    assert last_boxed("<think>\\boxed{1}</think> so \\boxed{ 1 2 }.") == "12"
    assert last_boxed("no answer") is None


def test_thd_micro_batch_has_the_mask_paths_boundaries():
    """The TE path's THD micro-batch (rows concatenated, cu_seqlens at every conversation boundary and the padding
    tail) attends exactly where the local path's block mask allows, with the same labels, weights and positions."""
    rows = [packed_row_to_sample([10, 11, 12, 20, 21, 1, 1], [0, 1, 1, 0, 1, 0, 0], [3, 2], pad_id=1),
            packed_row_to_sample([30, 31, 32, 33, 40, 41, 42], [0, 0, 1, 1, 0, 1, 1], [4, 3], pad_id=1)]
    dense, thd = collate(rows), collate(rows, thd=True)
    p = thd["packed_seq_params"]
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 7, 11, 14] and p.cu_seqlens_kv.tolist() == p.cu_seqlens_q.tolist()
    assert p.max_seqlen_q == 4 and "attention_mask" not in thd
    for k in ("tokens", "labels", "loss_mask", "position_ids"):
        assert thd[k].shape == (1, 14) and torch.equal(thd[k][0], dense[k].reshape(-1)), k
    # attention allowed by the segments == the block-diagonal of the two rows' dense masks
    cu = p.cu_seqlens_q.tolist()
    from_thd = block_causal_mask([b - a for a, b in zip(cu, cu[1:])], 14)
    want = torch.ones(14, 14, dtype=torch.bool)
    want[:7, :7], want[7:, 7:] = dense["attention_mask"][0, 0], dense["attention_mask"][1, 0]
    assert torch.equal(from_thd, want)
