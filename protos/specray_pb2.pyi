from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
INT64: DType
INT32: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class StartSequence(_message.Message):
    __slots__ = ("seq_id", "token_ids", "params", "k", "features")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    k: int
    features: Tensor
    def __init__(self, seq_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., k: _Optional[int] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("seq_id", "epoch", "start", "committed", "num_accepted", "features", "k")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    epoch: int
    start: int
    committed: _containers.RepeatedScalarFieldContainer[int]
    num_accepted: int
    features: Tensor
    k: int
    def __init__(self, seq_id: _Optional[str] = ..., epoch: _Optional[int] = ..., start: _Optional[int] = ..., committed: _Optional[_Iterable[int]] = ..., num_accepted: _Optional[int] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ...) -> None: ...

class FinishSequence(_message.Message):
    __slots__ = ("seq_id",)
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    def __init__(self, seq_id: _Optional[str] = ...) -> None: ...

class TargetMessage(_message.Message):
    __slots__ = ("start", "verdict", "finish")
    START_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    start: StartSequence
    verdict: Verdict
    finish: FinishSequence
    def __init__(self, start: _Optional[_Union[StartSequence, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., finish: _Optional[_Union[FinishSequence, _Mapping]] = ...) -> None: ...

class DraftBlock(_message.Message):
    __slots__ = ("seq_id", "epoch", "start", "tokens", "probs", "drafted_at", "prepared", "parents")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_AT_FIELD_NUMBER: _ClassVar[int]
    PREPARED_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    epoch: int
    start: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    probs: Tensor
    drafted_at: float
    prepared: bool
    parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[str] = ..., epoch: _Optional[int] = ..., start: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., probs: _Optional[_Union[Tensor, _Mapping]] = ..., drafted_at: _Optional[float] = ..., prepared: _Optional[bool] = ..., parents: _Optional[_Iterable[int]] = ...) -> None: ...

class DraftError(_message.Message):
    __slots__ = ("seq_id", "message")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    message: str
    def __init__(self, seq_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DraftMessage(_message.Message):
    __slots__ = ("block", "error")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    block: DraftBlock
    error: DraftError
    def __init__(self, block: _Optional[_Union[DraftBlock, _Mapping]] = ..., error: _Optional[_Union[DraftError, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DraftInfo(_message.Message):
    __slots__ = ("drafter", "feature_layers", "max_sequences", "active_sequences", "blocks_sent", "hypotheses_drafted", "prepared_hits")
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SENT_FIELD_NUMBER: _ClassVar[int]
    HYPOTHESES_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    PREPARED_HITS_FIELD_NUMBER: _ClassVar[int]
    drafter: str
    feature_layers: _containers.RepeatedScalarFieldContainer[int]
    max_sequences: int
    active_sequences: int
    blocks_sent: int
    hypotheses_drafted: int
    prepared_hits: int
    def __init__(self, drafter: _Optional[str] = ..., feature_layers: _Optional[_Iterable[int]] = ..., max_sequences: _Optional[int] = ..., active_sequences: _Optional[int] = ..., blocks_sent: _Optional[int] = ..., hypotheses_drafted: _Optional[int] = ..., prepared_hits: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("seq_id", "prompt_ids", "max_tokens", "params", "num_draft_tokens", "stop", "ignore_eos", "draft_address")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    params: SamplingParams
    num_draft_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    draft_address: str
    def __init__(self, seq_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., num_draft_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., draft_address: _Optional[str] = ...) -> None: ...

class SequenceStats(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos", "num_steps", "stop_text_end")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PER_POS_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    STOP_TEXT_END_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: _containers.RepeatedScalarFieldContainer[int]
    num_steps: int
    stop_text_end: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., num_drafts: _Optional[int] = ..., num_draft_tokens: _Optional[int] = ..., num_accepted_tokens: _Optional[int] = ..., accepted_per_pos: _Optional[_Iterable[int]] = ..., num_steps: _Optional[int] = ..., stop_text_end: _Optional[int] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("token_ids", "finished", "finish_reason", "stats")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    stats: SequenceStats
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., stats: _Optional[_Union[SequenceStats, _Mapping]] = ...) -> None: ...

class TargetInfo(_message.Message):
    __slots__ = ("model", "max_model_len", "vocab_size", "max_batch", "max_draft_tokens", "running", "waiting", "tp", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos", "prompt_tokens", "completion_tokens", "finished", "aborted", "fallback_steps", "draft_wait_seconds", "draft_rpc_latency_s", "healthy", "error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PER_POS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_STEPS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_RPC_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    max_model_len: int
    vocab_size: int
    max_batch: int
    max_draft_tokens: int
    running: int
    waiting: int
    tp: int
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: _containers.RepeatedScalarFieldContainer[int]
    prompt_tokens: int
    completion_tokens: int
    finished: int
    aborted: int
    fallback_steps: int
    draft_wait_seconds: float
    draft_rpc_latency_s: _containers.RepeatedScalarFieldContainer[float]
    healthy: bool
    error: str
    def __init__(self, model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_draft_tokens: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., tp: _Optional[int] = ..., num_drafts: _Optional[int] = ..., num_draft_tokens: _Optional[int] = ..., num_accepted_tokens: _Optional[int] = ..., accepted_per_pos: _Optional[_Iterable[int]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., finished: _Optional[int] = ..., aborted: _Optional[int] = ..., fallback_steps: _Optional[int] = ..., draft_wait_seconds: _Optional[float] = ..., draft_rpc_latency_s: _Optional[_Iterable[float]] = ..., healthy: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...
