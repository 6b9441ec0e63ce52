"""SGLang 0.5.23's native protocol, as far as the RL rollout path uses it: the request classes (field names from the
pinned release, ``tests/data/sglang_api.json``; unknown fields are a 400) and the replies whose exact text clients
meet (the weight-update session's refusals, ``/flush_cache``'s plain-text body). ``serving/native.py`` answers with
these; ``tests/test_transport_parts.py`` reads SGLang's own source (the side folder of ``locks/sglang-side.txt``) and
checks every string and route here against it."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

# srt/entrypoints/http_server.py flush_cache(): 200 with this text, or 400 with the scheduler's message / this
FLUSHED = ("Cache flushed.\nPlease check backend logs for more details. "
           "(When there are running or waiting requests, the operation will not be performed.)\n")
FLUSH_FAILED = "Flush cache failed.\n"
FLUSH_TIMED_OUT = "Timed out waiting for idle state."  # (scheduler_components/flush_wrapper.py, ?timeout= passed)
# srt/managers/schedule_batch.py FINISH_ABORT().to_json(): a request ended by abort_all (a 200, not an error)
ABORTED = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
# srt/constants.py GPU_MEMORY_ALL_TYPES (what an empty or absent ``tags`` releases / resumes)
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
# srt/managers/scheduler_components/weight_updater.py: the scheduler's assertion (its failure kills the server)
NOT_IDLE_RELEASE = "release_memory_occupation should be called only when server is idle."
# srt/managers/scheduler_components/weight_updater.py: the session (begin_weight_update / end_weight_update)
SESSION_OPEN = "a weight-update session is already open; call end_weight_update() first"
NO_SESSION_OPEN = "no weight-update session is open; call begin_weight_update() first"


def outside_session(what: str) -> str:
    """The refusal of ``update_weights_from_distributed`` / ``_from_tensor`` without an open session."""
    return f"{what} must run between begin_weight_update() and end_weight_update()"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Strict):  # fields of sglang.srt.sampling.sampling_params.SamplingParams
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    sampling_seed: Optional[int] = None
    skip_special_tokens: bool = True


class GenerateReq(_Strict):  # GenerateReqInput (the token-id subset)
    input_ids: Union[list[list[int]], list[int]]
    sampling_params: Union[list[Sampling], Sampling, None] = None
    return_logprob: bool = False
    rid: Optional[Union[str, list[str]]] = None
    # what SGLang's router (sglang-router 0.3.2) writes into every request it forwards, at these values; a CPU
    # server honours no other (``model`` is the router's own: SGLang ignores fields it lacks, ROUTER_ONLY)
    model: Optional[str] = None
    stream: Literal[False] = False
    log_metrics: bool = True
    no_logs: bool = False
    return_text_in_logprobs: Literal[False] = False
    return_hidden_states: Literal[False] = False
    return_entropy: Literal[False] = False
    return_bytes: Literal[False] = False
    background: Literal[False] = False


ROUTER_ONLY = {"model"}  # GenerateReq fields that SGLang's GenerateReqInput lacks (the router adds them)


class InitGroupReq(_Strict):  # InitWeightsUpdateGroupReqInput
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class DistributedReq(_Strict):  # UpdateWeightsFromDistributedReqInput
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    load_format: Optional[str] = None
    selector: Literal["target", "draft", "all"] = "all"
    torch_empty_cache: bool = False


class DiskReq(_Strict):  # UpdateWeightFromDiskReqInput (the fields a CPU server can honour)
    model_path: str
    load_format: Optional[str] = None
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    flush_cache: bool = True
    torch_empty_cache: bool = False


class TensorReq(_Strict):  # UpdateWeightsFromTensorReqInput
    serialized_named_tensors: list[str]  # one per TP rank: base64 of a ForkingPickler dump of [(name, tensor)]
    load_format: Optional[str] = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    selector: Literal["target", "draft", "all"] = "all"
    torch_empty_cache: bool = False


class AbortReq(_Strict):  # AbortReq (abort_all; a CPU server keeps no request ids)
    abort_all: bool = False


class MemoryReq(_Strict):  # Release/ResumeMemoryOccupationReqInput
    tags: Optional[list[str]] = None


class BeginReq(_Strict):  # BeginWeightUpdateReqInput
    selector: Literal["target", "draft", "all"] = "all"


class EndReq(_Strict):  # EndWeightUpdateReqInput
    pass
