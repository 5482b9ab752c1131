"""Section 4 of common.py: chunked log-probs / entropy / KL against a float64 naive reference,
batch packing, data order, and loss invariance to micro-batching."""

import math
from types import SimpleNamespace

import pytest
import torch

import common
from common import global_batches, my_micro_batches, pack_rollouts, token_entropy, token_kl, token_logprobs

LOW = [torch.bfloat16, torch.float16]
ALL = [torch.float32, torch.bfloat16, torch.float16]
TEMPS = [1.0, 0.7]
SHAPE = (3, 5)  # 15 rows
VOCAB = 20      # CHUNK_ELEMENTS = 64 -> 3 rows per chunk -> 5 chunks


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors here are tiny: a second intra-op thread only adds wake-up latency (milliseconds per
    op when the CPU is shared), which made the float64 gradchecks take seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 64)
    rows = common._rows_per_chunk(torch.empty(0, VOCAB))
    assert 1 < rows < SHAPE[0] * SHAPE[1]  # several chunks, each of several rows
    return rows


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-3}


def make_logits(dtype, seed=0, shape=SHAPE, vocab=VOCAB, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


def make_labels(seed=1, shape=SHAPE, vocab=VOCAB):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def naive_logsoftmax(x, temperature):
    """Reference: from the same (possibly low-precision) values, upcast to float64."""
    return torch.log_softmax(x.double() / temperature, dim=-1)


# ------------------------------------------------------------------------------------------------
# values against the float64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("temperature", TEMPS)
def test_token_logprobs_matches_naive(small_chunks, dtype, temperature):
    logits, labels = make_logits(dtype), make_labels()
    out = token_logprobs(logits, labels, temperature)
    ref = naive_logsoftmax(logits, temperature).gather(-1, labels[..., None]).squeeze(-1)
    assert out.shape == labels.shape
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, **tol(dtype))
    assert (out <= 0).all()


def test_token_logprobs_float64_stays_float64():
    logits = make_logits(torch.float64)
    assert token_logprobs(logits, make_labels()).dtype == torch.float64


def test_token_logprobs_temperature_changes_result(small_chunks):
    logits, labels = make_logits(torch.float32), make_labels()
    a, b = token_logprobs(logits, labels, 1.0), token_logprobs(logits, labels, 0.7)
    assert (a - b).abs().max() > 1e-2


def test_token_logprobs_large_logits_finite(small_chunks):
    logits = make_logits(torch.float32, scale=1e4)
    out = token_logprobs(logits, make_labels(), 0.7)
    assert torch.isfinite(out).all()
    ref = naive_logsoftmax(logits, 0.7).gather(-1, make_labels()[..., None]).squeeze(-1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("temperature", TEMPS)
def test_token_entropy_matches_naive(small_chunks, dtype, temperature):
    logits = make_logits(dtype)
    out = token_entropy(logits, temperature)
    logp = naive_logsoftmax(logits, temperature)
    ref = -(logp.exp() * logp).sum(-1)
    assert out.shape == SHAPE and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, **tol(dtype))
    assert (out >= -1e-6).all() and (out <= math.log(VOCAB) + 1e-5).all()


@pytest.mark.parametrize("dtype", ALL)
def test_token_entropy_uniform_and_peaked(small_chunks, dtype):
    uniform = torch.zeros(*SHAPE, VOCAB, dtype=dtype)
    torch.testing.assert_close(token_entropy(uniform), torch.full(SHAPE, math.log(VOCAB)), rtol=1e-6, atol=1e-6)
    peaked = torch.zeros(*SHAPE, VOCAB, dtype=dtype)
    peaked[..., 3] = 100.0
    assert token_entropy(peaked).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("temperature", TEMPS)
def test_token_kl_matches_naive(small_chunks, dtype, temperature):
    p, q = make_logits(dtype, seed=0), make_logits(dtype, seed=7)
    out = token_kl(p, q, temperature)
    lp, lq = naive_logsoftmax(p, temperature), naive_logsoftmax(q, temperature)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    assert out.shape == SHAPE and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, **tol(dtype))
    assert (out >= 0).all()
    assert (out > 1e-2).all()  # the two distributions really differ


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("temperature", TEMPS)
def test_token_kl_of_identical_is_zero(small_chunks, dtype, temperature):
    p = make_logits(dtype)
    out = token_kl(p, p.clone(), temperature)
    assert (out >= 0).all()
    assert out.abs().max() < 1e-6
    # shifting all logits by a constant does not change the distribution
    shifted = token_kl(p.float(), p.float() + 5.0, temperature)
    assert shifted.abs().max() < 1e-5


def test_token_kl_nonnegative_on_many_random_pairs(small_chunks):
    g = torch.Generator().manual_seed(3)
    p = torch.randn(40, VOCAB, generator=g) * 0.01   # nearly identical distributions: rounding could go < 0
    q = p + torch.randn(40, VOCAB, generator=g) * 1e-4
    assert (token_kl(p, q) >= 0).all()


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------

def test_chunks_are_cache_sized_on_cpu_and_launch_sized_on_gpus():
    assert common._rows_per_chunk(torch.empty(0, 152064)) == 13  # 8 MB of float32
    assert common._rows_per_chunk(torch.empty(0, 152064, device="meta")) == 110  # any accelerator: 64 MB


@pytest.mark.parametrize("temperature", TEMPS)
def test_token_logprobs_gradcheck(monkeypatch, temperature):
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 13)  # V = 6 -> 2 rows per chunk, 6 rows -> 3 chunks
    assert common._rows_per_chunk(torch.empty(0, 6)) == 2
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, temperature), (logits,))


@pytest.mark.parametrize("temperature", TEMPS)
def test_token_kl_gradcheck(monkeypatch, temperature):
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 13)
    g = torch.Generator().manual_seed(1)
    # two independent leaves: gradcheck perturbs each in place, so q must not be derived from p
    p = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: token_kl(a, b, temperature), (p, q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", TEMPS)
def test_token_logprobs_gradient_matches_naive_autograd(small_chunks, dtype, temperature):
    logits = make_logits(dtype).requires_grad_(True)
    labels = make_labels()
    weights = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))  # upstream grad, some masked
    weights[0, 3:] = 0.0
    (token_logprobs(logits, labels, temperature) * weights).sum().backward()
    assert logits.grad.dtype == dtype

    ref_in = logits.detach().float().requires_grad_(True)
    ref = torch.log_softmax(ref_in / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    (ref * weights).sum().backward()
    if dtype == torch.float32:
        torch.testing.assert_close(logits.grad, ref_in.grad, rtol=1e-5, atol=1e-6)
    else:  # one rounding of the same float32 value to the low-precision dtype
        torch.testing.assert_close(logits.grad.float(), ref_in.grad.to(dtype).float(), rtol=1e-2, atol=1e-4)
    assert logits.grad[0, 3:].abs().max() == 0  # zero upstream gradient -> zero gradient
    # each row's gradient sums to zero: (onehot - p) * g / T
    assert logits.grad.float().sum(-1).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


# ------------------------------------------------------------------------------------------------
# pack_rollouts
# ------------------------------------------------------------------------------------------------

PAD = EOS = 0
ROLLOUTS = [
    {"prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10, EOS]},   # ends with EOS == pad
    {"prompt_ids": [11, PAD, 12, 13, 14], "response_ids": [15]},   # a pad-valued id inside the prompt
    {"prompt_ids": [16, 17], "response_ids": [18, EOS, 19]},      # pad-valued id mid-response
]


def test_pack_rollouts_masks_come_from_lengths():
    b = pack_rollouts(ROLLOUTS, PAD, "cpu")
    P, T = 5, 4
    assert b["input_ids"].shape == (3, P + T)
    assert b["attention_mask"].shape == (3, P + T) and b["position_ids"].shape == (3, P + T)
    assert b["labels"].shape == (3, T) and b["mask"].shape == (3, T)
    assert b["mask"].tolist() == [[True, True, True, True], [True, False, False, False], [True, True, True, False]]
    assert b["mask"][0, 3] and b["labels"][0, 3] == EOS  # the real EOS, equal to pad, is kept
    for i, r in enumerate(ROLLOUTS):
        n_p, n_r = len(r["prompt_ids"]), len(r["response_ids"])
        assert b["labels"][i, :n_r].tolist() == r["response_ids"]
        # every response starts at column P; the prompt is left-padded up to it
        assert b["input_ids"][i, P:P + n_r].tolist() == r["response_ids"]
        assert b["input_ids"][i, P - n_p:P].tolist() == r["prompt_ids"]
        expected_attn = [0] * (P - n_p) + [1] * (n_p + n_r) + [0] * (T - n_r)
        assert b["attention_mask"][i].tolist() == expected_attn
        real = b["attention_mask"][i].bool()
        # positions count only real tokens: 0, 1, ..., n_p + n_r - 1
        assert b["position_ids"][i][real].tolist() == list(range(n_p + n_r))


def test_pack_rollouts_single_row_has_no_padding():
    b = pack_rollouts([ROLLOUTS[0]], PAD, "cpu")
    assert b["attention_mask"].all() and b["mask"].all()
    assert b["position_ids"][0].tolist() == list(range(7))


# ------------------------------------------------------------------------------------------------
# global_batches, my_micro_batches
# ------------------------------------------------------------------------------------------------

def test_global_batches_is_a_seeded_permutation():
    batches = global_batches(23, 5, seed=3, epoch=0)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(23))
    assert flat != list(range(23))
    assert global_batches(23, 5, seed=3, epoch=0) == batches
    assert global_batches(23, 5, seed=3, epoch=1) != batches
    assert global_batches(23, 5, seed=4, epoch=0) != batches
    assert sorted(i for b in global_batches(23, 5, seed=3, epoch=1) for i in b) == list(range(23))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("micro_batch", [1, 2, 5])
def test_my_micro_batches_cover_global_batch_once(world, micro_batch):
    batch = [17, 3, 9, 0, 12, 5, 8, 21, 1, 4, 30]
    seen = []
    for rank in range(world):
        ctx = SimpleNamespace(rank=rank, world=world)
        mbs = my_micro_batches(batch, ctx, micro_batch)
        assert all(1 <= len(mb) <= micro_batch for mb in mbs)
        seen += [i for mb in mbs for i in mb]
    assert sorted(seen) == sorted(batch)
    assert len(seen) == len(batch)


# ------------------------------------------------------------------------------------------------
# micro-batch invariance of the loss (what common.train_epoch does, at the function level)
# ------------------------------------------------------------------------------------------------
